package agent

import (
	"net/netip"

	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/subnet"
)

// Admitted is the part of leases a node with cfg and these public addresses
// would hand its backend (the one admission rule; skips are not logged),
// for flanneld --check, which takes no lease and runs no owner loop.
func Admitted(cfg *subnet.Config, publicIP, publicIPv6 netip.Addr, leases []subnet.Lease) []subnet.Lease {
	a := newAdmission(cfg, publicIP, publicIPv6, klog.Background().V(10))
	var out []subnet.Lease
	for _, l := range leases {
		if a.admit(l) {
			out = append(out, l)
		}
	}
	return out
}
