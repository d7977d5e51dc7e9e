package agent

import (
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"github.com/flanneld-go/flanneld/subnet"
)

// TestLeaseSet applies random puts and removes to a leaseSet and to a map:
// they always hold the same leases, and except leaves out exactly one.
func TestLeaseSet(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	s := newLeaseSet()
	want := map[netip.Prefix]subnet.Lease{}
	pfx := func(i int) netip.Prefix { return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 5, byte(i), 0}), 24) }
	for step := range 5000 {
		p := pfx(r.IntN(64))
		switch r.IntN(3) {
		case 0, 1:
			l := subnet.Lease{Subnet: p, Attrs: subnet.LeaseAttrs{BackendType: string(rune('a' + step%26))}}
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
			if i, ok := s.at[q]; !ok || s.list[i].Subnet != q || s.list[i].Attrs.BackendType != l.Attrs.BackendType {
				t.Fatalf("step %d: lease %s is %+v, want %+v", step, q, s.list[i], l)
			}
		}
		if step%10 == 0 {
			own := pfx(r.IntN(64))
			rest := s.except(own)
			_, has := want[own]
			if n := len(want) - btoi(has); len(rest) != n {
				t.Fatalf("step %d: except(%s) has %d leases, want %d", step, own, len(rest), n)
			}
			if slices.ContainsFunc(rest, func(l subnet.Lease) bool { return l.Subnet == own }) {
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
