package agent

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/flanneld-go/flanneld/backend"
	_ "github.com/flanneld-go/flanneld/backend/hostgw"
	"github.com/flanneld-go/flanneld/backend/kwatch"
	"github.com/flanneld-go/flanneld/internal/metrics"
	"github.com/flanneld-go/flanneld/internal/nstest"
	"github.com/flanneld-go/flanneld/pkg/nlbatch"
)

// hostGWNode is a host-gw node's world: a namespace with eth0
// (10.250.0.1/24, its external interface), and etcd with the network
// config and a remote lease 10.5.77.0/24 via 10.250.0.2.
type hostGWNode struct {
	ns   *nstest.NS
	eth0 netlink.Link
	l    *lab
	dst  *net.IPNet // the remote lease's subnet
}

func newHostGWNode(t *testing.T, prefix string) *hostGWNode {
	ns := nstest.New(t, prefix)
	eth0 := ns.Veth(t, "eth0", 0, nil, "eth0p", "10.250.0.1/24")
	l := newLab(t)
	l.set("config", `{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}`, 0)
	l.set("subnets/10.5.77.0-24", `{"PublicIP":"10.250.0.2","BackendType":"host-gw"}`, time.Hour)
	return &hostGWNode{ns: ns, eth0: eth0, l: l, dst: &net.IPNet{IP: net.IPv4(10, 5, 77, 0).To4(), Mask: net.CIDRMask(24, 32)}}
}

// ext is eth0 as the external interface, its address published.
func (n *hostGWNode) ext() backend.ExternalInterface {
	a := n.eth0.Attrs()
	addr := netip.MustParseAddr("10.250.0.1")
	return backend.ExternalInterface{Iface: &net.Interface{Index: a.Index, MTU: a.MTU, Name: a.Name, HardwareAddr: a.HardwareAddr},
		IfaceAddr: addr, PublicIP: addr}
}

// routed reports whether the namespace routes the remote lease via its
// PublicIP.
func (n *hostGWNode) routed() bool {
	rs, err := n.ns.NL.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Dst: n.dst}, netlink.RT_FILTER_DST)
	return err == nil && len(rs) == 1 && rs[0].Gw.Equal(net.IPv4(10, 250, 0, 2))
}

// reconcileCauses are the labels of metrics.Reconciles.
func reconcileCauses() []string {
	cs := []string{"start", "leases", "lease", "resync", "retry"}
	for _, c := range kwatch.Causes {
		cs = append(cs, string(c))
	}
	return cs
}

// reconcileCounts reads metrics.Reconciles by cause.
func reconcileCounts() map[string]uint64 {
	m := map[string]uint64{}
	for _, c := range reconcileCauses() {
		m[c] = metrics.Reconciles.WithLabelValues(c).Get()
	}
	return m
}

// since is what grew from before to now, by cause.
func since(before map[string]uint64) map[string]uint64 {
	d := map[string]uint64{}
	for c, n := range reconcileCounts() {
		if n > before[c] {
			d[c] = n - before[c]
		}
	}
	return d
}

// TestRepairOnKernelEvents runs the real host-gw backend in a network
// namespace with kernel events watched and the resync an hour away: a
// deleted route and the routes eth0 loses when it goes down and up come
// back at once, and so does the route pointed at another gateway; 10,000
// routes into Network deleted at once cost a few reconciles; and the daemon left alone reconciles nothing, before and
// after (its own writes do not call for more).
func TestRepairOnKernelEvents(t *testing.T) {
	n := newHostGWNode(t, "fldrp")
	ns, eth0, a, routed := n.ns, n.eth0, n.eth0.Attrs(), n.routed
	other := ns.Veth(t, "other", 0, nil, "otherp", "192.168.99.1/24")
	// The daemon's handle; the test writes with its own.
	nl, err := nlbatch.NewHandleAt(ns.Handle)
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	r := n.l.start(Options{Netlink: nl, KernelEvents: &ns.Handle, RouteResync: time.Hour, Ext: n.ext()})
	r.waitReady(t)
	dst := n.dst
	eventually(t, "the route to the remote lease", routed)

	idle := func(what string) {
		t.Helper()
		time.Sleep(200 * time.Millisecond) // what is still due
		before := reconcileCounts()
		time.Sleep(3 * time.Second)
		if d := since(before); len(d) > 0 {
			t.Errorf("%s: idle for 3 s, the daemon reconciled %v, want nothing", what, d)
		}
	}
	idle("after the start")

	// by checks that what makes route come back is a reconcile of cause.
	by := func(what, cause string, edit func() error) {
		t.Helper()
		before := reconcileCounts()
		if err := edit(); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		eventually(t, "the route back after "+what, routed)
		eventually(t, fmt.Sprintf("a reconcile of cause %s after %s", cause, what), func() bool { return since(before)[cause] > 0 })
	}
	by("deleting the route", string(kwatch.RouteDeleted), func() error {
		return ns.NL.RouteDel(&netlink.Route{Dst: dst, LinkIndex: a.Index})
	})
	by("pointing the route at another gateway", string(kwatch.RouteChanged), func() error {
		time.Sleep(2 * kwatch.EchoWindow) // an edit right after the daemon's own writes passes for their echo
		return ns.NL.ReplaceRoutes([]nlbatch.Route{{Dst: netip.MustParsePrefix("10.5.77.0/24"), Gw: netip.MustParseAddr("10.250.0.99"), LinkIndex: a.Index}}, nil)
	})
	by("eth0 down and up", string(kwatch.ExtChanged), func() error {
		if err := ns.NL.LinkSetDown(eth0); err != nil {
			return err
		}
		if routed() {
			return fmt.Errorf("the route is still there with eth0 down")
		}
		return ns.NL.LinkSetUp(eth0)
	})
	idle("after the repairs")

	// A storm: 10,000 routes into Network (not the backend's: through
	// another link) deleted at once.
	storm := make([]nlbatch.Route, 10000)
	for i := range storm {
		storm[i] = nlbatch.Route{Dst: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 5, 100 + byte(i>>8), byte(i)}), 32),
			Gw: netip.MustParseAddr("192.168.99.2"), LinkIndex: other.Attrs().Index}
	}
	// settled waits until the reconcile count stays put for a second (the
	// daemon reads the notifications at its own pace, slowly under the
	// race detector) and returns what grew since before.
	settled := func(before map[string]uint64) map[string]uint64 {
		d, deadline := since(before), time.Now().Add(time.Minute)
		for time.Now().Before(deadline) {
			time.Sleep(time.Second)
			now := since(before)
			if fmt.Sprint(now) == fmt.Sprint(d) {
				break
			}
			d = now
		}
		return d
	}
	before := reconcileCounts()
	if err := ns.NL.ReplaceRoutes(storm, nil); err != nil {
		t.Fatal(err)
	}
	t.Logf("10,000 routes added at once (by someone else): reconciles %v", settled(before))
	before = reconcileCounts()
	if err := ns.NL.DeleteRoutes(storm, nil); err != nil {
		t.Fatal(err)
	}
	d := settled(before)
	total := uint64(0)
	for _, n := range d {
		total += n
	}
	t.Logf("10,000 routes deleted at once: %d reconciles %v", total, d)
	if total < 1 || total > 50 {
		t.Errorf("10,000 routes deleted at once: %d reconciles %v, want a few (at least one, not thousands)", total, d)
	}
	if !routed() {
		t.Error("the route to the remote lease is gone after the storm")
	}
	idle("after the storm")
}

// TestRepairSchedule steps the repair plan on a fake clock: an event plans
// a repair 5 ms later, each further one postpones it by 5 ms but never past
// 250 ms after the first; after a failed Apply a retry follows (100 ms,
// doubling up to the limit) and deletions wait at least that long, link
// changes not; a success ends it.
func TestRepairSchedule(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	const delay, limit, first, resync = 5 * time.Millisecond, 250 * time.Millisecond, 100 * time.Millisecond, time.Second
	var r repairState
	fired := func(c <-chan time.Time) bool {
		select {
		case <-c:
			return true
		default:
			return false
		}
	}
	// due steps the clock by d and reports whether the planned repair is due.
	due := func(d time.Duration) bool {
		clk.Step(d)
		return fired(r.timer)
	}

	r.schedule(clk, kwatch.RouteDeleted, delay, limit)
	if due(4*time.Millisecond) || !due(time.Millisecond) || r.cause != string(kwatch.RouteDeleted) {
		t.Fatalf("one event: not due 5 ms later (cause %q)", r.cause)
	}
	r.applied(clk, nil, first, resync)

	// A stream of events every 4 ms: postponed, but due 250 ms after the first.
	r.schedule(clk, kwatch.NeighDeleted, delay, limit)
	elapsed := time.Duration(0)
	for ; elapsed < time.Second; elapsed += 4 * time.Millisecond {
		if due(4 * time.Millisecond) {
			break
		}
		r.schedule(clk, kwatch.RouteDeleted, delay, limit)
	}
	if elapsed+4*time.Millisecond > limit+delay || elapsed < limit-2*delay || r.cause != string(kwatch.NeighDeleted) {
		t.Errorf("a stream of events: due after %v (cause %q), want about %v, cause the first event's", elapsed+4*time.Millisecond, r.cause, limit)
	}

	// Failures: retries after 100, 200, 400 ms, ... at most a second.
	for _, want := range []time.Duration{100, 200, 400, 800, 1000, 1000} {
		r.applied(clk, errors.New("failed"), first, resync)
		clk.Step(want*time.Millisecond - time.Millisecond)
		if fired(r.retry) {
			t.Fatalf("retry before %v ms", want)
		}
		clk.Step(time.Millisecond)
		if !fired(r.retry) {
			t.Fatalf("no retry after %v ms", want)
		}
	}
	// Meanwhile a deletion waits for the back-off, a link change does not.
	r.schedule(clk, kwatch.NeighDeleted, delay, limit)
	if due(delay) {
		t.Error("a deletion while Apply fails: due after 5 ms, want the back-off")
	}
	r.applied(clk, errors.New("failed"), first, resync)
	r.schedule(clk, kwatch.LinkChanged, delay, limit)
	if !due(delay) {
		t.Error("a link change while Apply fails: not due after 5 ms")
	}
	r.applied(clk, nil, first, resync)
	if r.retry != nil || r.timer != nil || r.wait != 0 {
		t.Errorf("after a success: retry %v, timer %v, wait %v; want nothing planned", r.retry, r.timer, r.wait)
	}
	r.schedule(clk, kwatch.NeighDeleted, delay, limit)
	if !due(delay) {
		t.Error("a deletion after a success: not due after 5 ms")
	}
}
