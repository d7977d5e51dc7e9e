package ip

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strings"

	"github.com/vishvananda/netlink"
)

// ErrNoInterface is wrapped by every error of ChooseInterface.
var ErrNoInterface = errors.New("no usable external interface")

// Iface is an interface chosen to carry overlay traffic, with the IPv4
// address used as the tunnel endpoint.
type Iface struct {
	Iface *net.Interface
	Addr  netip.Addr
}

// ChooseInterface picks the external interface the way flannel does: each
// entry of names (an interface name or one of its IPv4 addresses) in order,
// then each of regexes matched against every interface's IPv4 addresses and
// then its name, else the interface of the IPv4 default route. h nil means
// the process's network namespace.
func ChooseInterface(h *netlink.Handle, names, regexes []string) (Iface, error) {
	if h == nil {
		h = &netlink.Handle{}
	}
	links, err := h.LinkList()
	if err != nil {
		return Iface{}, fmt.Errorf("listing interfaces: %w", err)
	}
	addrsOf := func(l netlink.Link) []netip.Addr {
		list, err := h.AddrList(l, netlink.FAMILY_V4)
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
	var errs []error
	for _, name := range names {
		if a, err := netip.ParseAddr(name); err == nil {
			if !a.Is4() {
				errs = append(errs, fmt.Errorf("--iface %s is not an IPv4 address", name))
				continue
			}
			for _, l := range links {
				for _, la := range addrsOf(l) {
					if la == a {
						return Iface{Iface: toInterface(l), Addr: a}, nil
					}
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
		addrs := addrsOf(l)
		if len(addrs) == 0 {
			errs = append(errs, fmt.Errorf("--iface %s has no IPv4 address", name))
			continue
		}
		return Iface{Iface: toInterface(l), Addr: addrs[0]}, nil
	}
	for _, expr := range regexes {
		re, err := regexp.Compile(expr)
		if err != nil {
			errs = append(errs, fmt.Errorf("--iface-regex %q is not a valid regular expression: %v", expr, err))
			continue
		}
		for _, l := range links {
			for _, a := range addrsOf(l) {
				if re.MatchString(a.String()) {
					return Iface{Iface: toInterface(l), Addr: a}, nil
				}
			}
		}
		for _, l := range links {
			if addrs := addrsOf(l); len(addrs) > 0 && re.MatchString(l.Attrs().Name) {
				return Iface{Iface: toInterface(l), Addr: addrs[0]}, nil
			}
		}
		errs = append(errs, fmt.Errorf("--iface-regex %q matches no interface with an IPv4 address", expr))
	}
	if len(names) > 0 || len(regexes) > 0 {
		// One line: "; " between the reasons, not errors.Join's newlines.
		msgs := make([]string, len(errs))
		for i, e := range errs {
			msgs[i] = e.Error()
		}
		return Iface{}, fmt.Errorf("%w: %s", ErrNoInterface, strings.Join(msgs, "; "))
	}
	routes, err := h.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		return Iface{}, fmt.Errorf("listing routes: %w", err)
	}
	for _, r := range routes {
		if r.Dst != nil && r.Dst.IP != nil && !r.Dst.IP.IsUnspecified() {
			continue
		}
		if ones, _ := maskOnes(r.Dst); ones != 0 {
			continue
		}
		l, err := h.LinkByIndex(r.LinkIndex)
		if err != nil {
			continue
		}
		if addrs := addrsOf(l); len(addrs) > 0 {
			return Iface{Iface: toInterface(l), Addr: addrs[0]}, nil
		}
		return Iface{}, fmt.Errorf("%w: the default route's interface %s has no IPv4 address; pass --iface", ErrNoInterface, l.Attrs().Name)
	}
	return Iface{}, fmt.Errorf("%w: there is no IPv4 default route; pass --iface or --iface-regex", ErrNoInterface)
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
