package main

import (
	"context"
	"encoding/json"
	"hash/maphash"
	"net/http"
	"net/netip"
	"time"

	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/probe"
	"github.com/flanneld-go/flanneld/subnet"
)

// overlayHealth is the daemon's peer prober (nil with --peer-probe-rate
// 0) and host checker, fed by the agent after each Apply and read by
// /peers and /status.
type overlayHealth struct {
	prober  *probe.Prober
	checker *probe.Checker
	iface   string
	mtu     int
	seed    maphash.Seed
	last    applyInput // of the last onApply that handed anything on
}

// applyInput is what onApply hands on, with the leases as a count and a
// digest: an Apply that changes none of it (each resync, when no lease
// changed) costs one pass over the leases and allocates next to nothing.
type applyInput struct {
	path                         probe.Path
	network, network6, own, own6 netip.Prefix
	leases                       int
	digest                       uint64
}

func newOverlayHealth(f *flags, iface string, mtu int, log klog.Logger) *overlayHealth {
	h := &overlayHealth{iface: iface, mtu: mtu, seed: maphash.MakeSeed(),
		checker: probe.NewChecker(time.Duration(f.routeResync)*time.Second, nil, log.WithName("hostcheck"))}
	if f.peerProbeRate > 0 {
		l := log.WithName("probe")
		h.prober = probe.New(probe.Options{Rate: f.peerProbeRate, Logger: &l})
	}
	return h
}

// start runs the prober and checker until ctx ends.
func (h *overlayHealth) start(ctx context.Context) {
	if h.prober != nil {
		go h.prober.Run(ctx)
	}
	go h.checker.Run(ctx)
}

// onApply is agent.Options.OnApply: the admitted lease set, copied into
// what the prober and the checks keep. An Apply that changes nothing they
// use hands nothing on.
func (h *overlayHealth) onApply(cfg *subnet.Config, mtu int, own subnet.Lease, remote []subnet.Lease) {
	path := probe.PathOf(cfg, mtu, own)
	hc := probe.HostConfig{Backend: cfg.BackendType, Port: path.Port, Iface: h.iface, MTU: h.mtu, Own: own.Subnet, Own6: own.IPv6Subnet}
	if cfg.EnableIPv4 {
		hc.Network = cfg.Network
	}
	if cfg.EnableIPv6 {
		hc.IPv6Network = cfg.IPv6Network
	}
	in := applyInput{path: path, network: hc.Network, network6: hc.IPv6Network, own: hc.Own, own6: hc.Own6,
		leases: len(remote), digest: h.digest(remote)}
	if in == h.last {
		return
	}
	h.last = in
	if h.prober != nil {
		h.prober.SetPeers(path, probe.PeersOf(path, remote))
	}
	hc.Peers.Grow(len(remote))
	for _, l := range remote {
		hc.Peers.Add(l.Subnet)
		hc.Peers.Add(l.IPv6Subnet)
	}
	hc.Peers.Sort() // once here, not at each run of the checks
	h.checker.Set(hc)
}

// digest sums a 64-bit hash (seeded at random) of each lease's subnets and
// public addresses, what the prober and the checks use of them: the same
// leases in any order give the same digest; others the same one with
// probability 2⁻⁶⁴.
func (h *overlayHealth) digest(remote []subnet.Lease) uint64 {
	var sum uint64
	var b [4 * 18]byte
	for i := range remote {
		l := &remote[i]
		n := 0
		put := func(a netip.Addr, bits int) { // bits -1: an address
			a16 := a.As16()
			n += copy(b[n:], a16[:])
			b[n], b[n+1] = byte(a.BitLen()), byte(bits+1)
			n += 2
		}
		put(l.Subnet.Addr(), l.Subnet.Bits())
		put(l.IPv6Subnet.Addr(), l.IPv6Subnet.Bits())
		put(l.Attrs.PublicIP, -1)
		put(l.Attrs.PublicIPv6, -1)
		sum += maphash.Bytes(h.seed, b[:])
	}
	return sum
}

// routes adds /peers and /status to the healthz server. Neither affects
// /readyz: a broken peer must never restart this node.
func (h *overlayHealth) routes(mux *http.ServeMux) {
	mux.HandleFunc("/peers", func(w http.ResponseWriter, r *http.Request) {
		if h.prober == nil {
			http.Error(w, "peer probes are off (--peer-probe-rate 0)", http.StatusNotFound)
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		defer cancel()
		rep, err := h.prober.Report(ctx)
		if err != nil {
			http.Error(w, "peer prober not answering: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		writeJSON(w, rep)
	})
	mux.HandleFunc("/status", func(w http.ResponseWriter, r *http.Request) {
		st := struct {
			HostChecks []probe.Check  `json:"hostChecks"`
			Peers      map[string]int `json:"peers,omitempty"`
		}{HostChecks: h.checker.Results()}
		if h.prober != nil {
			ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
			defer cancel()
			if rep, err := h.prober.Report(ctx); err == nil {
				st.Peers = rep.Counts
			}
		}
		writeJSON(w, st)
	})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}
