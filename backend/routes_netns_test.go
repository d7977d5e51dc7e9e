package backend

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/internal/nstest"
	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/pkg/nlbatch"
)

// kernelRoutes lists the gateway routes of a table, as sorted lines.
func kernelRoutes(tb testing.TB, h *nlbatch.Handle, table int) []string {
	tb.Helper()
	rs, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: table}, netlink.RT_FILTER_TABLE)
	if err != nil {
		tb.Fatal(err)
	}
	var lines []string
	for _, r := range rs {
		if r.Gw == nil {
			continue // connected and local routes
		}
		l, err := h.LinkByIndex(r.LinkIndex)
		if err != nil {
			tb.Fatal(err)
		}
		s := fmt.Sprintf("%s via %s dev %s", r.Dst, r.Gw, l.Attrs().Name)
		if r.Flags&int(netlink.FLAG_ONLINK) != 0 {
			s += " onlink"
		}
		if r.Priority != 0 {
			s += fmt.Sprintf(" metric %d", r.Priority)
		}
		lines = append(lines, s)
	}
	slices.Sort(lines)
	return lines
}

func mustAdd(tb testing.TB, h *nlbatch.Handle, add func(*netlink.Route) error, dst, gw string, link, metric, table int) {
	tb.Helper()
	r := &netlink.Route{
		Dst: ip.IPNet(netip.MustParsePrefix(dst)), Gw: ip.IP(netip.MustParseAddr(gw)),
		LinkIndex: link, Priority: metric, Table: table,
	}
	if err := add(r); err != nil {
		tb.Fatalf("adding route %s via %s: %v", dst, gw, err)
	}
}

// TestReconcileInNetns runs the reconciler against a real kernel in a fresh
// namespace: the kernel's replace semantics (a route moving to another link,
// onlink), non-zero metrics, duplicate routes and foreign routes.
func TestReconcileInNetns(t *testing.T) {
	t.Run("slice", func(t *testing.T) { testReconcileInNetns(t, false) })
	t.Run("set", func(t *testing.T) { testReconcileInNetns(t, true) })
}

// reconcileWith hands desired to r.Reconcile or, with viaSet, to
// r.ReconcileSet.
func reconcileWith(r *RouteReconciler, viaSet bool, own netip.Prefix, desired []nlbatch.Route) (Changes, error) {
	if viaSet {
		return r.ReconcileSet(own, routeSlice(desired))
	}
	return r.Reconcile(own, desired)
}

// testReconcileInNetns is TestReconcileInNetns, the desired routes given
// to Reconcile or, with viaSet, to ReconcileSet.
func testReconcileInNetns(t *testing.T, viaSet bool) {
	// Links with carrier: veth pairs with both ends here (veth is
	// available where the dummy driver may not be).
	ns := nstest.New(t, "flbe")
	h := ns.NL
	eth0 := ns.Veth(t, "eth0", 0, nil, "eth0p", "10.250.0.1/24").Attrs().Index
	eth1 := ns.Veth(t, "eth1", 0, nil, "eth1p", "10.251.0.1/24").Attrs().Index
	vx := ns.Veth(t, "flannel.1", 0, nil, "flannel.1p").Attrs().Index
	main := unix.RT_TABLE_MAIN

	// Foreign: another link, the whole Network, outside Network, another table.
	mustAdd(t, h, h.RouteAdd, "10.5.8.0/24", "10.251.0.8", eth1, 0, main)
	mustAdd(t, h, h.RouteAdd, "10.5.0.0/16", "10.250.0.254", eth0, 0, main)
	mustAdd(t, h, h.RouteAdd, "172.16.0.0/24", "10.250.0.7", eth0, 0, main)
	mustAdd(t, h, h.RouteAdd, "10.5.6.0/24", "10.250.0.6", eth0, 0, 100)
	foreignMain := kernelRoutes(t, h, main)
	foreignT100 := kernelRoutes(t, h, 100)
	// Ours but stale: an expired lease, a non-zero metric, a duplicate.
	mustAdd(t, h, h.RouteAdd, "10.5.9.0/24", "10.250.0.9", eth0, 0, main)
	mustAdd(t, h, h.RouteAdd, "10.5.5.0/24", "10.250.0.5", eth0, 100, main)
	mustAdd(t, h, h.RouteAdd, "10.5.2.0/24", "10.250.0.22", eth0, 0, main)
	mustAdd(t, h, h.RouteAppend, "10.5.2.0/24", "10.250.0.2", eth0, 0, main)

	r := NewRouteReconciler(h, netip.MustParsePrefix("10.5.0.0/16"), eth0, vx)
	own := netip.MustParsePrefix("10.5.1.0/24")
	check := func(step string, desired []nlbatch.Route, want Changes, ours ...string) {
		t.Helper()
		got, err := reconcileWith(r, viaSet, own, desired)
		if err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		if got != want {
			t.Errorf("%s: changes = %+v, want %+v", step, got, want)
		}
		wantMain := append(slices.Clone(foreignMain), ours...)
		slices.Sort(wantMain)
		if tbl := kernelRoutes(t, h, main); !slices.Equal(tbl, wantMain) {
			t.Errorf("%s: main table:\n%s\nwant:\n%s", step, strings.Join(tbl, "\n"), strings.Join(wantMain, "\n"))
		}
		if tbl := kernelRoutes(t, h, 100); !slices.Equal(tbl, foreignT100) {
			t.Errorf("%s: table 100 changed: %q", step, tbl)
		}
	}

	r2 := mustRoute("10.5.2.0/24", "10.250.0.2", eth0, false)
	r3 := mustRoute("10.5.3.0/24", "10.250.0.3", eth0, false)
	r4 := mustRoute("10.5.4.0/24", "10.5.4.0", vx, true)
	check("first", []nlbatch.Route{r2, r3, r4}, Changes{Added: 2, Removed: 3},
		"10.5.2.0/24 via 10.250.0.2 dev eth0",
		"10.5.3.0/24 via 10.250.0.3 dev eth0",
		"10.5.4.0/24 via 10.5.4.0 dev flannel.1 onlink")
	check("again", []nlbatch.Route{r2, r3, r4}, Changes{},
		"10.5.2.0/24 via 10.250.0.2 dev eth0",
		"10.5.3.0/24 via 10.250.0.3 dev eth0",
		"10.5.4.0/24 via 10.5.4.0 dev flannel.1 onlink")

	r3vx := mustRoute("10.5.3.0/24", "10.5.3.0", vx, true)
	check("move to another link", []nlbatch.Route{r2, r3vx, r4}, Changes{Updated: 1},
		"10.5.2.0/24 via 10.250.0.2 dev eth0",
		"10.5.3.0/24 via 10.5.3.0 dev flannel.1 onlink",
		"10.5.4.0/24 via 10.5.4.0 dev flannel.1 onlink")

	if err := h.RouteDel(r2.Netlink()); err != nil {
		t.Fatal(err)
	}
	check("deleted by hand", []nlbatch.Route{r2, r3vx, r4}, Changes{Added: 1},
		"10.5.2.0/24 via 10.250.0.2 dev eth0",
		"10.5.3.0/24 via 10.5.3.0 dev flannel.1 onlink",
		"10.5.4.0/24 via 10.5.4.0 dev flannel.1 onlink")

	// The kernel answers ESRCH for a route that is not there: a delete
	// the Reconciler counts as done.
	errs := make([]error, 1)
	missing := mustRoute("10.5.77.0/24", "10.250.0.77", eth0, false)
	routeTable{r}.Delete([]routeKey{keyOf(missing.Dst, 0, 0)}, []hop{hopOf(&missing)}, errs)
	if !isNotFound(errs[0]) {
		t.Errorf("deleting a missing route: %v, want not found", errs[0])
	}

	check("none", nil, Changes{Removed: 3})
}

// nexthopRoutes lists the main table's routes into 10.5.0.0/16 as
// "dst via gw dev N [onlink] nhid ID" lines, sorted.
func nexthopRoutes(t *testing.T, h *nlbatch.Handle) []string {
	t.Helper()
	var lines []string
	err := h.ListRoutes(func(e *nlbatch.Route) bool {
		if e.Table == unix.RT_TABLE_MAIN && e.Gw.IsValid() && netip.MustParsePrefix("10.5.0.0/16").Contains(e.Dst.Addr()) && e.Dst.Bits() > 16 {
			lines = append(lines, nexthopLine(e.Dst.String(), e.Gw.String(), e.LinkIndex, e.Onlink, e.NexthopID))
		}
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(lines)
	return lines
}

// nexthopLine renders a route as nexthopRoutes lists it.
func nexthopLine(dst, gw string, link int, onlink bool, id uint32) string {
	l := fmt.Sprintf("%s via %s dev %d", dst, gw, link)
	if onlink {
		l += " onlink"
	}
	return fmt.Sprintf("%s nhid %d", l, id)
}

// nexthopIDs lists the IDs of the namespace's nexthop objects.
func nexthopIDs(t *testing.T, ns *nstest.NS) []uint32 {
	t.Helper()
	out, err := ns.Command(context.Background(), "ip", "-j", "nexthop", "show").Output()
	if err != nil {
		t.Fatalf("ip nexthop show: %v", err)
	}
	var nhs []struct{ ID uint32 }
	if len(bytes.TrimSpace(out)) > 0 {
		if err := json.Unmarshal(out, &nhs); err != nil {
			t.Fatalf("parsing ip -j nexthop show %q: %v", out, err)
		}
	}
	var ids []uint32
	for _, n := range nhs {
		ids = append(ids, n.ID)
	}
	slices.Sort(ids)
	return ids
}

// TestReconcileNexthopsInNetns installs routes through nexthop objects,
// moves one, turns nexthop objects off and on again and removes everything:
// the routes always match, the nexthop objects no route uses are deleted,
// and a foreign nexthop object is never touched.
// TestReconcileNexthopsInNetns: routes through nexthop objects, given as
// a slice (Reconcile) and as a RouteSet (ReconcileSet, read through a
// view: with the gateways' IDs in destination order or not).
func TestReconcileNexthopsInNetns(t *testing.T) {
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("skipping: needs ip (iproute2) to list nexthop objects")
	}
	t.Run("slice", func(t *testing.T) { testReconcileNexthops(t, false) })
	t.Run("set", func(t *testing.T) { testReconcileNexthops(t, true) })
}

// routeSlice is a RouteSet of a slice.
type routeSlice []nlbatch.Route

func (s routeSlice) Len() int                  { return len(s) }
func (s routeSlice) Route(i int) nlbatch.Route { return s[i] }

func testReconcileNexthops(t *testing.T, viaSet bool) {
	ns := nstest.New(t, "flnh")
	h := ns.NL
	eth0 := ns.Veth(t, "eth0", 0, nil, "eth0p", "10.250.0.1/24").Attrs().Index
	vx := ns.Veth(t, "flannel.1", 0, nil, "flannel.1p").Attrs().Index
	errs := make([]error, 1)
	if err := h.ReplaceNexthops([]nlbatch.Nexthop{{ID: 5, Gw: netip.MustParseAddr("10.250.0.254"), LinkIndex: eth0}}, errs); err != nil || errs[0] != nil {
		t.Fatal(err, errs[0])
	}

	r := NewRouteReconciler(h, netip.MustParsePrefix("10.5.0.0/16"), eth0, vx)
	r.UseNexthops(true)
	own := netip.MustParsePrefix("10.5.1.0/24")
	nh := func(gw string) uint32 { return ip.Uint32(netip.MustParseAddr(gw)) }
	check := func(step string, desired []nlbatch.Route, want Changes, ids []uint32, routes ...string) {
		t.Helper()
		got, err := reconcileWith(r, viaSet, own, desired)
		if err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		if got != want {
			t.Errorf("%s: changes = %+v, want %+v", step, got, want)
		}
		if tbl := nexthopRoutes(t, h); !slices.Equal(tbl, routes) {
			t.Errorf("%s: routes:\n%s\nwant:\n%s", step, strings.Join(tbl, "\n"), strings.Join(routes, "\n"))
		}
		ids = append([]uint32{5}, ids...)
		slices.Sort(ids)
		if got := nexthopIDs(t, ns); !slices.Equal(got, ids) {
			t.Errorf("%s: nexthop objects %v, want %v", step, got, ids)
		}
	}

	r2 := mustRoute("10.5.2.0/24", "10.250.0.2", eth0, false)
	r3 := mustRoute("10.5.3.0/24", "10.250.0.3", eth0, false)
	r4 := mustRoute("10.5.4.0/24", "10.5.4.0", vx, true)
	line := nexthopLine
	l2 := line("10.5.2.0/24", "10.250.0.2", eth0, false, nh("10.250.0.2"))
	l4 := line("10.5.4.0/24", "10.5.4.0", vx, true, nh("10.5.4.0"))
	check("first", []nlbatch.Route{r2, r3, r4}, Changes{Added: 3},
		[]uint32{nh("10.250.0.2"), nh("10.250.0.3"), nh("10.5.4.0")},
		l2, line("10.5.3.0/24", "10.250.0.3", eth0, false, nh("10.250.0.3")), l4)
	check("again", []nlbatch.Route{r2, r3, r4}, Changes{},
		[]uint32{nh("10.250.0.2"), nh("10.250.0.3"), nh("10.5.4.0")},
		l2, line("10.5.3.0/24", "10.250.0.3", eth0, false, nh("10.250.0.3")), l4)
	r3b := mustRoute("10.5.3.0/24", "10.250.0.33", eth0, false)
	check("new gateway", []nlbatch.Route{r2, r3b, r4}, Changes{Updated: 1},
		[]uint32{nh("10.250.0.2"), nh("10.250.0.33"), nh("10.5.4.0")},
		l2, line("10.5.3.0/24", "10.250.0.33", eth0, false, nh("10.250.0.33")), l4)

	r.UseNexthops(false)
	check("plain routes", []nlbatch.Route{r2, r3b, r4}, Changes{Updated: 3}, nil,
		line("10.5.2.0/24", "10.250.0.2", eth0, false, 0),
		line("10.5.3.0/24", "10.250.0.33", eth0, false, 0),
		line("10.5.4.0/24", "10.5.4.0", vx, true, 0))

	r.UseNexthops(true)
	check("nexthops again", []nlbatch.Route{r2, r3b, r4}, Changes{Updated: 3},
		[]uint32{nh("10.250.0.2"), nh("10.250.0.33"), nh("10.5.4.0")},
		l2, line("10.5.3.0/24", "10.250.0.33", eth0, false, nh("10.250.0.33")), l4)
	// Onlink routes via their subnet IPs: the IDs rise with the
	// destinations.
	r5 := mustRoute("10.5.5.0/24", "10.5.5.0", vx, true)
	l5 := line("10.5.5.0/24", "10.5.5.0", vx, true, nh("10.5.5.0"))
	check("onlink only", []nlbatch.Route{r4, r5}, Changes{Added: 1, Removed: 2},
		[]uint32{nh("10.5.4.0"), nh("10.5.5.0")}, l4, l5)
	check("onlink again", []nlbatch.Route{r4, r5}, Changes{},
		[]uint32{nh("10.5.4.0"), nh("10.5.5.0")}, l4, l5)
	check("none", nil, Changes{Removed: 2}, nil)
}

func BenchmarkReconcileNetns(b *testing.B) {
	for _, nexthops := range []bool{false, true} {
		mode := ""
		if nexthops {
			mode = "nexthops/"
		}
		for _, n := range []int{10000, 50000} {
			ns := nstest.New(b, "flbe")
			h := ns.NL
			eth0 := ns.Veth(b, "eth0", 0, nil, "eth0p", "10.250.0.1/16").Attrs().Index
			network := netip.MustParsePrefix("10.0.0.0/8")
			own := netip.MustParsePrefix("10.255.255.0/24")
			desired := leaseRoutes(n)
			for i := range desired {
				desired[i].LinkIndex = eth0
				desired[i].Gw = ip.FromUint32(0x0afa0000 + uint32(i%60000+2))
			}
			r := NewRouteReconciler(h, network, eth0)
			r.UseNexthops(nexthops)
			b.Run(fmt.Sprintf("%sinstall/%d", mode, n), func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					b.StopTimer()
					if _, err := r.Reconcile(own, nil); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
					if c, err := r.Reconcile(own, desired); err != nil || c.Added != n {
						b.Fatal(c, err)
					}
				}
			})
			b.Run(fmt.Sprintf("%snoop/%d", mode, n), func(b *testing.B) {
				if _, err := r.Reconcile(own, desired); err != nil {
					b.Fatal(err)
				}
				b.ReportAllocs()
				for b.Loop() {
					if c, err := r.Reconcile(own, desired); err != nil || c.Any() {
						b.Fatal(c, err)
					}
				}
			})
			b.Run(fmt.Sprintf("%sremove/%d", mode, n), func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					b.StopTimer()
					if _, err := r.Reconcile(own, desired); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
					if c, err := r.Reconcile(own, nil); err != nil || c.Removed != n {
						b.Fatal(c, err)
					}
				}
			})
		}
	}
}
