package network

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/internal/nstest"
	"github.com/flanneld-go/flanneld/pkg/ip"
)

// TestBlackholeInNetns (--ip-blackhole-route): Ensure adds a blackhole
// route for each own subnet (IPv4 and IPv6), adds nothing when one is
// there, and Run puts one back after it is deleted by hand; traffic to the
// subnet is then refused locally instead of taking the default route.
func TestBlackholeInNetns(t *testing.T) {
	ns := nstest.New(t, "flanneld-bh")
	ns.Veth(t, "eth0", 0, nil, "eth0p", "192.168.9.1/24")
	nl, err := netlink.NewHandleAt(ns.Handle)
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	if err := nl.RouteAdd(&netlink.Route{LinkIndex: mustIndex(t, nl, "eth0"), Gw: ip.IP(netip.MustParseAddr("192.168.9.254"))}); err != nil {
		t.Fatal(err)
	}
	v4, v6 := netip.MustParsePrefix("10.5.34.0/24"), netip.MustParsePrefix("fc00:0:0:22::/64")
	b := NewBlackhole(nl, []netip.Prefix{v4, v6, {}}, 10*time.Millisecond, testLogger(t))
	blackholes := func(p netip.Prefix) int {
		family := netlink.FAMILY_V4
		if p.Addr().Is6() {
			family = netlink.FAMILY_V6
		}
		rs, err := ns.NL.RouteListFiltered(family, &netlink.Route{Dst: ip.IPNet(p), Type: unix.RTN_BLACKHOLE, Table: unix.RT_TABLE_MAIN},
			netlink.RT_FILTER_DST|netlink.RT_FILTER_TYPE|netlink.RT_FILTER_TABLE)
		if err != nil {
			t.Fatal(err)
		}
		return len(rs)
	}
	ctx := context.Background()
	for i := 0; i < 2; i++ {
		if err := b.Ensure(ctx); err != nil {
			t.Fatalf("Ensure %d: %v", i+1, err)
		}
		for _, p := range []netip.Prefix{v4, v6} {
			if n := blackholes(p); n != 1 {
				t.Errorf("Ensure %d: %d blackhole routes for %s, want 1", i+1, n, p)
			}
		}
	}
	// The kernel refuses traffic to the subnet instead of routing it via
	// the default gateway.
	rs, err := ns.NL.RouteGet(ip.IP(netip.MustParseAddr("10.5.34.77")))
	if err == nil && len(rs) > 0 && rs[0].Gw != nil {
		t.Errorf("10.5.34.77 is routed via %v, want the blackhole", rs[0].Gw)
	}

	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- b.Run(runCtx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run = %v", err)
		}
	}()
	for _, p := range []netip.Prefix{v4, v6} {
		if err := ns.NL.RouteDel(&netlink.Route{Dst: ip.IPNet(p), Type: unix.RTN_BLACKHOLE, Table: unix.RT_TABLE_MAIN}); err != nil {
			t.Fatalf("deleting the blackhole route of %s: %v", p, err)
		}
	}
	eventually(t, "the blackhole routes to come back", func() bool { return blackholes(v4) == 1 && blackholes(v6) == 1 })
}

func mustIndex(t *testing.T, nl *netlink.Handle, name string) int {
	t.Helper()
	l, err := nl.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	return l.Attrs().Index
}
