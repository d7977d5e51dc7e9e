package backend

import (
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/pkg/ip"
)

var nsSeq atomic.Int64

// newTestNetNS creates a named network namespace for the test, deleted in
// Cleanup even if the test fails, and returns a netlink handle into it.
// Nothing is done in the caller's namespace.
func newTestNetNS(tb testing.TB) *netlink.Handle {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("skipping: creating a network namespace needs root")
	}
	name := fmt.Sprintf("flbe-%d-%d", os.Getpid(), nsSeq.Add(1))
	tb.Cleanup(func() {
		if err := netns.DeleteNamed(name); err != nil && !os.IsNotExist(err) {
			tb.Errorf("deleting network namespace %s: %v", name, err)
		}
	})
	type result struct {
		ns  netns.NsHandle
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// NewNamed moves this thread into the new namespace; move it back.
		// If that fails the thread stays locked and dies with the goroutine.
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: err}
			return
		}
		defer orig.Close()
		ns, err := netns.NewNamed(name)
		if serr := netns.Set(orig); serr != nil {
			if err == nil {
				ns.Close()
			}
			ch <- result{err: fmt.Errorf("returning to the original namespace: %w", serr)}
			return
		}
		runtime.UnlockOSThread()
		ch <- result{ns, err}
	}()
	r := <-ch
	if r.err != nil {
		tb.Fatalf("creating network namespace %s: %v", name, r.err)
	}
	tb.Cleanup(func() { r.ns.Close() })
	h, err := netlink.NewHandleAt(r.ns)
	if err != nil {
		tb.Fatalf("opening netlink in %s: %v", name, err)
	}
	tb.Cleanup(h.Close)
	return h
}

// addLink creates an up link in the namespace of h, with an address if cidr
// is not empty, and returns its index. It is one end of a veth pair (the
// other end, name+"p", is up too, so the link has carrier): veth is
// available where the dummy driver may not be.
func addLink(tb testing.TB, h *netlink.Handle, name, cidr string) int {
	tb.Helper()
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}
	if err := h.LinkAdd(veth); err != nil {
		tb.Fatalf("adding link %s: %v", name, err)
	}
	peer, err := h.LinkByName(name + "p")
	if err != nil {
		tb.Fatal(err)
	}
	if err := h.LinkSetUp(peer); err != nil {
		tb.Fatal(err)
	}
	l, err := h.LinkByName(name)
	if err != nil {
		tb.Fatal(err)
	}
	if cidr != "" {
		p := netip.MustParsePrefix(cidr)
		if err := h.AddrAdd(l, &netlink.Addr{IPNet: ip.HostNet(p.Addr(), p.Bits())}); err != nil {
			tb.Fatalf("adding %s to %s: %v", cidr, name, err)
		}
	}
	if err := h.LinkSetUp(l); err != nil {
		tb.Fatal(err)
	}
	return l.Attrs().Index
}

// kernelRoutes lists the gateway routes of a table, as sorted lines.
func kernelRoutes(tb testing.TB, h *netlink.Handle, table int) []string {
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

func mustAdd(tb testing.TB, h *netlink.Handle, add func(*netlink.Route) error, dst, gw string, link, metric, table int) {
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
	h := newTestNetNS(t)
	eth0 := addLink(t, h, "eth0", "10.250.0.1/24")
	eth1 := addLink(t, h, "eth1", "10.251.0.1/24")
	vx := addLink(t, h, "flannel.1", "")
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
	check := func(step string, desired []Route, want Changes, ours ...string) {
		t.Helper()
		got, err := r.Reconcile(own, desired)
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
	check("first", []Route{r2, r3, r4}, Changes{Added: 2, Removed: 3},
		"10.5.2.0/24 via 10.250.0.2 dev eth0",
		"10.5.3.0/24 via 10.250.0.3 dev eth0",
		"10.5.4.0/24 via 10.5.4.0 dev flannel.1 onlink")
	check("again", []Route{r2, r3, r4}, Changes{},
		"10.5.2.0/24 via 10.250.0.2 dev eth0",
		"10.5.3.0/24 via 10.250.0.3 dev eth0",
		"10.5.4.0/24 via 10.5.4.0 dev flannel.1 onlink")

	r3vx := mustRoute("10.5.3.0/24", "10.5.3.0", vx, true)
	check("move to another link", []Route{r2, r3vx, r4}, Changes{Updated: 1},
		"10.5.2.0/24 via 10.250.0.2 dev eth0",
		"10.5.3.0/24 via 10.5.3.0 dev flannel.1 onlink",
		"10.5.4.0/24 via 10.5.4.0 dev flannel.1 onlink")

	if err := h.RouteDel(r2.netlinkRoute()); err != nil {
		t.Fatal(err)
	}
	check("deleted by hand", []Route{r2, r3vx, r4}, Changes{Added: 1},
		"10.5.2.0/24 via 10.250.0.2 dev eth0",
		"10.5.3.0/24 via 10.5.3.0 dev flannel.1 onlink",
		"10.5.4.0/24 via 10.5.4.0 dev flannel.1 onlink")

	// The kernel answers ESRCH for a route that is not there: success.
	if err := r.delNetlink(mustRoute("10.5.77.0/24", "10.250.0.77", eth0, false).netlinkRoute()); err != nil {
		t.Errorf("deleting a missing route: %v", err)
	}

	check("none", nil, Changes{Removed: 3})
}

func BenchmarkReconcileNetns(b *testing.B) {
	for _, n := range []int{10000, 50000} {
		h := newTestNetNS(b)
		eth0 := addLink(b, h, "eth0", "10.250.0.1/16")
		network := netip.MustParsePrefix("10.0.0.0/8")
		own := netip.MustParsePrefix("10.255.255.0/24")
		desired := leaseRoutes(n)
		for i := range desired {
			desired[i].LinkIndex = eth0
			desired[i].Gw = ip.FromUint32(0x0afa0000 + uint32(i%60000+2))
		}
		r := NewRouteReconciler(h, network, eth0)
		b.Run(fmt.Sprintf("install/%d", n), func(b *testing.B) {
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
		b.Run(fmt.Sprintf("noop/%d", n), func(b *testing.B) {
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
		b.Run(fmt.Sprintf("remove/%d", n), func(b *testing.B) {
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
