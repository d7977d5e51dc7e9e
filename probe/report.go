package probe

import (
	"cmp"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flanneld-go/flanneld/internal/metrics"
)

// PeerStatus is one peer as /peers shows it.
type PeerStatus struct {
	Subnet   netip.Prefix `json:"subnet"`
	PublicIP netip.Addr   `json:"publicIP"`
	// Address is the address probed.
	Address netip.Addr `json:"address"`
	Backend string     `json:"backend"`
	State   State      `json:"state"`
	// LastRTTMs is the round trip of the last answered probe, in
	// milliseconds (0: none answered yet).
	LastRTTMs float64 `json:"lastRTTMs"`
	// Since is when the peer entered State.
	Since time.Time `json:"since"`
	// Detail says what the state means and what to check.
	Detail string `json:"detail,omitempty"`

	settled bool
}

// Report is the prober's view of every peer.
type Report struct {
	Backend string `json:"backend"`
	// Source and Source6 are the addresses probes leave from.
	Source  netip.Addr `json:"source"`
	Source6 netip.Addr `json:"source6"`
	// Overlay is false with host-gw, whose probes reach the peers' public
	// addresses: they prove a peer's host is up, not that routed overlay
	// traffic is forwarded.
	Overlay bool `json:"overlay"`
	// Rate is the most probes sent per second.
	Rate   int            `json:"rate"`
	Counts map[string]int `json:"counts"`
	// Peers are sorted: not reachable first, then by subnet.
	Peers []PeerStatus `json:"peers"`
}

func (r *run) statusOf(i int32, now time.Time) PeerStatus {
	p := &r.t.peers[i]
	s := PeerStatus{Subnet: r.t.subnet(i), PublicIP: r.t.public(i), Address: r.t.target(i), Backend: r.path.Backend, State: p.state,
		Since: r.wall(p.since).UTC(), settled: p.settled()}
	if p.has(replied) {
		s.LastRTTMs = float64(time.Duration(p.rtt).Microseconds()) / 1000
	}
	if p.state == Unreachable || p.state == MTUBlackhole {
		s.Detail = r.describe(i, p.state, now)
	}
	return s
}

func (r *run) report(now time.Time) Report {
	rep := Report{Backend: r.path.Backend, Source: r.path.Source, Source6: r.path.Source6, Overlay: r.path.Overlay(), Rate: r.pr.o.Rate,
		Counts: map[string]int{}, Peers: make([]PeerStatus, 0, r.t.live)}
	for _, s := range States {
		rep.Counts[s.String()] = r.counts[s]
	}
	for i := range r.t.peers {
		if !r.t.peers[i].has(gone) {
			rep.Peers = append(rep.Peers, r.statusOf(int32(i), now))
		}
	}
	sortPeers(rep.Peers)
	return rep
}

func sortPeers(ps []PeerStatus) {
	rank := func(s State) int {
		switch s {
		case Unreachable, MTUBlackhole:
			return 0
		case Unprobed:
			return 1
		}
		return 2
	}
	slices.SortFunc(ps, func(a, b PeerStatus) int {
		if c := cmp.Compare(rank(a.State), rank(b.State)); c != 0 {
			return c
		}
		return a.Subnet.Addr().Compare(b.Subnet.Addr())
	})
}

// maxPeerSeries bounds the per-peer series of /metrics.
const maxPeerSeries = 256

// notReachable is the per-peer metric series: one per peer unreachable or
// with an MTU black hole (at most maxPeerSeries), rebuilt by the owner
// loop at most once a second after a change and read at each scrape.
type notReachable struct {
	dirty bool
	built time.Time
}

var (
	peerSeries     atomic.Pointer[[]string]
	registerSeries sync.Once
)

// refresh rebuilds the series if they changed and the last build is a
// second old; it returns how long until it wants to run again (0: never).
func (n *notReachable) refresh(r *run, now time.Time) time.Duration {
	if !n.dirty {
		return 0
	}
	if wait := n.built.Add(time.Second).Sub(now); wait > 0 {
		return wait
	}
	n.dirty, n.built = false, now
	registerSeries.Do(func() { metrics.RegisterWriter(writePeerSeries) })
	var lines []string
	for i := range r.t.peers {
		p := &r.t.peers[i]
		if p.has(gone) || (p.state != Unreachable && p.state != MTUBlackhole) {
			continue
		}
		if len(lines) == maxPeerSeries {
			break
		}
		lines = append(lines, fmt.Sprintf("flannel_peer_not_reachable{subnet=%s,public_ip=%s,backend=%s,state=%s} 1",
			strconv.Quote(r.t.subnet(int32(i)).String()), strconv.Quote(r.t.public(int32(i)).String()), strconv.Quote(r.path.Backend), strconv.Quote(p.state.String())))
	}
	slices.Sort(lines)
	peerSeries.Store(&lines)
	return 0
}

func (n *notReachable) clear() { peerSeries.Store(nil) }

func writePeerSeries(w io.Writer) {
	fmt.Fprintln(w, "# TYPE flannel_peer_not_reachable gauge")
	if l := peerSeries.Load(); l != nil {
		for _, s := range *l {
			fmt.Fprintln(w, s)
		}
	}
}
