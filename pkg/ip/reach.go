package ip

import (
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
)

// InterfaceToReach picks the external interface as flannel's
// --iface-can-reach does: the interface and source address of the route
// the kernel would take to dst (`ip route get dst`). h nil means the
// process's network namespace.
func InterfaceToReach(h *netlink.Handle, dst netip.Addr) (Iface, error) {
	if h == nil {
		h = &netlink.Handle{}
	}
	routes, err := h.RouteGet(dst.AsSlice())
	if err != nil {
		return Iface{}, fmt.Errorf("%w: --iface-can-reach %s: no route to it (%v)", ErrNoInterface, dst, err)
	}
	if len(routes) == 0 || routes[0].LinkIndex == 0 {
		return Iface{}, fmt.Errorf("%w: --iface-can-reach %s: the route to it names no interface", ErrNoInterface, dst)
	}
	r := routes[0]
	l, err := h.LinkByIndex(r.LinkIndex)
	if err != nil {
		return Iface{}, fmt.Errorf("%w: --iface-can-reach %s: the route's interface %d: %v", ErrNoInterface, dst, r.LinkIndex, err)
	}
	c := chooser{h: h}
	src, _ := AddrFromIP(r.Src)
	switch {
	case src.Is4():
		return c.iface(l, src, netip.Addr{}), nil
	case src.Is6():
		return c.iface(l, netip.Addr{}, src), nil
	}
	if len(c.addrs4(l))+len(c.addrs6(l)) == 0 {
		return Iface{}, fmt.Errorf("%w: --iface-can-reach %s: its interface %s has no IPv4 or global IPv6 address", ErrNoInterface, dst, l.Attrs().Name)
	}
	return c.iface(l, netip.Addr{}, netip.Addr{}), nil
}
