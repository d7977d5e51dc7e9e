package ip

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"net/netip"
)

// ErrNotIPv6 is returned when an address or prefix is valid but not IPv6
// (an IPv4 or IPv4-mapped one).
var ErrNotIPv6 = errors.New("ip: not an IPv6 address")

// ParseAddr6 parses an IPv6 address; IPv4 and IPv4-mapped forms are
// rejected.
func ParseAddr6(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("parsing address %q: %w", s, err)
	}
	if !a.Is6() || a.Is4In6() || a.Zone() != "" {
		return netip.Addr{}, fmt.Errorf("parsing address %q: %w", s, ErrNotIPv6)
	}
	return a, nil
}

// ParsePrefix6 parses an IPv6 CIDR such as "fc00::/48", clearing host bits.
func ParsePrefix6(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("parsing prefix %q: %w", s, err)
	}
	if !p.Addr().Is6() || p.Addr().Is4In6() {
		return netip.Prefix{}, fmt.Errorf("parsing prefix %q: %w", s, ErrNotIPv6)
	}
	return p.Masked(), nil
}

// u128 is an IPv6 address as a number.
type u128 struct{ hi, lo uint64 }

func toU128(a netip.Addr) u128 {
	b := a.As16()
	return u128{binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:])}
}

func (v u128) addr() netip.Addr {
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], v.hi)
	binary.BigEndian.PutUint64(b[8:], v.lo)
	return netip.AddrFrom16(b)
}

// size6 is the number of addresses of a /bits IPv6 prefix (bits ≥ 1).
func size6(bits int) u128 {
	if bits <= 64 {
		return u128{hi: 1 << (64 - bits)}
	}
	return u128{lo: 1 << (128 - bits)}
}

func (v u128) add(w u128) (u128, bool) {
	lo, c := bits.Add64(v.lo, w.lo, 0)
	hi, c := bits.Add64(v.hi, w.hi, c)
	return u128{hi, lo}, c == 0
}

func (v u128) sub(w u128) (u128, bool) {
	lo, b := bits.Sub64(v.lo, w.lo, 0)
	hi, b := bits.Sub64(v.hi, w.hi, b)
	return u128{hi, lo}, b == 0
}

// Next6 returns the IPv6 subnet of the same length that follows p, and
// false when p is the last one of the address space.
func Next6(p netip.Prefix) (netip.Prefix, bool) {
	v, ok := toU128(p.Masked().Addr()).add(size6(p.Bits()))
	if !ok {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(v.addr(), p.Bits()), true
}

// FirstSubnet6 is the second /bits subnet of network (the first is skipped,
// as for IPv4), and LastSubnet6 the last one.
func FirstSubnet6(network netip.Prefix, bits int) netip.Addr {
	v, _ := toU128(network.Masked().Addr()).add(size6(bits))
	return v.addr()
}

// LastSubnet6 is the first address of the last /bits subnet of network.
func LastSubnet6(network netip.Prefix, bits int) netip.Addr {
	end, _ := toU128(network.Masked().Addr()).add(size6(network.Bits()))
	v, _ := end.sub(size6(bits))
	return v.addr()
}

// HostAddr6 is the first host address of an IPv6 subnet (subnet + 1).
func HostAddr6(p netip.Prefix) netip.Addr { return p.Masked().Addr().Next() }
