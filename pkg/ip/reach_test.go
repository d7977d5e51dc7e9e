package ip

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/flanneld-go/flanneld/internal/nstest"
)

// TestInterfaceToReach: --iface-can-reach picks the interface and source
// address of the route to the address, not the default route's.
func TestInterfaceToReach(t *testing.T) {
	n := nstest.New(t, "flt-reach")
	h := n.NL
	ext0 := n.Veth(t, "ext0", 1400, nil, "ext0p", "10.250.1.5/24")
	ext1 := n.Veth(t, "ext1", 1500, nil, "ext1p", "10.250.2.5/24", "10.250.2.6/24")
	if err := h.RouteAdd(&netlink.Route{LinkIndex: ext0.Attrs().Index, Gw: IP(netip.MustParseAddr("10.250.1.1"))}); err != nil {
		t.Fatal(err)
	}
	// 10.99.0.0/16 via ext1 with source .6 (not ext1's first address).
	if err := h.RouteAdd(&netlink.Route{LinkIndex: ext1.Attrs().Index, Dst: IPNet(netip.MustParsePrefix("10.99.0.0/16")),
		Gw: IP(netip.MustParseAddr("10.250.2.1")), Src: IP(netip.MustParseAddr("10.250.2.6"))}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		dst, iface, addr string
	}{
		{"10.99.3.4", "ext1", "10.250.2.6"},
		{"10.250.2.77", "ext1", "10.250.2.5"},
		{"192.0.2.1", "ext0", "10.250.1.5"}, // the default route
	} {
		got, err := InterfaceToReach(h.Handle, netip.MustParseAddr(tc.dst))
		if err != nil {
			t.Errorf("to reach %s: %v", tc.dst, err)
			continue
		}
		if got.Iface.Name != tc.iface || got.Addr.String() != tc.addr {
			t.Errorf("to reach %s: %s %s, want %s %s", tc.dst, got.Iface.Name, got.Addr, tc.iface, tc.addr)
		}
	}
	if err := h.RouteDel(&netlink.Route{LinkIndex: ext0.Attrs().Index, Gw: IP(netip.MustParseAddr("10.250.1.1"))}); err != nil {
		t.Fatal(err)
	}
	if _, err := InterfaceToReach(h.Handle, netip.MustParseAddr("192.0.2.1")); !errors.Is(err, ErrNoInterface) {
		t.Errorf("no route: err = %v, want ErrNoInterface", err)
	}
}
