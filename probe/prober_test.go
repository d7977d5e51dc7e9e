package probe

import (
	"net/netip"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"k8s.io/klog/v2/ktesting"

	"github.com/flanneld-go/flanneld/subnet"
)

// simConn is the network of a simulated run: each probe sent is answered
// unless drop says otherwise.
type simConn struct {
	drop    func(dst netip.Addr, size int) bool
	pending []simProbe
	sent    []time.Time
	sizes   map[int]int
	dsts    map[netip.Addr]int
}

type simProbe struct {
	dst  netip.Addr
	seq  uint16
	size int
}

func (c *simConn) send(dst netip.Addr, seq uint16, size int) error {
	c.pending = append(c.pending, simProbe{dst, seq, size})
	if c.sizes == nil {
		c.sizes, c.dsts = map[int]int{}, map[netip.Addr]int{}
	}
	c.sizes[size]++
	c.dsts[dst]++
	return nil
}
func (c *simConn) read([]byte, func() time.Time) (reply, error) { select {} }
func (c *simConn) close() error                                 { return nil }

// sim drives a prober's run on simulated time, without goroutines: what
// Run's loop does, one event at a time.
type sim struct {
	t   *testing.T
	r   *run
	c   *simConn
	now time.Time
	log ktesting.Buffer
}

func newSim(t *testing.T, rate int, path Path, peers []Peer) *sim {
	log := ktesting.NewLogger(t, ktesting.NewConfig(ktesting.BufferLogs(true)))
	pr := New(Options{Rate: rate, Logger: &log})
	s := &sim{t: t, r: pr.newRun(), c: &simConn{drop: func(netip.Addr, int) bool { return false }}, now: time.Unix(100000, 0)}
	s.r.setView(view{path: path, peers: peers}, s.now)
	s.r.socks = [2]conn{s.c, s.c} // after the first view, which sets the source addresses
	s.log = log.GetSink().(ktesting.Underlier).GetBuffer()
	return s
}

// run advances d, or until done (checked after every event) is true, and
// returns the time taken.
func (s *sim) run(d time.Duration, done func() bool) time.Duration {
	start := s.now
	end := s.now.Add(d)
	for {
		wait := s.r.pump(s.now)
		for _, p := range s.c.pending {
			s.c.sent = append(s.c.sent, s.now)
			if !s.c.drop(p.dst, p.size) {
				s.r.answered(reply{seq: p.seq, from: p.dst, at: s.now.Add(300 * time.Microsecond)})
			}
		}
		answered := len(s.c.pending) > 0
		s.c.pending = s.c.pending[:0]
		if done != nil && done() {
			return s.now.Sub(start)
		}
		if answered {
			continue // replies may ask for more probes now
		}
		if wait == 0 {
			wait = time.Second
		}
		if s.now.Add(wait).After(end) {
			s.now = end
			return d
		}
		s.now = s.now.Add(wait)
	}
}

func (s *sim) state(p netip.Prefix) State { return s.r.peer(p).state }

// peer is the record of the peer of subnet sn (nil if none).
func (r *run) peer(sn netip.Prefix) *peer {
	if i := r.t.lookup(subnet.KeyOf(sn)); i >= 0 {
		return &r.t.peers[i]
	}
	return nil
}

func (s *sim) logLines(substr string) []string {
	var out []string
	for _, e := range s.log.Data() {
		if strings.Contains(e.Message, substr) {
			out = append(out, e.Message)
		}
	}
	return out
}

var (
	vxlanPath = Path{Backend: "vxlan", Port: 8472, MTU: 1450, Source: netip.MustParseAddr("10.5.1.0")}
	simPeers  = []Peer{
		{Subnet: netip.MustParsePrefix("10.5.2.0/24"), PublicIP: netip.MustParseAddr("172.30.0.2")},
		{Subnet: netip.MustParsePrefix("10.5.3.0/24"), PublicIP: netip.MustParseAddr("172.30.0.4")},
	}
)

// TestProberStates runs a node with two peers through a blocked port, its
// end, and an MTU black hole on simulated time: each change is detected
// within the documented bound, logged once in the documented words, and
// the other peer stays reachable.
func TestProberStates(t *testing.T) {
	s := newSim(t, DefaultRate, vxlanPath, simPeers)
	a, b := simPeers[0].Subnet, simPeers[1].Subnet
	s.run(time.Minute, nil)
	if s.state(a) != Reachable || s.state(b) != Reachable {
		t.Fatalf("after a minute: %v %v, want both reachable", s.state(a), s.state(b))
	}
	if n := s.c.sizes[1450]; n == 0 {
		t.Error("no full-size probe in a minute")
	}

	// The port is blocked towards b: unreachable within one round and
	// LossThreshold+1 timeouts (a full-size loss may come first).
	s.c.drop = func(dst netip.Addr, _ int) bool { return dst == simPeers[1].Subnet.Addr() }
	bound := MinRound + (LossThreshold+1)*DefaultTimeout + time.Second
	took := s.run(2*bound, func() bool { return s.state(b) == Unreachable })
	if s.state(b) != Unreachable || took > bound {
		t.Fatalf("blocked peer %v after %v, want unreachable within %v", s.state(b), took, bound)
	}
	lines := s.logLines("unreachable over vxlan")
	if len(lines) != 1 || !strings.HasPrefix(lines[0], "peer 10.5.3.0/24 (172.30.0.4) unreachable over vxlan for ") ||
		!strings.HasSuffix(lines[0], " s: check that UDP 8472 passes between the hosts") {
		t.Errorf("log lines %q, want one like %q", lines, "peer 10.5.3.0/24 (172.30.0.4) unreachable over vxlan for 12 s: check that UDP 8472 passes between the hosts")
	}
	s.run(time.Minute, nil)
	if n := len(s.logLines("unreachable")); n != 1 || s.state(a) != Reachable {
		t.Errorf("a minute later: %d lines about unreachable (want 1), other peer %v", n, s.state(a))
	}

	// Unblocked: reachable again within a round.
	s.c.drop = func(netip.Addr, int) bool { return false }
	took = s.run(2*MinRound, func() bool { return s.state(b) == Reachable })
	if s.state(b) != Reachable || took > MinRound+time.Second {
		t.Errorf("unblocked peer %v after %v, want reachable within %v", s.state(b), took, MinRound)
	}
	if lines := s.logLines("reachable again"); len(lines) != 1 || !strings.HasPrefix(lines[0], "peer 10.5.3.0/24 (172.30.0.4) reachable again over vxlan (rtt ") {
		t.Errorf("log lines %q, want one saying reachable again", lines)
	}

	// Packets above 1,200 bytes vanish towards b: a black hole within
	// bigEvery rounds and a few timeouts; a stays reachable.
	s.c.drop = func(dst netip.Addr, size int) bool { return dst == simPeers[1].Subnet.Addr() && size > 1200 }
	bound = bigEvery*MinRound + 4*DefaultTimeout + time.Second
	took = s.run(2*bound, func() bool { return s.state(b) == MTUBlackhole })
	if s.state(b) != MTUBlackhole || took > bound {
		t.Fatalf("peer %v after %v, want mtu-blackhole within %v", s.state(b), took, bound)
	}
	want := "peer 10.5.3.0/24 (172.30.0.4) has an MTU black hole over vxlan: 84-byte probes pass, 1450-byte probes with DF set are lost: " +
		"the underlay between the hosts drops packets of 1500 bytes (FLANNEL_MTU 1450 + 50 bytes of vxlan encapsulation)"
	if lines := s.logLines("MTU black hole"); len(lines) != 1 || !strings.HasPrefix(lines[0], want) {
		t.Errorf("log lines %q, want one starting %q", lines, want)
	}
	s.run(2*time.Minute, nil)
	if s.state(b) != MTUBlackhole || s.state(a) != Reachable || len(s.logLines("MTU black hole")) != 1 {
		t.Errorf("two minutes later: %v %v, %d black hole lines; want the state held and logged once", s.state(a), s.state(b), len(s.logLines("MTU black hole")))
	}
	rep := s.r.report(s.now)
	if rep.Counts["reachable"] != 1 || rep.Counts["mtu-blackhole"] != 1 || rep.Peers[0].Subnet != b || rep.Peers[0].Detail == "" || rep.Peers[1].LastRTTMs != 0.3 {
		t.Errorf("report %+v: want b first with a detail, a reachable with rtt 0.3 ms", rep)
	}
	s.c.drop = func(netip.Addr, int) bool { return false }
	s.run(bound, func() bool { return s.state(b) == Reachable })
	if s.state(b) != Reachable {
		t.Errorf("black hole gone: peer %v, want reachable", s.state(b))
	}
}

// TestProberBudget: 5,000 peers, a third of them unreachable: the probes
// sent in any second stay within the rate, and removing peers forgets
// them.
func TestProberBudget(t *testing.T) {
	var peers []Peer
	for i := range 5000 {
		a := netip.AddrFrom4([4]byte{10, 6, byte(i >> 8), byte(i)})
		peers = append(peers, Peer{Subnet: netip.PrefixFrom(a, 32), PublicIP: a})
	}
	s := newSim(t, DefaultRate, vxlanPath, peers)
	s.c.drop = func(dst netip.Addr, _ int) bool { return dst.As4()[3]%3 == 0 }
	down := 0
	for _, p := range peers {
		if s.c.drop(p.Subnet.Addr(), 0) {
			down++
		}
	}
	s.run(20*time.Minute, nil)
	if n := maxInWindow(s.c.sent, time.Second); n > DefaultRate {
		t.Errorf("%d probes in one second, rate %d", n, DefaultRate)
	}
	rep := s.r.report(s.now)
	if rep.Counts["unreachable"] != down || rep.Counts["reachable"] != 5000-down {
		t.Errorf("counts %v, want %d unreachable, the rest reachable", rep.Counts, down)
	}
	s.r.setView(view{path: vxlanPath, peers: peers[:10]}, s.now)
	if rep := s.r.report(s.now); s.r.t.live != 10 || len(rep.Peers) != 10 || rep.Counts["unreachable"] != 4 {
		t.Errorf("after removing peers: %d peers, counts %v", s.r.t.live, rep.Counts)
	}
	s.run(time.Minute, nil)
	if n := len(s.r.t.peers) - len(s.r.t.free); n != 10 {
		t.Errorf("%d slots held after a round, want 10", n)
	}
}

// benchPeers is n peers as PeersOf makes them for vxlan leases: a /24
// each, probed at its first address, with a public address.
func benchPeers(n int) []Peer {
	peers := make([]Peer, 0, n)
	for i := range n {
		a := netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 0})
		peers = append(peers, Peer{Subnet: netip.PrefixFrom(a, 24), PublicIP: netip.AddrFrom4([4]byte{172, 16, byte(i >> 8), byte(i)})})
	}
	return peers
}

// BenchmarkPeerMemory reports what the prober keeps per peer at 5,000 and
// 10,000 peers: the peer records, the table and the ring.
func BenchmarkPeerMemory(b *testing.B) {
	for _, n := range []int{5000, 10000} {
		b.Run(strconv.Itoa(n), func(b *testing.B) {
			peers := benchPeers(n)
			var perPeer float64
			for range b.N {
				var before, after runtime.MemStats
				runtime.GC()
				runtime.ReadMemStats(&before)
				pr := New(Options{})
				r := pr.newRun()
				r.setView(view{path: vxlanPath, peers: peers}, time.Unix(0, 0))
				runtime.GC()
				runtime.ReadMemStats(&after)
				perPeer = float64(int64(after.HeapAlloc)-int64(before.HeapAlloc)) / float64(len(peers))
				runtime.KeepAlive(r)
			}
			b.ReportMetric(perPeer, "B/peer")
			b.ReportMetric(float64(unsafe.Sizeof(peer{})), "B/record")
		})
	}
}

// BenchmarkSetViewUnchanged is the prober's part of a resync at 10,000
// peers when no lease changed: setView with the set it holds.
func BenchmarkSetViewUnchanged(b *testing.B) {
	peers := benchPeers(10000)
	r := New(Options{}).newRun()
	now := time.Unix(0, 0)
	r.setView(view{path: vxlanPath, peers: peers}, now)
	b.ReportAllocs()
	for b.Loop() {
		r.setView(view{path: vxlanPath, peers: peers}, now)
	}
}

// TestProberNewSource: a new own lease (another source address) drops the
// probes out, which are not counted as losses, and waits for a new socket.
func TestProberNewSource(t *testing.T) {
	s := newSim(t, DefaultRate, vxlanPath, simPeers)
	s.c.drop = func(netip.Addr, int) bool { return true }
	s.r.pump(s.now) // two probes out (a rate gap apart), unanswered
	s.now = s.now.Add(time.Second / DefaultRate)
	s.r.pump(s.now)
	s.c.pending = s.c.pending[:0]
	if len(s.r.out) != 2 {
		t.Fatalf("%d probes out, want 2", len(s.r.out))
	}
	moved := vxlanPath
	moved.Source = netip.MustParseAddr("10.5.9.0")
	s.r.setView(view{path: moved, peers: simPeers}, s.now)
	if s.r.socks[0] != nil || len(s.r.out) != 0 || s.r.peer(simPeers[0].Subnet).has(inflight) {
		t.Fatalf("after a new source: socket %v, %d probes out", s.r.socks[0], len(s.r.out))
	}
	s.r.pump(s.now.Add(5 * time.Second))
	if p := s.r.peer(simPeers[0].Subnet); p.smallLoss != 0 {
		t.Errorf("the dropped probes counted %d losses", p.smallLoss)
	}
}

// TestProberTargetMoves: a path that stops being an overlay (host-gw
// after vxlan) moves every peer's target to its public address: the peers
// start again unprobed, and the probes and the report follow.
func TestProberTargetMoves(t *testing.T) {
	s := newSim(t, DefaultRate, vxlanPath, simPeers)
	s.run(time.Minute, nil)
	a := simPeers[0].Subnet
	if s.state(a) != Reachable || s.c.dsts[a.Addr()] == 0 {
		t.Fatalf("through vxlan: %v, %d probes to %s", s.state(a), s.c.dsts[a.Addr()], a.Addr())
	}
	hostgw := Path{Backend: "host-gw", MTU: 1500, Source: netip.MustParseAddr("172.30.0.1")}
	s.r.setView(view{path: hostgw, peers: simPeers}, s.now)
	s.r.socks = [2]conn{s.c, s.c} // the new source's socket
	if s.state(a) != Unprobed {
		t.Errorf("target moved: %v, want unprobed", s.state(a))
	}
	clear(s.c.dsts)
	s.run(time.Minute, nil)
	rep := s.r.report(s.now)
	if s.state(a) != Reachable || s.c.dsts[a.Addr()] != 0 || s.c.dsts[simPeers[0].PublicIP] == 0 || rep.Peers[0].Address != simPeers[0].PublicIP {
		t.Errorf("through host-gw: %v, probes %v, report %+v; want reachable, probed at the public addresses", s.state(a), s.c.dsts, rep.Peers)
	}
}
