package backend

import (
	"errors"
	"fmt"
	"hash/fnv"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/pkg/nlbatch"
)

// fakeRoutes is a kernel routing table, enough of it for the reconciler:
// routes are keyed as the kernel keys them for replace (table, dst, tos,
// metric); delete matches the attributes it is given.
type fakeRoutes struct {
	routes map[fakeKey]netlink.Route
	names  map[int]string // link index -> name, for dumps

	record    bool     // log mutating calls in calls
	calls     []string // "replace ..." / "del ..."
	dumps     int
	interrupt int                    // dumps still to report as interrupted
	dumpErr   error                  // error of every dump
	failSet   map[netip.Prefix]error // RouteReplace errors by dst
	failDel   map[netip.Prefix]error // RouteDel errors by dst
}

type fakeKey struct {
	dst             netip.Prefix
	table, tos, pri int
}

func newFakeRoutes() *fakeRoutes {
	return &fakeRoutes{
		routes: map[fakeKey]netlink.Route{},
		names:  map[int]string{1: "lo", 2: "eth0", 3: "eth1", 4: "cni0", 5: "flannel.1"},
		record: true,
	}
}

func fakeKeyOf(r *netlink.Route) fakeKey {
	dst, _ := ip.FromIPNet(r.Dst)
	table := r.Table
	if table == 0 {
		table = unix.RT_TABLE_MAIN
	}
	return fakeKey{dst, table, r.Tos, r.Priority}
}

// add puts a route in the table as the kernel would report it, bypassing
// the call log: the state the test starts from or an admin's change.
func (f *fakeRoutes) add(s string) {
	r := parseFakeRoute(s, f.names)
	f.routes[fakeKeyOf(&r)] = r
}

func (f *fakeRoutes) RouteListFilteredIter(family int, filter *netlink.Route, mask uint64, fn func(netlink.Route) bool) error {
	f.dumps++
	if f.dumpErr != nil {
		return f.dumpErr
	}
	for _, r := range f.routes {
		if (r.Dst.IP.To4() != nil) != (family == netlink.FAMILY_V4) {
			continue
		}
		if mask&netlink.RT_FILTER_TABLE != 0 {
			if r.Table != filter.Table {
				continue
			}
		} else if r.Table != unix.RT_TABLE_MAIN {
			continue
		}
		if mask&netlink.RT_FILTER_OIF != 0 && r.LinkIndex != filter.LinkIndex {
			continue
		}
		if !fn(r) {
			break
		}
	}
	if f.interrupt > 0 {
		f.interrupt--
		return netlink.ErrDumpInterrupted
	}
	return nil
}

func (f *fakeRoutes) RouteReplace(r *netlink.Route) error {
	if f.record {
		f.calls = append(f.calls, "replace "+f.format(r))
	}
	k := fakeKeyOf(r)
	if err := f.failSet[k.dst]; err != nil {
		return err
	}
	c := *r
	c.Dst = ip.IPNet(k.dst)
	c.Table = k.table
	c.Type = unix.RTN_UNICAST
	c.Protocol = unix.RTPROT_BOOT
	f.routes[k] = c
	return nil
}

// ListRoutes is the dump ListRoutes makes, through RouteListFilteredIter.
func (f *fakeRoutes) ListRoutes(fn func(*nlbatch.Route) bool) error {
	return f.RouteListFilteredIter(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE, func(r netlink.Route) bool {
		e := nlbatch.RouteOf(&r)
		return fn(&e)
	})
}

// ListRoutes6 is ListRoutes for the IPv6 routes.
func (f *fakeRoutes) ListRoutes6(fn func(*nlbatch.Route) bool) error {
	return f.RouteListFilteredIter(netlink.FAMILY_V6, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE, func(r netlink.Route) bool {
		e := nlbatch.RouteOf(&r)
		return fn(&e)
	})
}

// The fake models no nexthop objects.
func (f *fakeRoutes) ReplaceNexthops([]nlbatch.Nexthop, []error) error { return unix.EOPNOTSUPP }
func (f *fakeRoutes) DeleteNexthops([]uint32, []error) error           { return unix.EOPNOTSUPP }

// ReplaceRoutes and DeleteRoutes are the batched calls, one route at a time.
func (f *fakeRoutes) ReplaceRoutes(rs []nlbatch.Route, errs []error) error {
	for i := range rs {
		errs[i] = f.RouteReplace(rs[i].Netlink())
	}
	return nil
}

func (f *fakeRoutes) DeleteRoutes(rs []nlbatch.Route, errs []error) error {
	for i := range rs {
		errs[i] = f.RouteDel(rs[i].Netlink())
	}
	return nil
}

func (f *fakeRoutes) RouteDel(r *netlink.Route) error {
	if f.record {
		f.calls = append(f.calls, "del "+f.format(r))
	}
	k := fakeKeyOf(r)
	if err := f.failDel[k.dst]; err != nil {
		return err
	}
	match := func(c netlink.Route) bool {
		return (r.Gw == nil || r.Gw.Equal(c.Gw)) && (r.LinkIndex == 0 || r.LinkIndex == c.LinkIndex)
	}
	if c, ok := f.routes[k]; ok && match(c) {
		delete(f.routes, k)
		return nil
	}
	if k.pri == 0 { // the kernel treats metric 0 as "any"
		for ck, c := range f.routes {
			if ck.dst == k.dst && ck.table == k.table && ck.tos == k.tos && match(c) {
				delete(f.routes, ck)
				return nil
			}
		}
	}
	return unix.ESRCH
}

// format renders a route like ip-route, with the fields the tests set.
func (f *fakeRoutes) format(r *netlink.Route) string {
	var b strings.Builder
	if dst, _ := ip.FromIPNet(r.Dst); dst.Bits() == 0 {
		b.WriteString("default")
	} else {
		b.WriteString(dst.String())
	}
	if r.Gw != nil {
		fmt.Fprintf(&b, " via %s", r.Gw)
	}
	if r.LinkIndex != 0 {
		name := f.names[r.LinkIndex]
		if name == "" {
			name = fmt.Sprint(r.LinkIndex)
		}
		fmt.Fprintf(&b, " dev %s", name)
	}
	if r.Flags&int(netlink.FLAG_ONLINK) != 0 {
		b.WriteString(" onlink")
	}
	if r.Protocol == unix.RTPROT_KERNEL {
		b.WriteString(" proto kernel")
	}
	if r.Scope == unix.RT_SCOPE_LINK {
		b.WriteString(" scope link")
	}
	if r.Priority != 0 {
		fmt.Fprintf(&b, " metric %d", r.Priority)
	}
	if r.Table != 0 && r.Table != unix.RT_TABLE_MAIN {
		fmt.Fprintf(&b, " table %d", r.Table)
	}
	if r.Type == unix.RTN_BLACKHOLE {
		b.WriteString(" blackhole")
	}
	return b.String()
}

// dump is the whole table, sorted, one route a line.
func (f *fakeRoutes) dump() string {
	var lines []string
	for _, r := range f.routes {
		lines = append(lines, f.format(&r))
	}
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}

func (f *fakeRoutes) takeCalls() string {
	slices.Sort(f.calls)
	s := strings.Join(f.calls, "\n")
	f.calls = nil
	return s
}

// parseFakeRoute reads the format of fakeRoutes.format.
func parseFakeRoute(s string, names map[int]string) netlink.Route {
	w := strings.Fields(s)
	r := netlink.Route{Table: unix.RT_TABLE_MAIN, Type: unix.RTN_UNICAST, Protocol: unix.RTPROT_BOOT}
	var dst netip.Prefix
	if w[0] == "default" {
		dst = netip.MustParsePrefix("0.0.0.0/0")
	} else {
		dst = netip.MustParsePrefix(w[0])
	}
	r.Dst = ip.IPNet(dst)
	for i := 1; i < len(w); i++ {
		switch w[i] {
		case "via":
			i++
			r.Gw = ip.IP(netip.MustParseAddr(w[i]))
		case "dev":
			i++
			for idx, n := range names {
				if n == w[i] {
					r.LinkIndex = idx
				}
			}
			if r.LinkIndex == 0 {
				panic("fake: unknown link " + w[i])
			}
		case "onlink":
			r.Flags |= int(netlink.FLAG_ONLINK)
		case "proto":
			i++
			r.Protocol = unix.RTPROT_KERNEL
		case "scope":
			i++
			r.Scope = unix.RT_SCOPE_LINK
		case "metric":
			i++
			fmt.Sscan(w[i], &r.Priority)
		case "table":
			i++
			fmt.Sscan(w[i], &r.Table)
		case "blackhole":
			r.Type = unix.RTN_BLACKHOLE
		default:
			panic("fake: cannot parse " + s)
		}
	}
	return r
}

func mustRoute(dst, gw string, link int, onlink bool) nlbatch.Route {
	return nlbatch.Route{Dst: netip.MustParsePrefix(dst), Gw: netip.MustParseAddr(gw), LinkIndex: link, Onlink: onlink}
}

const (
	eth0   = 2
	eth1   = 3
	cni0   = 4
	flannl = 5
)

var (
	testNet = netip.MustParsePrefix("10.5.0.0/16")
	testOwn = netip.MustParsePrefix("10.5.1.0/24")
)

// foreign is the part of the table the reconciler must never touch.
var foreign = []string{
	"default via 192.168.1.254 dev eth0",
	"192.168.1.0/24 dev eth0 proto kernel scope link",
	"10.5.0.0/16 via 192.168.1.254 dev eth0",         // the whole Network
	"172.16.1.0/24 via 192.168.1.7 dev eth0",         // outside Network
	"10.5.8.0/24 via 10.0.0.8 dev eth1",              // another link
	"10.5.1.0/24 dev cni0 proto kernel scope link",   // own subnet, connected
	"10.5.1.0/25 via 192.168.1.1 dev eth0",           // inside own subnet
	"10.5.7.0/24 dev eth0 scope link",                // no gateway
	"10.5.6.0/24 via 192.168.1.6 dev eth0 table 100", // another table
	"10.5.4.0/24 dev eth0 blackhole",                 // not unicast
}

// TestReconcileStates drives one reconciler through a sequence of desired
// sets against one fake kernel, checking the calls made and the whole table
// after each step.
func TestReconcileStates(t *testing.T) {
	f := newFakeRoutes()
	for _, s := range foreign {
		f.add(s)
	}
	// Left over from before a restart: leases that went away.
	f.add("10.5.9.0/24 via 192.168.1.9 dev eth0")
	f.add("10.5.10.0/24 via 10.5.10.0 dev flannel.1 onlink")
	f.add("10.5.5.0/24 via 192.168.1.5 dev eth0 metric 100")

	r := NewRouteReconciler(f, testNet, eth0, flannl)
	steps := []struct {
		name      string
		hand      func() // the admin's doing, before the step
		desired   []nlbatch.Route
		wantCalls string
		want      Changes
		wantOurs  string // the table minus the foreign routes
	}{
		{
			name: "first reconcile adds and removes stale routes",
			desired: []nlbatch.Route{
				mustRoute("10.5.2.0/24", "192.168.1.2", eth0, false),
				mustRoute("10.5.3.0/24", "192.168.1.3", eth0, false),
			},
			wantCalls: `del 10.5.10.0/24 via 10.5.10.0 dev flannel.1 onlink
del 10.5.5.0/24 via 192.168.1.5 dev eth0 metric 100
del 10.5.9.0/24 via 192.168.1.9 dev eth0
replace 10.5.2.0/24 via 192.168.1.2 dev eth0
replace 10.5.3.0/24 via 192.168.1.3 dev eth0`,
			want: Changes{Added: 2, Removed: 3},
			wantOurs: `10.5.2.0/24 via 192.168.1.2 dev eth0
10.5.3.0/24 via 192.168.1.3 dev eth0`,
		},
		{
			name: "same set again changes nothing",
			desired: []nlbatch.Route{
				mustRoute("10.5.3.0/24", "192.168.1.3", eth0, false),
				mustRoute("10.5.2.0/24", "192.168.1.2", eth0, false),
			},
			wantOurs: `10.5.2.0/24 via 192.168.1.2 dev eth0
10.5.3.0/24 via 192.168.1.3 dev eth0`,
		},
		{
			name: "changed gateway is replaced",
			desired: []nlbatch.Route{
				mustRoute("10.5.2.0/24", "192.168.1.2", eth0, false),
				mustRoute("10.5.3.0/24", "192.168.1.33", eth0, false),
			},
			wantCalls: "replace 10.5.3.0/24 via 192.168.1.33 dev eth0",
			want:      Changes{Updated: 1},
			wantOurs: `10.5.2.0/24 via 192.168.1.2 dev eth0
10.5.3.0/24 via 192.168.1.33 dev eth0`,
		},
		{
			name: "route moves to another link, onlink",
			desired: []nlbatch.Route{
				mustRoute("10.5.2.0/24", "192.168.1.2", eth0, false),
				mustRoute("10.5.3.0/24", "10.5.3.0", flannl, true),
			},
			wantCalls: "replace 10.5.3.0/24 via 10.5.3.0 dev flannel.1 onlink",
			want:      Changes{Updated: 1},
			wantOurs: `10.5.2.0/24 via 192.168.1.2 dev eth0
10.5.3.0/24 via 10.5.3.0 dev flannel.1 onlink`,
		},
		{
			name: "route deleted by hand comes back",
			hand: func() { delete(f.routes, fakeKey{netip.MustParsePrefix("10.5.2.0/24"), unix.RT_TABLE_MAIN, 0, 0}) },
			desired: []nlbatch.Route{
				mustRoute("10.5.2.0/24", "192.168.1.2", eth0, false),
				mustRoute("10.5.3.0/24", "10.5.3.0", flannl, true),
			},
			wantCalls: "replace 10.5.2.0/24 via 192.168.1.2 dev eth0",
			want:      Changes{Added: 1},
			wantOurs: `10.5.2.0/24 via 192.168.1.2 dev eth0
10.5.3.0/24 via 10.5.3.0 dev flannel.1 onlink`,
		},
		{
			name: "route changed by hand is put back",
			hand: func() { f.add("10.5.2.0/24 via 192.168.1.99 dev eth0") },
			desired: []nlbatch.Route{
				mustRoute("10.5.2.0/24", "192.168.1.2", eth0, false),
				mustRoute("10.5.3.0/24", "10.5.3.0", flannl, true),
			},
			wantCalls: "replace 10.5.2.0/24 via 192.168.1.2 dev eth0",
			want:      Changes{Updated: 1},
			wantOurs: `10.5.2.0/24 via 192.168.1.2 dev eth0
10.5.3.0/24 via 10.5.3.0 dev flannel.1 onlink`,
		},
		{
			name:      "lease removed",
			desired:   []nlbatch.Route{mustRoute("10.5.3.0/24", "10.5.3.0", flannl, true)},
			wantCalls: "del 10.5.2.0/24 via 192.168.1.2 dev eth0",
			want:      Changes{Removed: 1},
			wantOurs:  "10.5.3.0/24 via 10.5.3.0 dev flannel.1 onlink",
		},
		{
			name:      "no leases",
			desired:   nil,
			wantCalls: "del 10.5.3.0/24 via 10.5.3.0 dev flannel.1 onlink",
			want:      Changes{Removed: 1},
		},
		{
			name: "empty again",
		},
	}
	for _, st := range steps {
		if st.hand != nil {
			st.hand()
		}
		dumps := f.dumps
		got, err := r.Reconcile(testOwn, st.desired)
		if err != nil {
			t.Fatalf("%s: Reconcile: %v", st.name, err)
		}
		if f.dumps != dumps+1 {
			t.Errorf("%s: %d dumps, want 1", st.name, f.dumps-dumps)
		}
		if got != st.want {
			t.Errorf("%s: changes = %+v, want %+v", st.name, got, st.want)
		}
		if calls := f.takeCalls(); calls != st.wantCalls {
			t.Errorf("%s: calls:\n%s\nwant:\n%s", st.name, calls, st.wantCalls)
		}
		if ours := oursOf(t, f); ours != st.wantOurs {
			t.Errorf("%s: our routes:\n%s\nwant:\n%s", st.name, ours, st.wantOurs)
		}
	}
}

// oursOf returns the table without the foreign routes, failing the test if
// any foreign route is gone or changed.
func oursOf(t *testing.T, f *fakeRoutes) string {
	t.Helper()
	lines := strings.Split(f.dump(), "\n")
	var ours []string
	for _, l := range lines {
		if l != "" && !slices.Contains(foreign, l) {
			ours = append(ours, l)
		}
	}
	for _, fr := range foreign {
		r := parseFakeRoute(fr, f.names)
		if !slices.Contains(lines, f.format(&r)) {
			t.Errorf("foreign route %q was touched", fr)
		}
	}
	return strings.Join(ours, "\n")
}

func TestReconcileRejectsRoutesItWouldNotOwn(t *testing.T) {
	bad := []nlbatch.Route{
		mustRoute("172.16.2.0/24", "192.168.1.2", eth0, false),       // outside Network
		mustRoute("10.5.0.0/16", "192.168.1.2", eth0, false),         // the Network itself
		mustRoute("10.5.1.0/24", "192.168.1.2", eth0, false),         // own subnet
		mustRoute("10.5.1.128/25", "192.168.1.2", eth0, false),       // inside own subnet
		mustRoute("10.5.2.0/24", "10.0.0.2", eth1, false),            // link not given
		{Dst: netip.MustParsePrefix("10.5.3.0/24"), LinkIndex: eth0}, // no gateway
		mustRoute("10.5.4.1/24", "192.168.1.2", eth0, false),         // not masked
	}
	good := mustRoute("10.5.9.0/24", "192.168.1.9", eth0, false)
	f := newFakeRoutes()
	r := NewRouteReconciler(f, testNet, eth0)
	got, err := r.Reconcile(testOwn, append(bad, good))
	if !errors.Is(err, ErrRouteNotOwned) {
		t.Fatalf("err = %v, want ErrRouteNotOwned", err)
	}
	if want := (Changes{Added: 1, Failed: len(bad)}); got != want {
		t.Errorf("changes = %+v, want %+v", got, want)
	}
	if calls := f.takeCalls(); calls != "replace 10.5.9.0/24 via 192.168.1.9 dev eth0" {
		t.Errorf("calls = %q, want only the good route", calls)
	}
	t.Log(err)
}

func TestReconcileKeepsGoingAfterAFailure(t *testing.T) {
	f := newFakeRoutes()
	f.add("10.5.8.0/24 via 192.168.1.8 dev eth0")
	f.failSet = map[netip.Prefix]error{netip.MustParsePrefix("10.5.2.0/24"): unix.ENETUNREACH}
	r := NewRouteReconciler(f, testNet, eth0)
	got, err := r.Reconcile(testOwn, []nlbatch.Route{
		mustRoute("10.5.2.0/24", "10.9.9.9", eth0, false),
		mustRoute("10.5.3.0/24", "192.168.1.3", eth0, false),
	})
	if !errors.Is(err, unix.ENETUNREACH) {
		t.Fatalf("err = %v, want ENETUNREACH", err)
	}
	if !strings.Contains(err.Error(), "10.5.2.0/24 via 10.9.9.9") {
		t.Errorf("err = %q does not name the route", err)
	}
	if want := (Changes{Added: 1, Removed: 1, Failed: 1}); got != want {
		t.Errorf("changes = %+v, want %+v", got, want)
	}
	if d := f.dump(); d != "10.5.3.0/24 via 192.168.1.3 dev eth0" {
		t.Errorf("table = %q", d)
	}
}

func TestReconcileDeleteOfVanishedRouteSucceeds(t *testing.T) {
	for _, errno := range []error{unix.ESRCH, unix.ENOENT} {
		f := newFakeRoutes()
		f.add("10.5.8.0/24 via 192.168.1.8 dev eth0")
		f.failDel = map[netip.Prefix]error{netip.MustParsePrefix("10.5.8.0/24"): errno}
		got, err := NewRouteReconciler(f, testNet, eth0).Reconcile(testOwn, nil)
		if err != nil {
			t.Fatalf("%v: err = %v, want success", errno, err)
		}
		if got != (Changes{Removed: 1}) {
			t.Errorf("%v: changes = %+v", errno, got)
		}
	}
	f := newFakeRoutes()
	f.add("10.5.8.0/24 via 192.168.1.8 dev eth0")
	f.failDel = map[netip.Prefix]error{netip.MustParsePrefix("10.5.8.0/24"): unix.EPERM}
	if _, err := NewRouteReconciler(f, testNet, eth0).Reconcile(testOwn, nil); !errors.Is(err, unix.EPERM) {
		t.Fatalf("err = %v, want EPERM", err)
	}
}

func TestReconcileDumpFailures(t *testing.T) {
	want := []nlbatch.Route{mustRoute("10.5.2.0/24", "192.168.1.2", eth0, false)}

	t.Run("error changes nothing", func(t *testing.T) {
		f := newFakeRoutes()
		f.add("10.5.8.0/24 via 192.168.1.8 dev eth0")
		f.dumpErr = unix.ENOBUFS
		_, err := NewRouteReconciler(f, testNet, eth0).Reconcile(testOwn, want)
		if !errors.Is(err, unix.ENOBUFS) {
			t.Fatalf("err = %v, want ENOBUFS", err)
		}
		if len(f.calls) != 0 {
			t.Errorf("calls after a failed dump: %q", f.calls)
		}
	})
	t.Run("interrupted dump is retried", func(t *testing.T) {
		f := newFakeRoutes()
		f.add("10.5.8.0/24 via 192.168.1.8 dev eth0")
		f.interrupt = 1
		got, err := NewRouteReconciler(f, testNet, eth0).Reconcile(testOwn, want)
		if err != nil {
			t.Fatal(err)
		}
		if f.dumps != 2 || got != (Changes{Added: 1, Removed: 1}) {
			t.Errorf("dumps = %d, changes = %+v", f.dumps, got)
		}
	})
	t.Run("always interrupted uses the last view", func(t *testing.T) {
		f := newFakeRoutes()
		f.add("10.5.8.0/24 via 192.168.1.8 dev eth0")
		f.interrupt = 100
		got, err := NewRouteReconciler(f, testNet, eth0).Reconcile(testOwn, want)
		if err != nil {
			t.Fatal(err)
		}
		if f.dumps != dumpAttempts || got != (Changes{Added: 1, Removed: 1}) {
			t.Errorf("dumps = %d, changes = %+v", f.dumps, got)
		}
		if d := f.dump(); d != "10.5.2.0/24 via 192.168.1.2 dev eth0" {
			t.Errorf("table = %q", d)
		}
	})
}

func TestRouteNetlinkConversion(t *testing.T) {
	r := mustRoute("10.5.3.0/24", "10.5.3.0", 7, true)
	nr := r.Netlink()
	if nr.Dst.String() != "10.5.3.0/24" || len(nr.Dst.IP) != 4 || !nr.Gw.Equal(ip.IP(r.Gw)) ||
		nr.LinkIndex != 7 || nr.Flags != int(netlink.FLAG_ONLINK) || nr.Table != unix.RT_TABLE_MAIN {
		t.Errorf("Netlink = %+v", nr)
	}
	if got, want := routeString(&r), "10.5.3.0/24 via 10.5.3.0 dev 7 onlink"; got != want {
		t.Errorf("String = %q, want %q", got, want)
	}
}

// leaseRoutes returns n host-gw-like routes in 10.0.0.0/8, /24 each.
func leaseRoutes(n int) []nlbatch.Route {
	rs := make([]nlbatch.Route, n)
	for i := range rs {
		dst := netip.PrefixFrom(ip.FromUint32(0x0a000000+uint32(i+1)<<8), 24)
		rs[i] = nlbatch.Route{Dst: dst, Gw: ip.FromUint32(0xc0a80000 + uint32(i%250+2)), LinkIndex: eth0}
	}
	return rs
}

func BenchmarkReconcile(b *testing.B) {
	network := netip.MustParsePrefix("10.0.0.0/8")
	own := netip.MustParsePrefix("10.255.255.0/24")
	for _, n := range []int{10000, 50000} {
		desired := leaseRoutes(n)
		b.Run(fmt.Sprintf("noop/%d", n), func(b *testing.B) {
			f := newFakeRoutes()
			f.record = false
			r := NewRouteReconciler(f, network, eth0)
			if _, err := r.Reconcile(own, desired); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				c, err := r.Reconcile(own, desired)
				if err != nil || c.Any() {
					b.Fatal(c, err)
				}
			}
		})
		b.Run(fmt.Sprintf("install/%d", n), func(b *testing.B) {
			f := newFakeRoutes()
			f.record = false
			r := NewRouteReconciler(f, network, eth0)
			b.ReportAllocs()
			for b.Loop() {
				b.StopTimer()
				clear(f.routes)
				b.StartTimer()
				c, err := r.Reconcile(own, desired)
				if err != nil || c.Added != n {
					b.Fatal(c, err)
				}
			}
		})
		b.Run(fmt.Sprintf("churn1pct/%d", n), func(b *testing.B) {
			f := newFakeRoutes()
			f.record = false
			r := NewRouteReconciler(f, network, eth0)
			if _, err := r.Reconcile(own, desired); err != nil {
				b.Fatal(err)
			}
			alt := slices.Clone(desired)
			for i := 0; i < n; i += 100 {
				alt[i].Gw = ip.FromUint32(0xc0a801fe)
			}
			sets := [2][]nlbatch.Route{alt, desired}
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				c, err := r.Reconcile(own, sets[i%2])
				if err != nil || c.Updated != n/100 {
					b.Fatal(c, err)
				}
				i++
			}
		})
	}
}

// TestReconcileManyChunks installs more routes than one write converts at
// a time, with failures at the chunks' edges: each is reported for its own
// route, and every other route is installed.
func TestReconcileManyChunks(t *testing.T) {
	const n = 2*routeChunk + 100
	f := newFakeRoutes()
	f.record = false
	desired := leaseRoutes(n)
	f.failSet = map[netip.Prefix]error{}
	for _, i := range []int{0, routeChunk - 1, routeChunk, n - 1} {
		f.failSet[desired[i].Dst] = unix.EINVAL
	}
	r := NewRouteReconciler(f, netip.MustParsePrefix("10.0.0.0/8"), eth0)
	c, err := r.Reconcile(netip.MustParsePrefix("10.255.255.0/24"), desired)
	if want := (Changes{Added: n - 4, Failed: 4}); c != want || !errors.Is(err, unix.EINVAL) {
		t.Fatalf("changes %+v, err %v; want %+v and EINVAL", c, err, want)
	}
	failed := r.FailedRoutes()
	slices.SortFunc(failed, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	want := []netip.Prefix{desired[0].Dst, desired[routeChunk-1].Dst, desired[routeChunk].Dst, desired[n-1].Dst}
	if !slices.Equal(failed, want) {
		t.Errorf("failed routes %v, want %v", failed, want)
	}
	if len(f.routes) != n-4 {
		t.Errorf("%d routes in the table, want %d", len(f.routes), n-4)
	}
}

// TestUseNexthops: each route goes through the nexthop object of its
// gateway, but one gateway on two links has the object on the link of its
// lowest destination, whatever the input order, and plain routes on the
// other.
func TestUseNexthops(t *testing.T) {
	type route struct {
		dst, gw string
		link    int32
	}
	in := []route{
		{"10.1.0.0/24", "10.250.0.2", 2},
		{"10.2.0.0/24", "10.250.0.2", 3},
		{"10.3.0.0/24", "10.250.0.2", 2},
		{"10.4.0.0/24", "10.250.0.4", 3},
	}
	for _, rev := range []bool{false, true} {
		var want []Entry[routeKey, hop]
		for _, r := range in {
			want = append(want, Entry[routeKey, hop]{keyOf(netip.MustParsePrefix(r.dst), 0, 0), hop{gw: netip.MustParseAddr(r.gw).As16(), link: r.link}})
		}
		if rev {
			slices.Reverse(want)
		}
		want = SortEntries(want, compareRouteKeys)
		uses := useNexthops(want)
		var got []string
		for _, e := range want {
			got = append(got, fmt.Sprintf("%s nhid %#x", e.Key.prefix(), e.Val.nh))
		}
		if g, w := strings.Join(got, ", "), "10.1.0.0/24 nhid 0xafa0002, 10.2.0.0/24 nhid 0x0, 10.3.0.0/24 nhid 0xafa0002, 10.4.0.0/24 nhid 0xafa0004"; g != w {
			t.Errorf("reversed %t: routes %s, want %s", rev, g, w)
		}
		var ids []uint32
		for _, u := range uses {
			ids = append(ids, u.id)
		}
		if !slices.Equal(ids, []uint32{0x0afa0002, 0x0afa0004}) {
			t.Errorf("reversed %t: nexthop IDs in use %#x", rev, ids)
		}
	}
	// IPv6 IDs stay those earlier runs gave their objects: FNV-1a.
	for _, s := range []string{"fd00::1", "fc00:5:0:2::", "2001:db8::ffff:1"} {
		gw := netip.MustParseAddr(s)
		h := fnv.New32a()
		a := gw.As16()
		h.Write(a[:])
		if id, want := nexthopID(gw), 0xf0000000|h.Sum32()&0x0fffffff; id != want {
			t.Errorf("nexthopID(%s) = %#x, want %#x", gw, id, want)
		}
	}
}

// TestRouteViewNexthops: a RouteSet read through a view gives each route
// the nexthop ID useNexthops does, whether the gateways' IDs rise with the
// destinations (the set is searched by ID) or not (a sorted copy of the
// IDs); a set unsorted, with a destination twice or with a route the
// reconciler would not own gets no view (ReconcileSet copies it).
func TestRouteViewNexthops(t *testing.T) {
	r := NewRouteReconciler(newFakeRoutes(), netip.MustParsePrefix("10.0.0.0/8"), 2, 3)
	r.UseNexthops(true)
	route := func(dst, gw string, link int) nlbatch.Route {
		return nlbatch.Route{Dst: netip.MustParsePrefix(dst), Gw: netip.MustParseAddr(gw), LinkIndex: link}
	}
	for _, tt := range []struct {
		name      string
		set       routeSlice
		idsSorted bool
		want      string
	}{
		{"IDs rise", routeSlice{
			route("10.1.0.0/24", "10.250.0.2", 2),
			route("10.2.0.0/24", "10.250.0.2", 3),
			route("10.3.0.0/24", "10.250.0.2", 2),
			route("10.4.0.0/24", "10.250.0.4", 3),
		}, true, "0xafa0002 0x0 0xafa0002 0xafa0004"},
		{"IDs unsorted", routeSlice{
			route("10.1.0.0/24", "10.250.0.4", 3),
			route("10.2.0.0/24", "10.250.0.2", 2),
			route("10.3.0.0/24", "10.250.0.2", 3),
			route("10.4.0.0/24", "10.250.0.2", 2),
		}, false, "0xafa0004 0xafa0002 0x0 0xafa0002"},
	} {
		v := r.newRouteView(tt.set)
		if v == nil {
			t.Fatalf("%s: no view of a sorted set", tt.name)
		}
		if v.idsSorted != tt.idsSorted {
			t.Errorf("%s: idsSorted %t, want %t", tt.name, v.idsSorted, tt.idsSorted)
		}
		var got []string
		for i := range v.Len() {
			if k := v.Key(i); k.prefix() != tt.set[i].Dst {
				t.Errorf("%s: key %d is %s, want %s", tt.name, i, k.prefix(), tt.set[i].Dst)
			}
			got = append(got, fmt.Sprintf("%#x", v.Val(i).nh))
		}
		if g := strings.Join(got, " "); g != tt.want {
			t.Errorf("%s: nexthop IDs %s, want %s", tt.name, g, tt.want)
		}
		for id, want := range map[uint32]bool{0x0afa0002: true, 0x0afa0004: true, 0x0afa0003: false, 0x0afa0005: false, 1: false} {
			if got := v.used(id); got != want {
				t.Errorf("%s: used(%#x) = %t, want %t", tt.name, id, got, want)
			}
		}
	}
	for name, set := range map[string]routeSlice{
		"unsorted":     {route("10.2.0.0/24", "10.250.0.2", 2), route("10.1.0.0/24", "10.250.0.2", 2)},
		"twice":        {route("10.1.0.0/24", "10.250.0.2", 2), route("10.1.0.0/24", "10.250.0.3", 2)},
		"not owned":    {route("10.1.0.0/24", "10.250.0.2", 2), route("10.2.0.0/24", "10.250.0.2", 9)},
		"outside":      {route("192.168.0.0/24", "10.250.0.2", 2)},
		"wrong family": {route("10.1.0.0/24", "fd00::1", 2)},
	} {
		if r.newRouteView(set) != nil {
			t.Errorf("%s: a view of a set ReconcileSet must copy", name)
		}
	}
}
