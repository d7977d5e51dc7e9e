package agent

import (
	"fmt"
	"net/netip"
	"strconv"

	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/subnet"
)

// admission is the one place that decides which leases of the store reach
// the backend: a lease is admitted when its subnet is a valid subnet of the
// network config, its PublicIP a usable unicast IPv4 address other than this
// node's (PublicIPv6 likewise, with IPv6), and its backend type this node's (no BackendType counts as udp, as flannel's
// udp backend writes it). Backends then check only what is their own (a
// VtepMAC, a reachable gateway).
//
// A skipped lease is logged once per reason; the record of it goes when the
// lease is admitted or removed, so the set holds only leases that are bad
// now.
type admission struct {
	cfg        *subnet.Config
	publicIP   netip.Addr
	publicIPv6 netip.Addr
	log        klog.Logger
	skipped    map[netip.Prefix]string // the reason logged, by lease key
}

func newAdmission(cfg *subnet.Config, publicIP, publicIPv6 netip.Addr, log klog.Logger) *admission {
	return &admission{cfg: cfg, publicIP: publicIP, publicIPv6: publicIPv6, log: log, skipped: map[netip.Prefix]string{}}
}

// admit reports whether l may reach the backend, logging why not (once).
func (a *admission) admit(l subnet.Lease) bool {
	reason, key := a.reason(l), l.Key()
	if reason == "" {
		delete(a.skipped, key)
		return true
	}
	if a.skipped[key] != reason {
		a.skipped[key] = reason
		a.log.Info("Skipping a lease; fix or remove it in the store", "subnet", key, "publicIP", l.Attrs.PublicIP, "reason", reason)
	}
	return false
}

// forget drops the record of a removed lease.
func (a *admission) forget(p netip.Prefix) { delete(a.skipped, p) }

// reason is why l is not admitted, or "". A lease is taken for each
// family the config enables and the lease has; the IPv6 part of a lease is
// ignored by a node without IPv6 (a dual-stack node among IPv4 ones).
func (a *admission) reason(l subnet.Lease) string {
	c := a.cfg
	has4, has6 := l.Subnet.IsValid(), l.IPv6Subnet.IsValid() && c.EnableIPv6
	if has4 {
		p := l.Subnet
		switch {
		case !c.EnableIPv4:
			return "it has an IPv4 subnet but the network config has EnableIPv4 false"
		case !p.Addr().Is4() || p.Masked() != p:
			return fmt.Sprintf("subnet %s is not an IPv4 subnet", p)
		case !c.Network.Contains(p.Addr()) || p.Bits() != c.SubnetLen:
			return fmt.Sprintf("it does not fit the network config (Network %s, SubnetLen %d)", c.Network, c.SubnetLen)
		case !l.Attrs.PublicIP.Is4():
			return "its PublicIP is not an IPv4 address"
		case unusable(l.Attrs.PublicIP) != "":
			return fmt.Sprintf("its PublicIP %s is not a usable unicast address (%s)", l.Attrs.PublicIP, unusable(l.Attrs.PublicIP))
		case l.Attrs.PublicIP == a.publicIP:
			return fmt.Sprintf("its PublicIP %s is this node's own (a stale lease of this node?)", a.publicIP)
		}
	}
	if has6 {
		p := l.IPv6Subnet
		switch {
		case !p.Addr().Is6() || p.Masked() != p:
			return fmt.Sprintf("IPv6 subnet %s is not an IPv6 subnet", p)
		case !c.IPv6Network.Contains(p.Addr()) || p.Bits() != c.IPv6SubnetLen:
			return fmt.Sprintf("its IPv6 subnet does not fit the network config (IPv6Network %s, IPv6SubnetLen %d)", c.IPv6Network, c.IPv6SubnetLen)
		case !l.Attrs.PublicIPv6.Is6():
			return "it has an IPv6 subnet but no IPv6 PublicIPv6"
		case unusable(l.Attrs.PublicIPv6) != "":
			return fmt.Sprintf("its PublicIPv6 %s is not a usable unicast address (%s)", l.Attrs.PublicIPv6, unusable(l.Attrs.PublicIPv6))
		case a.publicIPv6.IsValid() && l.Attrs.PublicIPv6 == a.publicIPv6:
			return fmt.Sprintf("its PublicIPv6 %s is this node's own (a stale lease of this node?)", a.publicIPv6)
		}
	}
	switch {
	case !has4 && !has6:
		return "it has no subnet of a family the network config enables"
	case !subnet.SameBackend(l.Attrs.BackendType, c.BackendType):
		have := strconv.Quote(l.Attrs.BackendType)
		if l.Attrs.BackendType == "" {
			have = "none (udp)"
		}
		return fmt.Sprintf("its backend type is %s, not %q", have, c.BackendType)
	}
	return ""
}

// broadcast is the IPv4 limited broadcast address.
var broadcast = netip.AddrFrom4([4]byte{255, 255, 255, 255})

// unusable says why a cannot be a node's tunnel endpoint (what kind of
// address it is), or "" when it is a usable unicast address.
func unusable(a netip.Addr) string {
	switch {
	case a.IsUnspecified():
		return "unspecified"
	case a.IsLoopback():
		return "loopback"
	case a.IsMulticast():
		return "multicast"
	case a == broadcast:
		return "broadcast"
	case a.IsLinkLocalUnicast():
		return "link-local"
	}
	return ""
}
