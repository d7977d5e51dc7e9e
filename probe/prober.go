// Package probe tells whether this node reaches each of its peers through
// the data path it programmed, and checks the host for the usual reasons it
// does not: peer probes (ICMP echo through the overlay, small and full
// size), their states and report, and host checks (forwarding, the FORWARD
// policy, overlapping routes, a busy backend port, the interface MTU).
package probe

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"time"

	"k8s.io/klog/v2"
	"k8s.io/utils/clock"

	"github.com/flanneld-go/flanneld/internal/metrics"
	"github.com/flanneld-go/flanneld/subnet"
)

// DefaultRate is the default --peer-probe-rate.
const DefaultRate = 20

// DefaultTimeout is how long a probe waits for its answer.
const DefaultTimeout = time.Second

// Options configures a Prober. Each zero value has a documented default.
type Options struct {
	// Rate is the most probes sent per second (DefaultRate).
	Rate int
	// Timeout is how long a probe waits for its answer (DefaultTimeout).
	Timeout time.Duration
	// Clock is the time the prober runs on (the real clock).
	Clock clock.WithTicker
	// Logger receives one line per change of a peer's state.
	Logger *klog.Logger
}

// Prober probes the peers of one node. SetPeers hands it the admitted lease
// set; Run probes until its context ends; Report reads the states. Only
// Run's goroutine touches the peer table.
type Prober struct {
	o       Options
	log     klog.Logger
	mu      sync.Mutex
	view    *view // the latest SetPeers, not yet taken by Run
	wake    chan struct{}
	queries chan chan Report
	open    func(netip.Addr) (conn, error) // the socket (tests may replace it)
}

// conn is the ICMP socket as the prober uses it.
type conn interface {
	send(dst netip.Addr, seq uint16, size int) error
	read(buf []byte, now func() time.Time) (reply, error)
	close() error
}

type view struct {
	path  Path
	peers []Peer
}

// New returns a prober; it probes nothing until Run and SetPeers.
func New(o Options) *Prober {
	if o.Rate <= 0 {
		o.Rate = DefaultRate
	}
	if o.Timeout <= 0 {
		o.Timeout = DefaultTimeout
	}
	if o.Clock == nil {
		o.Clock = clock.RealClock{}
	}
	if o.Logger == nil {
		l := klog.Background()
		o.Logger = &l
	}
	return &Prober{o: o, log: *o.Logger, wake: make(chan struct{}, 1), queries: make(chan chan Report),
		open: func(src netip.Addr) (conn, error) { return openSocket(src) }}
}

// SetPeers makes peers the set probed along path. It never blocks: the
// latest set wins. peers is kept; the caller must not change it.
func (pr *Prober) SetPeers(path Path, peers []Peer) {
	pr.mu.Lock()
	pr.view = &view{path: path, peers: peers}
	pr.mu.Unlock()
	select {
	case pr.wake <- struct{}{}:
	default:
	}
}

// Report returns the state of every peer, or ctx's error if Run does not
// answer (it has not started or has ended).
func (pr *Prober) Report(ctx context.Context) (Report, error) {
	ch := make(chan Report, 1)
	select {
	case pr.queries <- ch:
	case <-ctx.Done():
		return Report{}, ctx.Err()
	}
	select {
	case r := <-ch:
		return r, nil
	case <-ctx.Done():
		return Report{}, ctx.Err()
	}
}

// outstanding is a probe waiting for its answer.
type outstanding struct {
	p        int32 // the peer's slot
	k        kind
	sent     time.Time
	deadline time.Time
}

// run is the state Run owns.
type run struct {
	pr      *Prober
	sched   *scheduler
	t       *table
	epoch   time.Time // the clock's time at the start: peers' times count from it
	parity  bool      // of the last setView (peer flag seen)
	path    Path
	socks   [2]conn   // IPv4, IPv6 (nil: none open)
	sockErr [2]string // the last error opening each, logged once
	seq     uint16
	out     map[uint16]outstanding
	order   []uint16 // seqs of out in send order (deadlines ascending)
	counts  [numStates]int
	notOK   notReachable
}

// Run probes the peers until ctx ends, then returns nil.
func (pr *Prober) Run(ctx context.Context) error {
	clk := pr.o.Clock
	r := pr.newRun()
	replies := make(chan reply, 64)
	var wg sync.WaitGroup
	defer func() {
		for _, s := range r.socks {
			if s != nil {
				s.close()
			}
		}
		wg.Wait()
		r.notOK.clear()
	}()
	r.publishCounts()
	var timer <-chan time.Time
	var retryOpen time.Time
	for {
		now := clk.Now()
		missing := false
		for fam, src := range r.path.sources() {
			if r.socks[fam] == nil && src.IsValid() {
				if !now.Before(retryOpen) && r.openSocket(ctx, &wg, replies, fam, src) == nil {
					continue
				}
				missing = true
			}
		}
		if missing && !now.Before(retryOpen) {
			retryOpen = now.Add(MinRound)
		}
		wait := r.pump(now)
		if missing && (wait <= 0 || retryOpen.Sub(now) < wait) {
			wait = retryOpen.Sub(now)
		}
		if again := r.notOK.refresh(r, now); again > 0 && (wait <= 0 || again < wait) {
			wait = again
		}
		timer = nil
		if wait > 0 {
			timer = clk.After(wait)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-pr.wake:
			pr.mu.Lock()
			v := pr.view
			pr.view = nil
			pr.mu.Unlock()
			if v != nil {
				r.setView(*v, clk.Now())
			}
		case rep := <-replies:
			r.answered(rep)
		case <-timer:
		case q := <-pr.queries:
			q <- r.report(clk.Now())
		}
	}
}

func (pr *Prober) newRun() *run {
	t := newTable()
	return &run{pr: pr, t: t, sched: newScheduler(pr.o.Rate, t), epoch: pr.o.Clock.Now(), out: map[uint16]outstanding{}}
}

// mono and wall convert between the clock's times and peers' times.
func (r *run) mono(t time.Time) mono { return mono(t.Sub(r.epoch)) }
func (r *run) wall(m mono) time.Time { return r.epoch.Add(time.Duration(m)) }

func (r *run) openSocket(ctx context.Context, wg *sync.WaitGroup, replies chan<- reply, fam int, src netip.Addr) error {
	s, err := r.pr.open(src)
	if err != nil {
		if msg := err.Error(); msg != r.sockErr[fam] {
			r.sockErr[fam] = msg
			r.pr.log.Info("Peer probes cannot start; retrying", "source", src, "err", msg)
		}
		return err
	}
	r.sockErr[fam] = ""
	r.socks[fam] = s
	clk := r.pr.o.Clock
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 1<<16)
		for {
			rep, err := s.read(buf, clk.Now)
			if err != nil {
				return
			}
			select {
			case replies <- rep:
			case <-ctx.Done():
				return
			}
		}
	}()
	return nil
}

// setView replaces the peer set (and the path, reopening the socket on a
// new source address). It diffs in place: the peers of v are marked seen
// with this call's parity, and those left unmarked are removed; it
// allocates nothing when the set did not change.
func (r *run) setView(v view, now time.Time) {
	if v.path.sources() != r.path.sources() {
		// A new lease: the probes out were sent from the old address and
		// their answers will not come; they count for nothing.
		for fam, s := range r.socks {
			if s != nil && v.path.sources()[fam] != r.path.sources()[fam] {
				s.close()
				r.socks[fam] = nil
			}
		}
		for _, o := range r.out {
			r.t.peers[o.p].set(inflight, false)
			r.t.release(o.p)
		}
		clear(r.out)
		r.order = nil
	}
	r.path = v.path
	t := r.t
	wasOverlay := t.overlay
	t.overlay = v.path.Overlay()
	counts := r.counts
	r.parity = !r.parity
	at := r.mono(now)
	if len(v.peers) > cap(t.peers) {
		// The first set (or a much larger one): one allocation of its size.
		t.peers = slices.Grow(t.peers, len(v.peers)-len(t.peers))
	}
	for _, np := range v.peers {
		k := subnet.KeyOf(np.Subnet)
		if i := t.lookup(k); i >= 0 {
			p := &t.peers[i]
			p.set(seen, r.parity)
			if was := t.targetAlong(i, wasOverlay); t.public(i) != np.PublicIP || v.path.target(np.Subnet, np.PublicIP) != was {
				t.setPublic(i, np.PublicIP)
				r.setState(i, Unprobed, now)
				p.smallLoss, p.bigLoss = 0, 0
				p.set(replied|smallOK, false)
				if !p.has(answered) {
					p.from = at
				}
				r.sched.urgent(i, small)
			}
			continue
		}
		i := t.add(peer{key: k, since: at, from: at})
		t.peers[i].set(seen, r.parity)
		t.setPublic(i, np.PublicIP)
		r.counts[Unprobed]++
		r.sched.add(i)
	}
	for i := range t.peers {
		if p := &t.peers[i]; !p.has(gone) && p.has(seen) != r.parity {
			r.counts[p.state]--
			r.sched.remove(int32(i))
			r.notOK.dirty = true
		}
	}
	t.shrink()
	if r.counts != counts {
		r.publishCounts()
	}
}

// pump expires the probes past their deadline and sends what the budget
// allows now; it returns how long until something is due (0: nothing).
func (r *run) pump(now time.Time) time.Duration {
	for len(r.order) > 0 {
		seq := r.order[0]
		o, ok := r.out[seq]
		if ok && now.Before(o.deadline) {
			break
		}
		r.order = r.order[1:]
		if ok {
			delete(r.out, seq)
			r.done(o.p, o.k, false, 0, now)
		}
	}
	if len(r.order) == 0 {
		r.order = nil
	}
	var wait time.Duration
	if r.socks[0] != nil || r.socks[1] != nil {
		for {
			i, k, w := r.sched.next(now)
			if i < 0 {
				wait = w
				break
			}
			r.send(i, k, now)
		}
	}
	if len(r.order) > 0 {
		if d := r.out[r.order[0]].deadline.Sub(now); wait == 0 || d < wait {
			wait = max(d, time.Nanosecond)
		}
	}
	return wait
}

func (r *run) send(i int32, k kind, now time.Time) {
	size := smallSize
	if k == big {
		size = r.path.MTU
	}
	metrics.PeerProbes.WithLabelValues(k.String()).Inc()
	r.seq++
	for _, taken := r.out[r.seq]; taken; _, taken = r.out[r.seq] {
		r.seq++
	}
	target := r.t.target(i)
	s := r.socks[family(target)]
	if s == nil {
		return // no socket of its family (yet): it waits for the next round
	}
	if err := s.send(target, r.seq, size); err != nil {
		// EMSGSIZE for a full-size probe: a path MTU below FLANNEL_MTU is
		// known already. Either way the probe is lost.
		r.done(i, k, false, 0, now)
		return
	}
	r.t.peers[i].set(inflight, true)
	r.out[r.seq] = outstanding{p: i, k: k, sent: now, deadline: now.Add(r.pr.o.Timeout)}
	r.order = append(r.order, r.seq)
}

func (r *run) answered(rep reply) {
	o, ok := r.out[rep.seq]
	if !ok || r.t.target(o.p) != rep.from {
		return
	}
	delete(r.out, rep.seq)
	rtt := max(rep.at.Sub(o.sent), 0)
	metrics.PeerProbeRTT.Observe(rtt.Seconds())
	r.done(o.p, o.k, true, rtt, rep.at)
}

// done records the outcome of one probe of slot i and asks for the next
// probe it needs soon: a loss to confirm, or a full-size probe to check the
// MTU of a newly answering peer.
func (r *run) done(i int32, k kind, ok bool, rtt time.Duration, now time.Time) {
	p := &r.t.peers[i]
	p.set(inflight, false)
	if p.has(gone) {
		r.t.release(i)
		return
	}
	was := p.state
	state := p.result(k, ok, rtt, r.mono(now))
	switch {
	case !ok && k == small && p.smallLoss < LossThreshold:
		r.sched.urgent(i, small)
	case !ok && k == big && p.bigLoss < BigLossThreshold:
		r.sched.urgent(i, small) // then a full-size one again, below
	case ok && k == small && p.bigLoss > 0 && p.bigLoss < BigLossThreshold:
		r.sched.urgent(i, big)
	case ok && was == Unprobed:
		r.sched.urgent(i, big)
	}
	if state != was {
		r.setState(i, state, now)
		r.logChange(i, was, now)
	}
}

func (r *run) setState(i int32, s State, now time.Time) {
	p := &r.t.peers[i]
	if p.state == s {
		return
	}
	if !p.has(gone) {
		r.counts[p.state]--
		r.counts[s]++
	}
	p.state, p.since = s, r.mono(now)
	r.notOK.dirty = true
	r.publishCounts()
}

func (r *run) publishCounts() {
	for _, s := range States {
		metrics.Peers.WithLabelValues(s.String()).Set(float64(r.counts[s]))
	}
}

// logChange writes the one line of a change of state.
func (r *run) logChange(i int32, was State, now time.Time) {
	r.pr.log.Info(r.describe(i, was, now), "subnet", r.t.subnet(i), "publicIP", r.t.public(i), "state", r.t.peers[i].state)
}

// describe is the sentence for slot i's state.
func (r *run) describe(i int32, was State, now time.Time) string {
	p, path, public := &r.t.peers[i], r.path, r.t.public(i)
	head := fmt.Sprintf("peer %s (%s)", r.t.subnet(i), public)
	switch p.state {
	case Unreachable:
		return fmt.Sprintf("%s unreachable over %s for %d s: %s", head, path.Backend, int(time.Duration(r.mono(now)-p.from).Round(time.Second)/time.Second), path.Remedy(public.Is6()))
	case MTUBlackhole:
		return fmt.Sprintf("%s has an MTU black hole over %s: %d-byte probes pass, %d-byte probes with DF set are lost: %s",
			head, path.Backend, smallSize, path.MTU, mtuRemedy(path, public.Is6()))
	case Reachable:
		again := ""
		if was == Unreachable || was == MTUBlackhole {
			again = " again"
		}
		return fmt.Sprintf("%s reachable%s over %s (rtt %s)", head, again, path.Backend, time.Duration(p.rtt).Round(time.Microsecond))
	}
	return head + " " + p.state.String()
}

// Overhead is the bytes a backend adds to each packet on an IPv4 underlay.
func Overhead(backend string) int {
	switch backend {
	case "vxlan":
		return 50
	case "udp":
		return 28
	case "wireguard":
		return 80
	}
	return 0
}

// overhead6 is Overhead on an IPv6 underlay.
func overhead6(backend string) int {
	switch backend {
	case "vxlan":
		return 70
	case "udp":
		return 48
	}
	return Overhead(backend)
}

// mtuRemedy says what to change for a black hole; underlay6 is whether
// the encapsulated packets travel over IPv6.
func mtuRemedy(path Path, underlay6 bool) string {
	o := Overhead(path.Backend)
	if underlay6 {
		o = overhead6(path.Backend)
	}
	need := path.MTU + o
	if o > 0 {
		return fmt.Sprintf("the underlay between the hosts drops packets of %d bytes (FLANNEL_MTU %d + %d bytes of %s encapsulation); "+
			"set the external interface's MTU to what the path carries (FLANNEL_MTU follows it on restart) or fix the link or firewall that drops large packets",
			need, path.MTU, o, path.Backend)
	}
	return fmt.Sprintf("the path between the hosts drops packets of %d bytes; set the MTU of the hosts' interfaces to what the path carries or fix the link that drops large packets", need)
}
