package backend

import (
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"

	"github.com/flanneld-go/flanneld/pkg/ip"
)

// AddrNetlink is the part of *nlbatch.Handle ReconcileAddrs uses.
type AddrNetlink interface {
	AddrList(link netlink.Link, family int) ([]netlink.Addr, error)
	ReplaceAddr(link int, p netip.Prefix, metric uint32) error
	AddrDel(link netlink.Link, addr *netlink.Addr) error
}

// ReconcileAddrs makes want (an address with its prefix length, as
// 10.5.1.0/16) the only address of its family on link, through a
// Reconciler: added (with metric for its prefix route, 0 for the kernel's
// default) before any other (a previous lease's) is deleted. An address in
// place is left as it is, whatever its route's metric. IPv6
// link-local addresses are the kernel's and left alone. An IPv4 device
// whose new address shares the old one's subnet needs promote_secondaries
// (nlbatch.Handle.PromoteSecondaries), or deleting the old primary takes
// the new secondary along.
func ReconcileAddrs(nl AddrNetlink, link netlink.Link, want netip.Prefix, metric uint32) (Changes, error) {
	t := addrTable{nl: nl, link: link, family: netlink.FAMILY_V4, metric: metric}
	if !want.Addr().Is4() {
		t.family = netlink.FAMILY_V6
	}
	c, err := NewReconciler[netip.Prefix, netip.Prefix](t, netip.Prefix.Compare, Same[netip.Prefix]).Reconcile([]Entry[netip.Prefix, netip.Prefix]{{want, want}})
	if err != nil {
		return c, fmt.Errorf("configuring the address of %s: %w", link.Attrs().Name, err)
	}
	return c, nil
}

// addrTable is the addresses of one family on one link.
type addrTable struct {
	nl     AddrNetlink
	link   netlink.Link
	family int
	metric uint32
}

func (t addrTable) Dump(add func(k, v netip.Prefix)) error {
	addrs, err := t.nl.AddrList(t.link, t.family)
	if err != nil {
		return fmt.Errorf("listing addresses: %w", err)
	}
	for _, a := range addrs {
		if a.IPNet == nil {
			continue
		}
		addr, ok := ip.AddrFromIP(a.IP)
		ones, bits := a.Mask.Size()
		if ok && bits == addr.BitLen() && !addr.IsLinkLocalUnicast() {
			p := netip.PrefixFrom(addr, ones)
			add(p, p)
		}
	}
	return nil
}

func (t addrTable) Set(_, ps []netip.Prefix, errs []error) {
	for i, p := range ps {
		if err := t.nl.ReplaceAddr(t.link.Attrs().Index, p, t.metric); err != nil {
			errs[i] = fmt.Errorf("adding address %s: %w", p, err)
		}
	}
}

func (t addrTable) Delete(_, ps []netip.Prefix, errs []error) {
	for i, p := range ps {
		if err := t.nl.AddrDel(t.link, &netlink.Addr{IPNet: ip.HostNet(p.Addr(), p.Bits())}); err != nil {
			errs[i] = fmt.Errorf("removing stale address %s: %w", p, err)
		}
	}
}
