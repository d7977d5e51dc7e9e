// Package ip holds the IPv4 address and prefix helpers the daemon needs, built
// on net/netip: parsing that rejects IPv6, the etcd lease key codec
// ("10.5.34.0-24"), stepping to the next subnet, and the conversions that the
// netlink boundary needs.
package ip

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
)

// ErrNotIPv4 is returned when an address or prefix is valid but not IPv4.
var ErrNotIPv4 = errors.New("ip: not an IPv4 address")

// ParseAddr parses a dotted-quad IPv4 address. IPv6 and IPv4-mapped IPv6
// forms are rejected.
func ParseAddr(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("parsing address %q: %w", s, err)
	}
	if !a.Is4() {
		return netip.Addr{}, fmt.Errorf("parsing address %q: %w", s, ErrNotIPv4)
	}
	return a, nil
}

// ParsePrefix parses an IPv4 CIDR such as "10.5.0.0/16". Host bits are
// cleared, as flannel does ("10.5.1.0/16" means 10.5.0.0/16).
func ParsePrefix(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("parsing prefix %q: %w", s, err)
	}
	if !p.Addr().Is4() {
		return netip.Prefix{}, fmt.Errorf("parsing prefix %q: %w", s, ErrNotIPv4)
	}
	return p.Masked(), nil
}

// Key returns the etcd lease key name of an IPv4 subnet: "10.5.34.0-24".
func Key(p netip.Prefix) string {
	return p.Addr().String() + "-" + strconv.Itoa(p.Bits())
}

// ParseKey is the inverse of Key. The address must be the first address of
// the subnet.
func ParseKey(s string) (netip.Prefix, error) {
	addr, bits, ok := strings.Cut(s, "-")
	if !ok {
		return netip.Prefix{}, fmt.Errorf("parsing lease key %q: want <A.B.C.D>-<len>", s)
	}
	a, err := ParseAddr(addr)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("parsing lease key %q: %w", s, err)
	}
	n, err := strconv.Atoi(bits)
	if err != nil || n < 0 || n > 32 || bits != strconv.Itoa(n) {
		return netip.Prefix{}, fmt.Errorf("parsing lease key %q: prefix length %q is not 0..32", s, bits)
	}
	p := netip.PrefixFrom(a, n)
	if p.Masked() != p {
		return netip.Prefix{}, fmt.Errorf("parsing lease key %q: %s is not the first address of a /%d", s, a, n)
	}
	return p, nil
}

// Uint32 returns the IPv4 address as a big-endian integer.
func Uint32(a netip.Addr) uint32 {
	b := a.As4()
	return binary.BigEndian.Uint32(b[:])
}

// FromUint32 is the inverse of Uint32.
func FromUint32(v uint32) netip.Addr {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

// Contains reports whether inner lies entirely inside outer.
func Contains(outer, inner netip.Prefix) bool {
	return outer.Bits() <= inner.Bits() && outer.Contains(inner.Addr())
}

// IPNet converts a prefix to the *net.IPNet netlink wants, with a 4-byte IP
// and mask for IPv4 (16-byte for IPv6).
func IPNet(p netip.Prefix) *net.IPNet {
	return HostNet(p.Addr(), p.Bits())
}

// HostNet converts an address with a prefix length (for example an interface
// address 10.5.34.0/16) to *net.IPNet without clearing host bits.
func HostNet(a netip.Addr, bits int) *net.IPNet {
	nip := IP(a)
	return &net.IPNet{IP: nip, Mask: net.CIDRMask(bits, 8*len(nip))}
}

// IP converts an address to a net.IP: 4 bytes for IPv4 (and IPv4-mapped),
// 16 for IPv6.
func IP(a netip.Addr) net.IP {
	if a.Is4() || a.Is4In6() {
		b := a.As4()
		return net.IP(b[:])
	}
	b := a.As16()
	return net.IP(b[:])
}

// AddrFromIP converts a net.IP of either family to a netip.Addr (an IPv4
// one in its 4-byte form).
func AddrFromIP(nip net.IP) (netip.Addr, bool) {
	a, ok := netip.AddrFromSlice(nip)
	return a.Unmap(), ok
}

// PrefixFromIPNet converts a *net.IPNet of either family to a masked prefix.
func PrefixFromIPNet(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := AddrFromIP(n.IP)
	ones, bits := n.Mask.Size()
	if !ok || bits != a.BitLen() {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(a, ones).Masked(), true
}

// FromIP converts a net.IP (4- or 16-byte form) to an IPv4 netip.Addr.
func FromIP(nip net.IP) (netip.Addr, bool) {
	v4 := nip.To4()
	if v4 == nil {
		return netip.Addr{}, false
	}
	return netip.AddrFrom4([4]byte(v4)), true
}

// FromIPNet converts a *net.IPNet with an IPv4 address to a masked prefix.
func FromIPNet(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := FromIP(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, bits := n.Mask.Size()
	if bits != 32 && !(bits == 128 && ones >= 96) {
		return netip.Prefix{}, false
	}
	if bits == 128 {
		ones -= 96
	}
	return netip.PrefixFrom(a, ones).Masked(), true
}

// LeaseKey returns the etcd lease key name of a lease: "10.5.34.0-24", or
// with an IPv6 subnet "10.5.34.0-24&fc00:0:0:22::-64" (flannel's dual-stack
// form; an IPv6-only lease has "0.0.0.0-0" as its IPv4 part).
func LeaseKey(v4, v6 netip.Prefix) string {
	if !v4.IsValid() {
		v4 = netip.PrefixFrom(netip.IPv4Unspecified(), 0)
	}
	if !v6.IsValid() {
		return Key(v4)
	}
	return Key(v4) + "&" + v6.Addr().String() + "-" + strconv.Itoa(v6.Bits())
}

// ParseLeaseKey is the inverse of LeaseKey. v6 is invalid for a key without
// an IPv6 part; v4 is invalid for "0.0.0.0-0" (an IPv6-only lease).
func ParseLeaseKey(s string) (v4, v6 netip.Prefix, err error) {
	s4, s6, dual := strings.Cut(s, "&")
	if v4, err = ParseKey(s4); err != nil {
		return netip.Prefix{}, netip.Prefix{}, err
	}
	if v4.Bits() == 0 {
		if !v4.Addr().IsUnspecified() || !dual {
			return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("parsing lease key %q: a /0 is no lease", s)
		}
		v4 = netip.Prefix{}
	}
	if !dual {
		return v4, netip.Prefix{}, nil
	}
	addr, bits, ok := strings.Cut(s6, "-")
	if !ok {
		return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("parsing lease key %q: want <A.B.C.D>-<len>&<IPv6>-<len>", s)
	}
	a, err := ParseAddr6(addr)
	if err != nil {
		return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("parsing lease key %q: %w", s, err)
	}
	if a.String() != addr {
		return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("parsing lease key %q: write the IPv6 address as %s", s, a)
	}
	n, err := strconv.Atoi(bits)
	if err != nil || n < 1 || n > 128 || bits != strconv.Itoa(n) {
		return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("parsing lease key %q: IPv6 prefix length %q is not 1..128", s, bits)
	}
	v6 = netip.PrefixFrom(a, n)
	if v6.Masked() != v6 {
		return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("parsing lease key %q: %s is not the first address of a /%d", s, a, n)
	}
	return v4, v6, nil
}
