package agent

import (
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"github.com/flanneld-go/flanneld/subnet"
)

// TestLeaseSet applies random puts and removes to a leaseSet and to a map:
// they always hold the same leases, and except leaves out exactly one. The
// keys are IPv4 subnets, IPv6 ones, and the IPv4-mapped IPv6 forms of the
// IPv4 ones (distinct keys with the same 16 bytes).
func TestLeaseSet(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	s := newLeaseSet()
	want := map[netip.Prefix]subnet.Lease{}
	pfx := func(i int) netip.Prefix {
		v4 := netip.AddrFrom4([4]byte{10, 5, byte(i % 32), 0})
		switch i / 32 {
		case 0:
			return netip.PrefixFrom(v4, 24)
		case 1:
			return netip.PrefixFrom(netip.AddrFrom16(v4.As16()), 24) // same bytes and length as case 0
		default:
			return netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfc, 0, 0, 0, 0, 0, 0, byte(i)}), 64)
		}
	}
	for step := range 5000 {
		p := pfx(r.IntN(96))
		switch r.IntN(3) {
		case 0, 1:
			l := subnet.Lease{Subnet: p, Attrs: subnet.LeaseAttrs{BackendType: string(rune('a' + step%26))}}
			if !p.Addr().Is4() {
				l = subnet.Lease{IPv6Subnet: p, Attrs: l.Attrs} // an IPv6-only lease, keyed by it
			}
			s.put(l)
			want[p] = l
		case 2:
			s.remove(p)
			delete(want, p)
		}
		if s.len() != len(want) || len(s.at) != len(want) {
			t.Fatalf("step %d: %d leases (%d indexed), want %d", step, s.len(), len(s.at), len(want))
		}
		for q, l := range want {
			if got, ok := s.get(q); !ok || got.Key() != q || got.Attrs.BackendType != l.Attrs.BackendType {
				t.Fatalf("step %d: lease %s is %+v, %v; want %+v", step, q, got, ok, l)
			}
		}
		if step%10 == 0 {
			own := pfx(r.IntN(96))
			rest := s.except(own)
			_, has := want[own]
			if n := len(want) - btoi(has); len(rest) != n {
				t.Fatalf("step %d: except(%s) has %d leases, want %d", step, own, len(rest), n)
			}
			if slices.ContainsFunc(rest, func(l subnet.Lease) bool { return l.Key() == own }) {
				t.Fatalf("step %d: except(%s) includes it", step, own)
			}
		}
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}
