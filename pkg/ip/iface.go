package ip

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// ErrNoInterface is wrapped by every error of ChooseInterface.
var ErrNoInterface = errors.New("no usable external interface")

// Iface is an interface chosen to carry overlay traffic, with its addresses
// used as the tunnel endpoints. Whether a family is needed is the network
// config's business, read later: the interface is chosen with what it has.
type Iface struct {
	Iface *net.Interface
	// Addr is its IPv4 address; invalid if it has none.
	Addr netip.Addr
	// Addr6 is its global IPv6 address (not link-local, temporary,
	// deprecated or failed DAD); invalid if it has none.
	Addr6 netip.Addr
	// NoAddr6 says, when Addr6 is invalid, why and what to do, for the
	// line a daemon whose config enables IPv6 fails with.
	NoAddr6 string
}

// ChooseInterface picks the external interface the way flannel does: each
// entry of names (an interface name or one of its addresses, IPv4 or IPv6)
// in order, then each of regexes matched against every interface's IPv4
// addresses, then its IPv6 addresses, then its name, else the interface of
// the IPv4 default route (of the IPv6 default route when there is no IPv4
// one). An interface qualifies with an address of either family; Addr and
// Addr6 are its first address of each. h nil means the process's network
// namespace.
func ChooseInterface(h *netlink.Handle, names, regexes []string) (Iface, error) {
	if h == nil {
		h = &netlink.Handle{}
	}
	links, err := h.LinkList()
	if err != nil {
		return Iface{}, fmt.Errorf("listing interfaces: %w", err)
	}
	c := chooser{h: h}
	var errs []error
	for _, name := range names {
		if a, err := netip.ParseAddr(name); err == nil {
			for _, l := range links {
				if a.Is4() && contains(c.addrs4(l), a) {
					return c.iface(l, a, netip.Addr{}), nil
				}
				if a.Is6() && !a.Is4In6() && contains(c.addrs6(l), a) {
					return c.iface(l, netip.Addr{}, a), nil
				}
			}
			errs = append(errs, fmt.Errorf("--iface %s: no interface has this address", name))
			continue
		}
		l, err := h.LinkByName(name)
		if err != nil {
			errs = append(errs, fmt.Errorf("--iface %s: no such interface", name))
			continue
		}
		if len(c.addrs4(l))+len(c.addrs6(l)) == 0 {
			errs = append(errs, fmt.Errorf("--iface %s has no IPv4 or global IPv6 address", name))
			continue
		}
		return c.iface(l, netip.Addr{}, netip.Addr{}), nil
	}
	for _, expr := range regexes {
		re, err := regexp.Compile(expr)
		if err != nil {
			errs = append(errs, fmt.Errorf("--iface-regex %q is not a valid regular expression: %v", expr, err))
			continue
		}
		if ifc, ok := c.matchRegex(links, re); ok {
			return ifc, nil
		}
		errs = append(errs, fmt.Errorf("--iface-regex %q matches no interface with an IPv4 or global IPv6 address", expr))
	}
	if len(names) > 0 || len(regexes) > 0 {
		// One line: "; " between the reasons, not errors.Join's newlines.
		msgs := make([]string, len(errs))
		for i, e := range errs {
			msgs[i] = e.Error()
		}
		return Iface{}, fmt.Errorf("%w: %s", ErrNoInterface, strings.Join(msgs, "; "))
	}

	l, err := defaultRouteLink(h, netlink.FAMILY_V4)
	if err != nil {
		return Iface{}, err
	}
	if l != nil {
		if len(c.addrs4(l)) == 0 {
			return Iface{}, fmt.Errorf("%w: the default route's interface %s has no IPv4 address; pass --iface", ErrNoInterface, l.Attrs().Name)
		}
		ifc := c.iface(l, netip.Addr{}, netip.Addr{})
		if !ifc.Addr6.IsValid() {
			if l6, err := defaultRouteLink(h, netlink.FAMILY_V6); err == nil && l6 != nil && l6.Attrs().Index != l.Attrs().Index {
				ifc.NoAddr6 += fmt.Sprintf("; the IPv6 default route is on %s: choose one interface for both families with --iface", l6.Attrs().Name)
			}
		}
		return ifc, nil
	}
	l, err = defaultRouteLink(h, netlink.FAMILY_V6)
	if err != nil {
		return Iface{}, err
	}
	if l != nil {
		if len(c.addrs6(l)) == 0 {
			return Iface{}, fmt.Errorf("%w: there is no IPv4 default route and the IPv6 default route's interface %s has no global IPv6 address; pass --iface", ErrNoInterface, l.Attrs().Name)
		}
		return c.iface(l, netip.Addr{}, netip.Addr{}), nil
	}
	return Iface{}, fmt.Errorf("%w: there is no IPv4 or IPv6 default route; pass --iface or --iface-regex", ErrNoInterface)
}

// chooser reads interfaces' addresses.
type chooser struct{ h *netlink.Handle }

func (c chooser) addrs4(l netlink.Link) []netip.Addr {
	list, err := c.h.AddrList(l, netlink.FAMILY_V4)
	if err != nil {
		return nil
	}
	var out []netip.Addr
	for _, a := range list {
		if v, ok := FromIP(a.IP); ok {
			out = append(out, v)
		}
	}
	return out
}

// addrs6 lists l's global IPv6 addresses, the stable ones: neither
// link-local, temporary (privacy) nor deprecated, nor failed DAD.
func (c chooser) addrs6(l netlink.Link) []netip.Addr {
	list, err := c.h.AddrList(l, netlink.FAMILY_V6)
	if err != nil {
		return nil
	}
	var out []netip.Addr
	for _, a := range list {
		v, ok := AddrFromIP(a.IP)
		if !ok || !v.Is6() || v.Is4In6() || !v.IsGlobalUnicast() ||
			a.Flags&(unix.IFA_F_TEMPORARY|unix.IFA_F_DEPRECATED|unix.IFA_F_DADFAILED) != 0 {
			continue
		}
		out = append(out, v)
	}
	return out
}

// iface is l with the given addresses, each filled with l's first one of
// its family when not given.
func (c chooser) iface(l netlink.Link, a4, a6 netip.Addr) Iface {
	if !a4.IsValid() {
		if as := c.addrs4(l); len(as) > 0 {
			a4 = as[0]
		}
	}
	if !a6.IsValid() {
		if as := c.addrs6(l); len(as) > 0 {
			a6 = as[0]
		}
	}
	ifc := Iface{Iface: toInterface(l), Addr: a4, Addr6: a6}
	if !a6.IsValid() {
		ifc.NoAddr6 = fmt.Sprintf("interface %s has no global IPv6 address", l.Attrs().Name)
	}
	return ifc
}

// matchRegex tries re against every IPv4 address, then every IPv6 one,
// then every name of an interface with an address.
func (c chooser) matchRegex(links []netlink.Link, re *regexp.Regexp) (Iface, bool) {
	for _, l := range links {
		for _, a := range c.addrs4(l) {
			if re.MatchString(a.String()) {
				return c.iface(l, a, netip.Addr{}), true
			}
		}
	}
	for _, l := range links {
		for _, a := range c.addrs6(l) {
			if re.MatchString(a.String()) {
				return c.iface(l, netip.Addr{}, a), true
			}
		}
	}
	for _, l := range links {
		if len(c.addrs4(l))+len(c.addrs6(l)) > 0 && re.MatchString(l.Attrs().Name) {
			return c.iface(l, netip.Addr{}, netip.Addr{}), true
		}
	}
	return Iface{}, false
}

// defaultRouteLink returns the interface of the family's default route in
// the main table, or nil if there is none.
func defaultRouteLink(h *netlink.Handle, family int) (netlink.Link, error) {
	routes, err := h.RouteList(nil, family)
	if err != nil {
		return nil, fmt.Errorf("listing routes: %w", err)
	}
	for _, r := range routes {
		if r.Dst != nil && r.Dst.IP != nil && !r.Dst.IP.IsUnspecified() {
			continue
		}
		if ones, _ := maskOnes(r.Dst); ones != 0 || (r.Type != 0 && r.Type != unix.RTN_UNICAST) {
			continue
		}
		index := r.LinkIndex
		if index == 0 && len(r.MultiPath) > 0 {
			index = r.MultiPath[0].LinkIndex
		}
		if l, err := h.LinkByIndex(index); err == nil {
			return l, nil
		}
	}
	return nil, nil
}

func contains(as []netip.Addr, a netip.Addr) bool {
	for _, x := range as {
		if x == a {
			return true
		}
	}
	return false
}

func maskOnes(n *net.IPNet) (int, int) {
	if n == nil {
		return 0, 0
	}
	return n.Mask.Size()
}

func toInterface(l netlink.Link) *net.Interface {
	a := l.Attrs()
	return &net.Interface{Index: a.Index, MTU: a.MTU, Name: a.Name, HardwareAddr: a.HardwareAddr, Flags: a.Flags}
}
