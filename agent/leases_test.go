package agent

import (
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"k8s.io/klog/v2/ktesting"

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
		if s.len() != len(want) || s.at.Len() != len(want) {
			t.Fatalf("step %d: %d leases (%d indexed), want %d", step, s.len(), s.at.Len(), len(want))
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

// TestUpdateReservesOnlyNewLeases: a batch that changes every known lease
// leaves the lease set's slice as it was; a first batch of new leases makes
// room for about those.
func TestUpdateReservesOnlyNewLeases(t *testing.T) {
	cfg, err := subnet.ParseConfig([]byte(`{"Network":"10.0.0.0/8","Backend":{"Type":"host-gw"}}`))
	if err != nil {
		t.Fatal(err)
	}
	n := &node{leases: newLeaseSet(), log: ktesting.NewLogger(t, ktesting.NewConfig())}
	n.adm = newAdmission(cfg, netip.MustParseAddr("192.168.8.1"), netip.Addr{}, n.log)
	batch := func(from, count int, pub byte) []subnet.Event {
		evs := make([]subnet.Event, count)
		for i := range evs {
			j := from + i
			evs[i].Lease = subnet.Lease{Subnet: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(j >> 8), byte(j), 0}), 24),
				Attrs: subnet.LeaseAttrs{PublicIP: netip.AddrFrom4([4]byte{172, 16, pub, byte(j)}), BackendType: "host-gw"}}
		}
		return evs
	}
	n.update(batch(1, 3000, 1))
	if n.leases.len() != 3000 || cap(n.leases.list) > 3100 {
		t.Fatalf("after 3,000 new leases: %d leases, capacity %d; want 3,000 and room for about that", n.leases.len(), cap(n.leases.list))
	}
	c := cap(n.leases.list)
	n.update(batch(1, 3000, 2)) // every lease changes its PublicIP
	if l, _ := n.leases.get(netip.MustParsePrefix("10.0.1.0/24")); n.leases.len() != 3000 || l.Attrs.PublicIP != netip.MustParseAddr("172.16.2.1") {
		t.Fatalf("after the changes: %d leases, 10.0.1.0/24 at %v; want 3,000 and the new PublicIP", n.leases.len(), l.Attrs.PublicIP)
	}
	if cap(n.leases.list) != c {
		t.Errorf("3,000 changed leases grew the slice's capacity from %d to %d", c, cap(n.leases.list))
	}
	n.update(batch(3001, 500, 1))
	if n.leases.len() != 3500 {
		t.Errorf("after 500 more: %d leases, want 3,500", n.leases.len())
	}
}
