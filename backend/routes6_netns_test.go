package backend

import (
	"context"
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

// kernelRoutes6 lists the IPv6 main table's gateway routes as "dst via gw
// dev NAME [onlink] [nhid]" lines, sorted (ip -6 route's metric 1024 is
// left out, any other is shown).
func kernelRoutes6(tb testing.TB, h *nlbatch.Handle) []string {
	tb.Helper()
	var lines []string
	err := h.ListRoutes6(func(e *nlbatch.Route) bool {
		if e.Table != unix.RT_TABLE_MAIN || !e.Gw.IsValid() && e.NexthopID == 0 {
			return true
		}
		s := e.Dst.String()
		if e.Gw.IsValid() {
			s += " via " + e.Gw.String()
		}
		if e.LinkIndex != 0 {
			l, err := h.LinkByIndex(e.LinkIndex)
			if err != nil {
				tb.Fatal(err)
			}
			s += " dev " + l.Attrs().Name
		}
		if e.Onlink {
			s += " onlink"
		}
		if e.NexthopID != 0 {
			s += " nhid"
		}
		if e.Priority != 1024 {
			s += fmt.Sprintf(" metric %d", e.Priority)
		}
		lines = append(lines, s)
		return true
	})
	if err != nil {
		tb.Fatal(err)
	}
	slices.Sort(lines)
	return lines
}

// TestReconcileIPv6InNetns runs an IPv6 reconciler against a real kernel,
// with plain routes and through nexthop objects: foreign routes (another
// link, outside the network, IPv4) stay, stale ones go, a route
// moving between links (which the kernel refuses to replace in place when
// the gateway is onlink) moves, and one deleted by hand comes back.
func TestReconcileIPv6InNetns(t *testing.T) {
	for _, nh := range []bool{false, true} {
		t.Run(fmt.Sprintf("nexthops=%t", nh), func(t *testing.T) {
			if _, err := exec.LookPath("sysctl"); err != nil {
				t.Skip("skipping: needs sysctl to turn DAD off in the namespace")
			}
			ns := nstest.New(t, "flbe6")
			if out, err := ns.Command(context.Background(), "sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0",
				"net.ipv6.conf.default.accept_dad=0").CombinedOutput(); err != nil {
				t.Fatalf("sysctl: %v: %s", err, out)
			}
			h := ns.NL
			eth0 := ns.Veth(t, "eth0", 0, nil, "eth0p", "10.250.0.1/24", "fd5e::1/64").Attrs().Index
			eth1 := ns.Veth(t, "eth1", 0, nil, "eth1p", "fd5f::1/64").Attrs().Index
			vx := ns.Veth(t, "flannel-v6.1", 0, nil, "flannel-v6.1p").Attrs().Index
			add := func(dst, gw string, link int) {
				t.Helper()
				r := &netlink.Route{Dst: ip.IPNet(netip.MustParsePrefix(dst)), Gw: ip.IP(netip.MustParseAddr(gw)), LinkIndex: link}
				if err := h.RouteAdd(r); err != nil {
					t.Fatalf("adding %s via %s: %v", dst, gw, err)
				}
			}
			// Foreign: another link, outside the network, IPv4. (Not a
			// route for the whole network through another link: the kernel
			// then refuses every onlink gateway inside it.)
			add("fc00:5:0:8::/64", "fd5f::8", eth1)
			add("fd99::/64", "fd5e::7", eth0)
			add("10.5.2.0/24", "10.250.0.2", eth0)
			foreign := kernelRoutes6(t, h)
			foreign4, err := h.RouteList(nil, netlink.FAMILY_V4)
			if err != nil {
				t.Fatal(err)
			}
			// Ours but stale: a lease that went away.
			add("fc00:5:0:9::/64", "fd5e::9", eth0)

			r := NewRouteReconciler(h, netip.MustParsePrefix("fc00:5::/48"), eth0, vx)
			r.UseNexthops(nh)
			own := netip.MustParsePrefix("fc00:5:0:1::/64")
			check := func(step string, desired []nlbatch.Route, want Changes, ours ...string) {
				t.Helper()
				got, err := r.Reconcile(own, desired)
				if err != nil {
					t.Fatalf("%s: %v", step, err)
				}
				if got != want {
					t.Errorf("%s: changes = %+v, want %+v", step, got, want)
				}
				if nh {
					for i, s := range ours {
						ours[i] = s + " nhid"
					}
				}
				wantTbl := append(slices.Clone(foreign), ours...)
				slices.Sort(wantTbl)
				if tbl := kernelRoutes6(t, h); !slices.Equal(tbl, wantTbl) {
					t.Errorf("%s: IPv6 main table:\n%s\nwant:\n%s", step, strings.Join(tbl, "\n"), strings.Join(wantTbl, "\n"))
				}
				if got, err := h.RouteList(nil, netlink.FAMILY_V4); err != nil || len(got) != len(foreign4) {
					t.Errorf("%s: IPv4 routes changed: %v %v", step, got, err)
				}
			}
			r2 := mustRoute("fc00:5:0:2::/64", "fd5e::2", eth0, false)
			r3 := mustRoute("fc00:5:0:3::/64", "fd5e::3", eth0, false)
			r4 := mustRoute("fc00:5:0:4::/64", "fc00:5:0:4::", vx, true)
			check("first", []nlbatch.Route{r2, r3, r4}, Changes{Added: 3, Removed: 1},
				"fc00:5:0:2::/64 via fd5e::2 dev eth0",
				"fc00:5:0:3::/64 via fd5e::3 dev eth0",
				"fc00:5:0:4::/64 via fc00:5:0:4:: dev flannel-v6.1 onlink")
			check("again", []nlbatch.Route{r2, r3, r4}, Changes{},
				"fc00:5:0:2::/64 via fd5e::2 dev eth0",
				"fc00:5:0:3::/64 via fd5e::3 dev eth0",
				"fc00:5:0:4::/64 via fc00:5:0:4:: dev flannel-v6.1 onlink")
			r3vx := mustRoute("fc00:5:0:3::/64", "fc00:5:0:3::", vx, true)
			check("move to another link", []nlbatch.Route{r2, r3vx, r4}, Changes{Updated: 1},
				"fc00:5:0:2::/64 via fd5e::2 dev eth0",
				"fc00:5:0:3::/64 via fc00:5:0:3:: dev flannel-v6.1 onlink",
				"fc00:5:0:4::/64 via fc00:5:0:4:: dev flannel-v6.1 onlink")
			check("and back", []nlbatch.Route{r2, r3, r4}, Changes{Updated: 1},
				"fc00:5:0:2::/64 via fd5e::2 dev eth0",
				"fc00:5:0:3::/64 via fd5e::3 dev eth0",
				"fc00:5:0:4::/64 via fc00:5:0:4:: dev flannel-v6.1 onlink")
			if err := h.RouteDel(&netlink.Route{Dst: ip.IPNet(r2.Dst), LinkIndex: eth0}); err != nil {
				t.Fatal(err)
			}
			check("deleted by hand", []nlbatch.Route{r2, r3, r4}, Changes{Added: 1},
				"fc00:5:0:2::/64 via fd5e::2 dev eth0",
				"fc00:5:0:3::/64 via fd5e::3 dev eth0",
				"fc00:5:0:4::/64 via fc00:5:0:4:: dev flannel-v6.1 onlink")
			check("none", nil, Changes{Removed: 3})
			if nh {
				if ids := nexthopIDs(t, ns); len(ids) != 0 {
					t.Errorf("nexthop objects left: %v", ids)
				}
			}
		})
	}
}

// TestNexthopID6: IPv6 gateways get IDs in 0xf0000000.. (IPv4 class E,
// never a flannel gateway), the same on every run.
func TestNexthopID6(t *testing.T) {
	a, b := netip.MustParseAddr("fc00:5:0:2::"), netip.MustParseAddr("fc00:5:0:3::")
	ida, idb := nexthopID(a), nexthopID(b)
	if ida>>28 != 0xf || idb>>28 != 0xf || ida == idb || nexthopID(a) != ida {
		t.Errorf("nexthopID(%s) = %#x, nexthopID(%s) = %#x", a, ida, b, idb)
	}
	if got := nexthopID(netip.MustParseAddr("10.5.2.0")); got != 10<<24|5<<16|2<<8 {
		t.Errorf("IPv4 nexthop ID %#x", got)
	}
}
