package probe

import (
	"bytes"
	"cmp"
	"net/netip"
	"slices"
)

// Subnets is a set of subnets as plain bytes: 8 bytes an IPv4 subnet, 17
// an IPv6 one, where a []netip.Prefix takes 32 (and pointers the garbage
// collector scans). Add them; Sort once after the last, so that each Has
// is a binary search (a set that is not sorted is searched in a sorted
// copy).
type Subnets struct {
	v4 []uint64 // address << 8 | bits
	v6 []subnet6
}

type subnet6 struct {
	addr [16]byte
	bits uint8
}

func cmp6(a, b subnet6) int {
	if c := bytes.Compare(a.addr[:], b.addr[:]); c != 0 {
		return c
	}
	return cmp.Compare(a.bits, b.bits)
}

func v4Of(p netip.Prefix) uint64 {
	a := p.Addr().As4()
	return uint64(a[0])<<32 | uint64(a[1])<<24 | uint64(a[2])<<16 | uint64(a[3])<<8 | uint64(p.Bits())
}

// Grow makes room for n more IPv4 subnets.
func (s *Subnets) Grow(n int) { s.v4 = slices.Grow(s.v4, n) }

// Add adds p (nothing if p is invalid).
func (s *Subnets) Add(p netip.Prefix) {
	switch {
	case !p.IsValid():
	case p.Addr().Is4():
		s.v4 = append(s.v4, v4Of(p))
	default:
		s.v6 = append(s.v6, subnet6{addr: p.Addr().As16(), bits: uint8(p.Bits())})
	}
}

// Sort sorts the set for Has.
func (s *Subnets) Sort() {
	slices.Sort(s.v4)
	slices.SortFunc(s.v6, cmp6)
}

// sorted is s, or a sorted copy of it.
func (s *Subnets) sorted() *Subnets {
	if slices.IsSorted(s.v4) && slices.IsSortedFunc(s.v6, cmp6) {
		return s
	}
	c := &Subnets{v4: slices.Clone(s.v4), v6: slices.Clone(s.v6)}
	c.Sort()
	return c
}

// Has reports whether p was added; s must be sorted.
func (s *Subnets) Has(p netip.Prefix) bool {
	switch {
	case !p.IsValid():
		return false
	case p.Addr().Is4():
		_, ok := slices.BinarySearch(s.v4, v4Of(p))
		return ok
	}
	_, ok := slices.BinarySearchFunc(s.v6, subnet6{addr: p.Addr().As16(), bits: uint8(p.Bits())}, cmp6)
	return ok
}
