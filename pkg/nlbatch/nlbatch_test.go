package nlbatch_test

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/internal/nstest"
	"github.com/flanneld-go/flanneld/pkg/nlbatch"
)

// lab is a namespace with a veth pair: eth0 (192.168.0.1/16) and its peer.
type lab struct {
	ns   *nstest.NS
	h    *nlbatch.Handle
	eth0 int
}

func newLab(t testing.TB) *lab {
	ns := nstest.New(t, "nlbatch")
	peer := nstest.New(t, "nlbatchp")
	eth0 := ns.Veth(t, "eth0", 1500, peer, "eth0", "192.168.0.1/16")
	h, err := nlbatch.NewHandleAt(ns.Handle)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return &lab{ns: ns, h: h, eth0: eth0.Attrs().Index}
}

// routes returns the main table's routes into 10.0.0.0/8 as "dst via gw".
func (l *lab) routes(t *testing.T) map[string]string {
	t.Helper()
	got := map[string]string{}
	err := l.h.RouteListFilteredIter(unix.AF_INET, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE, func(r netlink.Route) bool {
		if r.Dst != nil && r.Dst.IP[0] == 10 {
			got[r.Dst.String()] = fmt.Sprintf("via %s dev %d onlink=%v", r.Gw, r.LinkIndex, r.Flags&unix.RTNH_F_ONLINK != 0)
		}
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

func subnet(i int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 0}), 24)
}

func gw(i int) netip.Addr { return netip.AddrFrom4([4]byte{192, 168, byte(1 + i>>8), byte(i)}) }

// TestRoutesManyChunks replaces and deletes more routes than fit one chunk,
// with failing requests spread over the chunks: each failure is reported at
// its own index and the rest are all in the kernel.
func TestRoutesManyChunks(t *testing.T) {
	l := newLab(t)
	const n = 2000
	routes := make([]nlbatch.Route, n)
	bad := map[int]bool{0: true, 511: true, 512: true, 1337: true, n - 1: true}
	for i := range routes {
		routes[i] = nlbatch.Route{Dst: subnet(i), Gw: gw(i), LinkIndex: l.eth0}
		if bad[i] {
			routes[i].LinkIndex = 999999 // no such link
		}
	}
	errs := make([]error, n)
	if err := l.h.ReplaceRoutes(routes, errs); err != nil {
		t.Fatal(err)
	}
	for i, err := range errs {
		if bad[i] != (err != nil) {
			t.Fatalf("route %d: error %v, want failure %v", i, err, bad[i])
		}
	}
	got := l.routes(t)
	if len(got) != n-len(bad) {
		t.Fatalf("%d routes in the kernel, want %d", len(got), n-len(bad))
	}
	for i := range routes {
		want := fmt.Sprintf("via %s dev %d onlink=false", gw(i), l.eth0)
		if g := got[subnet(i).String()]; !bad[i] && g != want {
			t.Fatalf("route %s: %q, want %q", subnet(i), g, want)
		}
	}

	// Replacing changes the gateway in place; deleting removes exactly
	// the named routes, and a route already gone answers ESRCH.
	for i := range routes {
		routes[i].LinkIndex = l.eth0
		routes[i].Gw = gw(i + 1)
		routes[i].Onlink = i%2 == 0
	}
	if err := l.h.ReplaceRoutes(routes, errs); err != nil {
		t.Fatal(err)
	}
	for i, err := range errs {
		if err != nil {
			t.Fatalf("replacing route %d: %v", i, err)
		}
	}
	got = l.routes(t)
	if g, want := got[subnet(7).String()], fmt.Sprintf("via %s dev %d onlink=false", gw(8), l.eth0); g != want {
		t.Fatalf("route %s: %q, want %q", subnet(7), g, want)
	}
	if g, want := got[subnet(8).String()], fmt.Sprintf("via %s dev %d onlink=true", gw(9), l.eth0); g != want {
		t.Fatalf("route %s: %q, want %q", subnet(8), g, want)
	}
	if err := l.h.DeleteRoutes(routes[:n-1], errs[:n-1]); err != nil {
		t.Fatal(err)
	}
	for i, err := range errs[:n-1] {
		if err != nil {
			t.Fatalf("deleting route %d: %v", i, err)
		}
	}
	if got := l.routes(t); len(got) != 1 || got[subnet(n-1).String()] == "" {
		t.Fatalf("left after delete: %v, want only %s", got, subnet(n-1))
	}
	if err := l.h.DeleteRoutes(routes[:1], errs[:1]); !errors.Is(errs[0], unix.ESRCH) || err != nil {
		t.Fatalf("deleting a missing route: %v, %v; want ESRCH", err, errs[0])
	}
}

// TestNexthopRoutes installs routes through nexthop objects: the kernel
// shows them with the nexthop's gateway and link.
func TestNexthopRoutes(t *testing.T) {
	l := newLab(t)
	const n = 600
	nhs := make([]nlbatch.Nexthop, n)
	routes := make([]nlbatch.Route, n)
	ids := make([]uint32, n)
	for i := range n {
		ids[i] = uint32(1000 + i)
		nhs[i] = nlbatch.Nexthop{ID: ids[i], Gw: gw(i), LinkIndex: l.eth0}
		routes[i] = nlbatch.Route{Dst: subnet(i), NexthopID: ids[i]}
	}
	errs := make([]error, n)
	if err := l.h.ReplaceNexthops(nhs, errs); err != nil {
		t.Fatal(err)
	}
	if err := errors.Join(errs...); err != nil {
		t.Fatalf("adding nexthops: %v", err)
	}
	if err := l.h.ReplaceRoutes(routes, errs); err != nil {
		t.Fatal(err)
	}
	if err := errors.Join(errs...); err != nil {
		t.Fatalf("adding routes: %v", err)
	}
	got := l.routes(t)
	if len(got) != n {
		t.Fatalf("%d routes, want %d", len(got), n)
	}
	if g, want := got[subnet(5).String()], fmt.Sprintf("via %s dev %d onlink=false", gw(5), l.eth0); g != want {
		t.Fatalf("route %s: %q, want %q", subnet(5), g, want)
	}
	// Deleting a nexthop object takes its routes with it.
	if err := l.h.DeleteNexthops(ids[:100], errs[:100]); err != nil || errors.Join(errs[:100]...) != nil {
		t.Fatalf("deleting nexthops: %v %v", err, errors.Join(errs[:100]...))
	}
	if got := l.routes(t); len(got) != n-100 {
		t.Fatalf("%d routes after deleting 100 nexthops, want %d", len(got), n-100)
	}
	// A route to a deleted nexthop fails alone.
	bad := []nlbatch.Route{{Dst: subnet(1), NexthopID: 1}, {Dst: subnet(2), NexthopID: ids[200]}}
	if err := l.h.ReplaceRoutes(bad, errs[:2]); err != nil || errs[0] == nil || errs[1] != nil {
		t.Fatalf("a route via a deleted and one via a live nexthop: %v %v", err, errs[:2])
	}
}

// TestNeighsAndFDB sets and deletes neighbours and fdb entries on a vxlan
// device.
func TestNeighsAndFDB(t *testing.T) {
	l := newLab(t)
	vx := &netlink.Vxlan{LinkAttrs: netlink.LinkAttrs{Name: "flannel.1"}, VxlanId: 1, VtepDevIndex: l.eth0, Port: 8472, Learning: false}
	if err := l.h.LinkAdd(vx); err != nil {
		t.Fatal(err)
	}
	link, err := l.h.LinkByName("flannel.1")
	if err != nil {
		t.Fatal(err)
	}
	idx := link.Attrs().Index
	const n = 700
	neighs := make([]nlbatch.Neigh, 0, 2*n)
	for i := range n {
		mac := [6]byte{0x0a, 0x58, 0, 0, byte(i >> 8), byte(i)}
		neighs = append(neighs,
			nlbatch.Neigh{LinkIndex: idx, Family: unix.AF_INET, State: unix.NUD_PERMANENT, Type: unix.RTN_UNICAST, IP: subnet(i).Addr(), MAC: mac},
			nlbatch.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, State: unix.NUD_PERMANENT, Flags: netlink.NTF_SELF, IP: gw(i), MAC: mac})
	}
	errs := make([]error, len(neighs))
	if err := l.h.SetNeighs(neighs, errs); err != nil || errors.Join(errs...) != nil {
		t.Fatalf("setting: %v %v", err, errors.Join(errs...))
	}
	count := func() (ip4, fdb int) {
		t.Helper()
		list, err := l.h.NeighList(idx, unix.AF_INET)
		if err != nil {
			t.Fatal(err)
		}
		for _, nb := range list {
			if nb.State == unix.NUD_PERMANENT {
				ip4++
			}
		}
		list, err = l.h.NeighList(idx, unix.AF_BRIDGE)
		if err != nil {
			t.Fatal(err)
		}
		for _, nb := range list {
			if nb.Flags&netlink.NTF_SELF != 0 && nb.IP.To4() != nil && nb.IP.To4()[0] == 192 {
				fdb++
			}
		}
		return ip4, fdb
	}
	if a, f := count(); a != n || f != n {
		t.Fatalf("%d neighbours and %d fdb entries, want %d each", a, f, n)
	}
	// ListNeighs agrees with vishvananda/netlink's decoding.
	for _, fam := range []uint8{unix.AF_INET, unix.AF_BRIDGE} {
		want := map[string]bool{}
		list, err := l.h.NeighList(idx, int(fam))
		if err != nil {
			t.Fatal(err)
		}
		for _, nb := range list {
			ipa, _ := netip.AddrFromSlice(nb.IP)
			want[fmt.Sprint(nb.LinkIndex, ipa.Unmap(), nb.HardwareAddr, nb.State, nb.Flags, nb.VNI)] = true
		}
		got := map[string]bool{}
		err = l.h.ListNeighs(fam, idx, func(e *nlbatch.Neigh) bool {
			var mac net.HardwareAddr
			if e.MAC != ([6]byte{}) {
				mac = e.MAC[:]
			}
			got[fmt.Sprint(e.LinkIndex, e.IP, mac, int(e.State), int(e.Flags), int(e.VNI))] = true
			return true
		})
		if err != nil {
			t.Fatal(err)
		}
		if len(got) < n || len(got) != len(want) {
			t.Fatalf("family %d: ListNeighs saw %d entries, vishvananda/netlink %d, want at least %d", fam, len(got), len(want), n)
		}
		for k := range want {
			if !got[k] {
				t.Errorf("family %d: entry %s missing from ListNeighs", fam, k)
				break
			}
		}
	}
	list, err := l.h.NeighList(idx, unix.AF_INET)
	if err != nil {
		t.Fatal(err)
	}
	for _, nb := range list {
		if nb.IP.Equal(subnet(3).Addr().AsSlice()) && nb.HardwareAddr.String() != "0a:58:00:00:00:03" {
			t.Fatalf("neighbour %s has lladdr %s", nb.IP, nb.HardwareAddr)
		}
	}
	if err := l.h.DeleteNeighs(neighs, errs); err != nil || errors.Join(errs...) != nil {
		t.Fatalf("deleting: %v %v", err, errors.Join(errs...))
	}
	if a, f := count(); a != 0 || f != 0 {
		t.Fatalf("%d neighbours and %d fdb entries left, want none", a, f)
	}
	if err := l.h.DeleteNeighs(neighs[:1], errs[:1]); err != nil || !errors.Is(errs[0], unix.ENOENT) {
		t.Fatalf("deleting a missing neighbour: %v %v; want ENOENT", err, errs[0])
	}
}

// TestResultsLength rejects a result slice of the wrong length.
func TestResultsLength(t *testing.T) {
	l := newLab(t)
	err := l.h.ReplaceRoutes([]nlbatch.Route{{Dst: subnet(1), Gw: gw(1), LinkIndex: l.eth0}}, make([]error, 2))
	if err == nil {
		t.Fatal("2 results for 1 request accepted")
	}
	if got := l.routes(t); len(got) != 0 {
		t.Fatalf("routes installed despite the error: %v", got)
	}
}

// sameGateway is n routes into 10.0.0.0/8, all via one gateway on link.
func sameGateway(n, link int) []nlbatch.Route {
	routes := make([]nlbatch.Route, n)
	for i := range routes {
		routes[i] = nlbatch.Route{Dst: subnet(i), Gw: gw(1), LinkIndex: link}
	}
	return routes
}

// BenchmarkReplaceRoutes programs 10,000 routes through one gateway per
// iteration (the kernel's per-route cost without its distinct-gateway
// slowdown), batched and one request at a time.
func BenchmarkReplaceRoutes(b *testing.B) {
	l := newLab(b)
	h, eth0 := l.h, l.eth0
	const n = 10000
	routes := sameGateway(n, eth0)
	errs := make([]error, n)
	b.Run("batched", func(b *testing.B) {
		for b.Loop() {
			if err := h.ReplaceRoutes(routes, errs); err != nil || errors.Join(errs...) != nil {
				b.Fatal(err, errors.Join(errs...))
			}
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/route")
	})
	b.Run("single", func(b *testing.B) {
		for b.Loop() {
			for i := range routes {
				r := &netlink.Route{LinkIndex: eth0, Dst: &net.IPNet{IP: routes[i].Dst.Addr().AsSlice(), Mask: net.CIDRMask(24, 32)}, Gw: gw(1).AsSlice()}
				if err := h.RouteReplace(r); err != nil {
					b.Fatal(err)
				}
			}
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/route")
	})
}

// TestListRoutes decodes a dump of many routes of every kind the kernel
// holds (connected, gateway, onlink, metric, other table, nexthop object,
// multipath) and agrees with vishvananda/netlink's decoding of the same
// table.
func TestListRoutes(t *testing.T) {
	l := newLab(t)
	const n = 3000 // several dump datagrams
	routes := make([]nlbatch.Route, n)
	for i := range routes {
		routes[i] = nlbatch.Route{Dst: subnet(i), Gw: gw(i), LinkIndex: l.eth0, Onlink: i%3 == 0}
	}
	errs := make([]error, n)
	if err := l.h.ReplaceRoutes(routes, errs); err != nil || errors.Join(errs...) != nil {
		t.Fatal(err, errors.Join(errs...))
	}
	if err := l.h.ReplaceNexthops([]nlbatch.Nexthop{{ID: 77, Gw: gw(1), LinkIndex: l.eth0}}, errs[:1]); err != nil || errs[0] != nil {
		t.Fatal(err, errs[0])
	}
	if err := l.h.ReplaceRoutes([]nlbatch.Route{{Dst: netip.MustParsePrefix("172.20.0.0/16"), NexthopID: 77}}, errs[:1]); err != nil || errs[0] != nil {
		t.Fatal(err, errs[0])
	}
	extra := []*netlink.Route{
		{Dst: &net.IPNet{IP: net.IPv4(172, 21, 0, 0), Mask: net.CIDRMask(16, 32)}, Gw: net.IPv4(192, 168, 0, 9), LinkIndex: l.eth0, Priority: 50},
		{Dst: &net.IPNet{IP: net.IPv4(172, 22, 0, 0), Mask: net.CIDRMask(16, 32)}, Gw: net.IPv4(192, 168, 0, 9), LinkIndex: l.eth0, Table: 100},
		{Dst: &net.IPNet{IP: net.IPv4(172, 23, 0, 0), Mask: net.CIDRMask(16, 32)}, MultiPath: []*netlink.NexthopInfo{
			{LinkIndex: l.eth0, Gw: net.IPv4(192, 168, 0, 9)}, {LinkIndex: l.eth0, Gw: net.IPv4(192, 168, 0, 10)}}},
		{Gw: net.IPv4(192, 168, 0, 254), LinkIndex: l.eth0}, // default route
	}
	for _, r := range extra {
		if err := l.h.RouteAdd(r); err != nil {
			t.Fatalf("adding %v: %v", r, err)
		}
	}

	type row struct {
		dst, gw                           string
		link, table, flags, metric, proto int
		multipath                         bool
	}
	want := map[string]row{}
	err := l.h.RouteListFilteredIter(unix.AF_INET, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE, func(r netlink.Route) bool {
		dst := "0.0.0.0/0"
		if r.Dst != nil {
			dst = r.Dst.String()
		}
		gw := "invalid IP"
		if r.Gw != nil {
			gw = r.Gw.String()
		}
		want[fmt.Sprint(dst, " ", r.Table)] = row{dst, gw, r.LinkIndex, r.Table, r.Flags & unix.RTNH_F_ONLINK, r.Priority, int(r.Protocol), len(r.MultiPath) > 0}
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]row{}
	var nh uint32
	err = l.h.ListRoutes(func(e *nlbatch.Route) bool {
		got[fmt.Sprint(e.Dst, " ", e.Table)] = row{e.Dst.String(), e.Gw.String(), e.LinkIndex, int(e.Table), onlinkFlag(e), int(e.Priority), int(e.Protocol), e.Multipath}
		if e.Dst.String() == "172.20.0.0/16" {
			nh = e.NexthopID
		}
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) < n+len(extra)+1 || len(got) != len(want) {
		t.Fatalf("ListRoutes saw %d routes, vishvananda/netlink %d; want at least %d", len(got), len(want), n+len(extra)+1)
	}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("route %s: ListRoutes %+v, vishvananda/netlink %+v", k, got[k], w)
		}
	}
	if nh != 77 {
		t.Errorf("the nexthop route's NexthopID = %d, want 77", nh)
	}

	// Stopping early stops the callbacks but still drains the dump: the
	// next request on the handle works.
	calls := 0
	if err := l.h.ListRoutes(func(*nlbatch.Route) bool { calls++; return calls < 10 }); err != nil || calls != 10 {
		t.Fatalf("early stop: %d calls, %v", calls, err)
	}
	if err := l.h.DeleteRoutes(routes[:5], errs[:5]); err != nil || errors.Join(errs[:5]...) != nil {
		t.Fatalf("deleting after an early stop: %v %v", err, errors.Join(errs[:5]...))
	}
}

// BenchmarkListRoutes dumps a table of 10,000 routes: ListRoutes against
// vishvananda/netlink's decoding.
func BenchmarkListRoutes(b *testing.B) {
	l := newLab(b)
	h := l.h
	const n = 10000
	routes := sameGateway(n, l.eth0)
	errs := make([]error, n)
	if err := h.ReplaceRoutes(routes, errs); err != nil || errors.Join(errs...) != nil {
		b.Fatal(err, errors.Join(errs...))
	}
	b.Run("nlbatch", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			c := 0
			if err := h.ListRoutes(func(*nlbatch.Route) bool { c++; return true }); err != nil || c < n {
				b.Fatal(err, c)
			}
		}
	})
	b.Run("vishvananda", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			c := 0
			err := h.RouteListFilteredIter(unix.AF_INET, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE, func(netlink.Route) bool { c++; return true })
			if err != nil || c < n {
				b.Fatal(err, c)
			}
		}
	})
}

// TestRoutes6 writes IPv6 routes (plain, onlink, through an IPv6 nexthop
// object) and IPv6 neighbours in batches, and ListRoutes6 decodes the table
// as vishvananda/netlink does; ListRoutes still sees IPv4 routes only.
func TestRoutes6(t *testing.T) {
	l := newLab(t)
	eth0, err := l.h.LinkByIndex(l.eth0)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := netlink.ParseAddr("fd5e::1/64")
	a.Flags = unix.IFA_F_NODAD
	if err := l.h.AddrAdd(eth0, a); err != nil {
		t.Fatal(err)
	}
	const n = 1500 // several chunks and dump datagrams
	sub6 := func(i int) netip.Prefix {
		return netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfc, 0, 0, 5, 0, byte(i >> 8), byte(i)}), 64)
	}
	routes := make([]nlbatch.Route, n)
	for i := range routes {
		routes[i] = nlbatch.Route{Dst: sub6(i), Gw: netip.MustParseAddr(fmt.Sprintf("fd5e::%x", i+2)), LinkIndex: l.eth0}
		if i%3 == 0 {
			routes[i].Gw, routes[i].Onlink = sub6(i).Addr(), true
		}
	}
	errs := make([]error, n)
	if err := l.h.ReplaceRoutes(routes, errs); err != nil || errors.Join(errs...) != nil {
		t.Fatal(err, errors.Join(errs...))
	}
	if err := l.h.ReplaceNexthops([]nlbatch.Nexthop{{ID: 0xf0000077, Gw: netip.MustParseAddr("fd5e::77"), LinkIndex: l.eth0}}, errs[:1]); err != nil || errs[0] != nil {
		t.Fatal(err, errs[0])
	}
	nhRoute := nlbatch.Route{Dst: netip.MustParsePrefix("fd99::/64"), NexthopID: 0xf0000077}
	if err := l.h.ReplaceRoutes([]nlbatch.Route{nhRoute}, errs[:1]); err != nil || errs[0] != nil {
		t.Fatal(err, errs[0])
	}
	neighs := []nlbatch.Neigh{{LinkIndex: l.eth0, Family: unix.AF_INET6, State: unix.NUD_PERMANENT, Type: unix.RTN_UNICAST,
		IP: netip.MustParseAddr("fd5e::99"), MAC: [6]byte{0x0e, 0, 0, 0, 0, 0x99}}}
	if err := l.h.SetNeighs(neighs, errs[:1]); err != nil || errs[0] != nil {
		t.Fatal(err, errs[0])
	}

	type row struct {
		gw                  string
		link, flags, metric int
	}
	want := map[string]row{}
	err = l.h.RouteListFilteredIter(unix.AF_INET6, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE, func(r netlink.Route) bool {
		if r.Dst != nil && (r.Dst.IP[0] == 0xfc || r.Dst.IP[0] == 0xfd && r.Dst.IP[1] == 0x99) {
			gw := "invalid IP"
			if r.Gw != nil {
				gw = r.Gw.String()
			}
			want[r.Dst.String()] = row{gw, r.LinkIndex, r.Flags & unix.RTNH_F_ONLINK, r.Priority}
		}
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]row{}
	var nh uint32
	err = l.h.ListRoutes6(func(e *nlbatch.Route) bool {
		if !e.Dst.Addr().Is6() {
			t.Errorf("ListRoutes6 reported %s", e.Dst)
		}
		if b := e.Dst.Addr().As16(); e.Table == unix.RT_TABLE_MAIN && (b[0] == 0xfc || b[0] == 0xfd && b[1] == 0x99) {
			got[e.Dst.String()] = row{e.Gw.String(), e.LinkIndex, onlinkFlag(e), int(e.Priority)}
			if e.Dst == nhRoute.Dst {
				nh = e.NexthopID
			}
		}
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != n+1 || len(want) != n+1 {
		t.Fatalf("ListRoutes6 saw %d routes, vishvananda/netlink %d; want %d", len(got), len(want), n+1)
	}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("route %s: ListRoutes6 %+v, vishvananda/netlink %+v", k, got[k], w)
		}
	}
	if nh != 0xf0000077 {
		t.Errorf("the nexthop route's NexthopID = %#x", nh)
	}
	if r1, r0 := got[sub6(1).String()], got[sub6(0).String()]; r1.gw != "fd5e::3" || r1.flags&unix.RTNH_F_ONLINK != 0 ||
		r0.gw != sub6(0).Addr().String() || r0.flags&unix.RTNH_F_ONLINK == 0 || r0.metric != 1024 {
		t.Errorf("routes %s %+v, %s %+v; want via fd5e::3, and onlink via the subnet address, metric 1024", sub6(1), r1, sub6(0), r0)
	}
	if err := l.h.ListRoutes(func(e *nlbatch.Route) bool {
		if !e.Dst.Addr().Is4() {
			t.Errorf("ListRoutes reported %s", e.Dst)
		}
		return true
	}); err != nil {
		t.Fatal(err)
	}
	var neighSeen bool
	if err := l.h.ListNeighs(unix.AF_INET6, l.eth0, func(e *nlbatch.Neigh) bool {
		neighSeen = neighSeen || e.IP == neighs[0].IP && e.MAC == neighs[0].MAC && e.State == unix.NUD_PERMANENT
		return true
	}); err != nil || !neighSeen {
		t.Errorf("the IPv6 neighbour was not listed: %v", err)
	}

	if err := l.h.DeleteRoutes(append(routes, nhRoute), make([]error, n+1)); err != nil {
		t.Fatal(err)
	}
	left := 0
	if err := l.h.ListRoutes6(func(e *nlbatch.Route) bool {
		if b := e.Dst.Addr().As16(); b[0] == 0xfc {
			left++
		}
		return true
	}); err != nil || left != 0 {
		t.Errorf("%d routes left after DeleteRoutes, %v", left, err)
	}
}

// onlinkFlag is the rtm_flags bit a route's Onlink stands for.
func onlinkFlag(e *nlbatch.Route) int {
	if e.Onlink {
		return unix.RTNH_F_ONLINK
	}
	return 0
}
