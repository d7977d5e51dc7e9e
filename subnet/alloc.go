package subnet

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// FreeCandidates is how many free subnets, from SubnetMin up, a new lease is
// chosen among at random.
const FreeCandidates = 100

// Taken holds the subnets some lease key claims, valid or not; every store
// builds one from its listing and asks ChooseSubnet for a free subnet.
type Taken struct {
	bits  int
	exact map[netip.Prefix]bool
	// other holds claims of another length (stray or hand-written keys);
	// a candidate overlapping one of them is not free.
	other []netip.Prefix
}

// NewTaken returns an empty set for leases of bits (the config's SubnetLen).
func NewTaken(bits int) *Taken {
	return &Taken{bits: bits, exact: map[netip.Prefix]bool{}}
}

// Add records a claim on p.
func (t *Taken) Add(p netip.Prefix) {
	if p.Bits() == t.bits {
		t.exact[p] = true
		return
	}
	t.other = append(t.other, p)
}

// Free reports whether no claim overlaps p.
func (t *Taken) Free(p netip.Prefix) bool {
	if t.exact[p] {
		return false
	}
	for _, o := range t.other {
		if o.Overlaps(p) {
			return false
		}
	}
	return true
}

// ClaimedPrefix is the IPv4 subnet a lease key name claims, read leniently
// so that a malformed name such as "10.5.3.1-24" or "10.5.3.0-24x" still
// keeps 10.5.3.0/24 from being handed out, and a dual-stack name
// ("10.5.3.0-24&fc00::-64") claims its IPv4 part. ok is false when no
// subnet can be read from the name at all.
func ClaimedPrefix(name string) (netip.Prefix, bool) {
	a, b, found := strings.Cut(name, "-")
	if !found {
		return netip.Prefix{}, false
	}
	addr, err := netip.ParseAddr(a)
	if err != nil || !addr.Is4() {
		return netip.Prefix{}, false
	}
	// Leading digits only, as a flannel node's unanchored match reads it.
	digits := len(b) - len(strings.TrimLeft(b, "0123456789"))
	n, err := strconv.Atoi(b[:digits])
	if err != nil || n < 0 || n > 32 {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(addr, n).Masked(), true
}

// ClaimedPrefixes is ClaimedPrefix for both parts of a lease key name: the
// IPv4 subnet (invalid for an IPv6-only name, "0.0.0.0-0&…") and the IPv6
// subnet after '&' (invalid when absent or unreadable).
func ClaimedPrefixes(name string) (v4, v6 netip.Prefix) {
	s4, s6, dual := strings.Cut(name, "&")
	if p, ok := ClaimedPrefix(s4); ok && p.Bits() > 0 {
		v4 = p
	}
	if dual {
		a, b, _ := strings.Cut(s6, "-")
		digits := len(b) - len(strings.TrimLeft(b, "0123456789"))
		n, err := strconv.Atoi(b[:digits])
		if addr, aerr := netip.ParseAddr(a); aerr == nil && err == nil && addr.Is6() && !addr.Is4In6() && n > 0 && n <= 128 {
			v6 = netip.PrefixFrom(addr.WithZone(""), n).Masked()
		}
	}
	return v4, v6
}

// ChooseSubnet6 is ChooseSubnet for the IPv6 subnet of a lease.
func ChooseSubnet6(cfg *Config, taken *Taken, prev netip.Prefix, intn func(int) int) (netip.Prefix, bool) {
	return choose(prev, cfg.InRange6, cfg.Subnets6, taken, intn)
}

// ChooseSubnet returns prev when it fits cfg and taken does not claim it,
// else a subnet picked with intn among the first FreeCandidates free ones.
// ok is false when the range is full.
func ChooseSubnet(cfg *Config, taken *Taken, prev netip.Prefix, intn func(int) int) (netip.Prefix, bool) {
	return choose(prev, cfg.InRange, cfg.Subnets, taken, intn)
}

// choose is ChooseSubnet over the subnets each yields, in order.
func choose(prev netip.Prefix, inRange func(netip.Prefix) bool, each func(func(netip.Prefix) bool), taken *Taken, intn func(int) int) (netip.Prefix, bool) {
	if prev.IsValid() && inRange(prev) && taken.Free(prev) {
		return prev, true
	}
	cands := make([]netip.Prefix, 0, FreeCandidates)
	each(func(p netip.Prefix) bool {
		if taken.Free(p) {
			cands = append(cands, p)
		}
		return len(cands) < FreeCandidates
	})
	if len(cands) == 0 {
		return netip.Prefix{}, false
	}
	return cands[intn(len(cands))], true
}

// OwnLease reports whether l is the lease of the node whose value is attrs,
// fit to keep under cfg: the same PublicIP (PublicIPv6 when cfg is IPv6
// only), and a subnet in range for each family cfg enables.
func OwnLease(cfg *Config, attrs LeaseAttrs, l Lease) bool {
	if cfg.EnableIPv4 && (l.Attrs.PublicIP != attrs.PublicIP || !cfg.InRange(l.Subnet)) {
		return false
	}
	if !cfg.EnableIPv4 && (l.Attrs.PublicIPv6 != attrs.PublicIPv6 || l.Subnet.IsValid()) {
		return false
	}
	return !cfg.EnableIPv6 || cfg.InRange6(l.IPv6Subnet)
}

// CheckAttrs checks that attrs carry an address for each family cfg
// enables, before a store writes them.
func CheckAttrs(cfg *Config, attrs LeaseAttrs) error {
	if cfg.EnableIPv4 && !attrs.PublicIP.Is4() {
		return fmt.Errorf("public IP %v is not an IPv4 address", attrs.PublicIP)
	}
	if cfg.EnableIPv6 && !attrs.PublicIPv6.Is6() {
		return fmt.Errorf("public IPv6 %v is not an IPv6 address", attrs.PublicIPv6)
	}
	return nil
}

// ChooseLease picks the subnets of a new lease: ChooseSubnet for IPv4 and
// ChooseSubnet6 for IPv6, as cfg enables them (taken6 is the IPv6 claims).
func ChooseLease(cfg *Config, taken, taken6 *Taken, prev Lease, intn func(int) int) (Lease, bool) {
	var l Lease
	var ok bool
	if cfg.EnableIPv4 {
		if l.Subnet, ok = ChooseSubnet(cfg, taken, prev.Subnet, intn); !ok {
			return l, false
		}
	}
	if cfg.EnableIPv6 {
		if l.IPv6Subnet, ok = ChooseSubnet6(cfg, taken6, prev.IPv6Subnet, intn); !ok {
			return l, false
		}
	}
	return l, true
}

// ClaimsOf reports whether the lease key name claims a subnet of l (its
// IPv4 or its IPv6 one): two keys created at once, differing only in one
// part, can claim one subnet; the older keeps it.
func ClaimsOf(name string, l Lease) bool {
	v4, v6 := ClaimedPrefixes(name)
	return (v4.IsValid() && l.Subnet.IsValid() && v4.Overlaps(l.Subnet)) || (v6.IsValid() && l.IPv6Subnet.IsValid() && v6.Overlaps(l.IPv6Subnet))
}
