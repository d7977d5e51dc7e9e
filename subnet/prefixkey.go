package subnet

import "net/netip"

// PrefixKey is a subnet as plain bytes, for the indexes of leases and
// peers by subnet: 18 bytes without a pointer, where a netip.Prefix takes
// 32 and holds one (so the garbage collector need not scan a record that
// holds it).
type PrefixKey struct {
	addr [16]byte
	bits uint8
	is4  bool // addr holds an IPv4 address (never equal to an IPv4-mapped one)
}

// KeyOf returns the key of p.
func KeyOf(p netip.Prefix) PrefixKey {
	return PrefixKey{addr: p.Addr().As16(), bits: uint8(p.Bits()), is4: p.Addr().Is4()}
}

// Prefix returns the subnet k is the key of.
func (k PrefixKey) Prefix() netip.Prefix {
	a := netip.AddrFrom16(k.addr)
	if k.is4 {
		a = a.Unmap()
	}
	return netip.PrefixFrom(a, int(k.bits))
}
