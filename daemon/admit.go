package daemon

import (
	"fmt"
	"net/netip"
	"strconv"

	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/subnet"
)

// admission is the one place that decides which leases of the store reach
// the backend: a lease is admitted when its subnet is a valid subnet of the
// network config, its PublicIP an IPv4 address other than this node's, and
// its backend type this node's (no BackendType counts as udp, as flannel's
// udp backend writes it). Backends then check only what is their own (a
// VtepMAC, a reachable gateway).
//
// A skipped lease is logged once per reason; the record of it goes when the
// lease is admitted or removed, so the set holds only leases that are bad
// now.
type admission struct {
	network     netip.Prefix
	subnetLen   int
	backendType string
	publicIP    netip.Addr
	log         klog.Logger
	skipped     map[netip.Prefix]string // the reason logged, by subnet
}

func newAdmission(cfg *subnet.Config, publicIP netip.Addr, log klog.Logger) *admission {
	return &admission{network: cfg.Network, subnetLen: cfg.SubnetLen, backendType: cfg.BackendType,
		publicIP: publicIP, log: log, skipped: map[netip.Prefix]string{}}
}

// admit reports whether l may reach the backend, logging why not (once).
func (a *admission) admit(l subnet.Lease) bool {
	reason := a.reason(l)
	if reason == "" {
		delete(a.skipped, l.Subnet)
		return true
	}
	if a.skipped[l.Subnet] != reason {
		a.skipped[l.Subnet] = reason
		a.log.Info("Skipping a lease; fix or remove it in the store", "subnet", l.Subnet, "publicIP", l.Attrs.PublicIP, "reason", reason)
	}
	return false
}

// forget drops the record of a removed lease.
func (a *admission) forget(p netip.Prefix) { delete(a.skipped, p) }

// reason is why l is not admitted, or "".
func (a *admission) reason(l subnet.Lease) string {
	p := l.Subnet
	switch {
	case !p.IsValid() || !p.Addr().Is4() || p.Masked() != p:
		return fmt.Sprintf("subnet %s is not an IPv4 subnet", p)
	case !a.network.Contains(p.Addr()) || p.Bits() != a.subnetLen:
		return fmt.Sprintf("it does not fit the network config (Network %s, SubnetLen %d)", a.network, a.subnetLen)
	case !l.Attrs.PublicIP.Is4():
		return "its PublicIP is not an IPv4 address"
	case l.Attrs.PublicIP == a.publicIP:
		return fmt.Sprintf("its PublicIP %s is this node's own (a stale lease of this node?)", a.publicIP)
	case !subnet.SameBackend(l.Attrs.BackendType, a.backendType):
		have := strconv.Quote(l.Attrs.BackendType)
		if l.Attrs.BackendType == "" {
			have = "none (udp)"
		}
		return fmt.Sprintf("its backend type is %s, not %q", have, a.backendType)
	}
	return ""
}
