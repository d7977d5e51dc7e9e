package main

import (
	"context"
	"encoding/json"
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
}

func newOverlayHealth(f *flags, iface string, mtu int, log klog.Logger) *overlayHealth {
	h := &overlayHealth{iface: iface, mtu: mtu,
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
// what the prober and the checks keep.
func (h *overlayHealth) onApply(cfg *subnet.Config, mtu int, own subnet.Lease, remote []subnet.Lease) {
	path := probe.PathOf(cfg, mtu, own)
	peers := probe.PeersOf(path, remote)
	if h.prober != nil {
		h.prober.SetPeers(path, peers)
	}
	hc := probe.HostConfig{Backend: cfg.BackendType, Port: path.Port, Iface: h.iface, MTU: h.mtu, Own: own.Subnet, Own6: own.IPv6Subnet}
	if cfg.EnableIPv4 {
		hc.Network = cfg.Network
	}
	if cfg.EnableIPv6 {
		hc.IPv6Network = cfg.IPv6Network
	}
	hc.Peers = make([]netip.Prefix, 0, len(remote))
	for _, l := range remote {
		hc.Peers = append(hc.Peers, l.Subnet)
		if l.IPv6Subnet.IsValid() {
			hc.Peers = append(hc.Peers, l.IPv6Subnet)
		}
	}
	h.checker.Set(hc)
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
