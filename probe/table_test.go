package probe

import (
	"math/rand/v2"
	"net/netip"
	"testing"

	"github.com/flanneld-go/flanneld/subnet"
)

// TestTable adds and removes peers at random (IPv4 and IPv6) and checks
// the table against a map after each step: every peer found at its slot
// with its addresses (the target along either path), removed ones not
// found, slots reused, and the memory of a table that shrank given back.
func TestTable(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	tb := newTable()
	want := map[netip.Prefix]Peer{}
	slots := map[netip.Prefix]int32{}
	prefix := func(n int) netip.Prefix {
		if n%2 == 0 {
			return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(n >> 8), byte(n), 0}), 24)
		}
		return netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfc, 0, byte(n >> 8), byte(n)}), 64)
	}
	check := func(step int) {
		t.Helper()
		if tb.live != len(want) {
			t.Fatalf("step %d: %d live, want %d", step, tb.live, len(want))
		}
		for sn, p := range want {
			i := tb.lookup(subnet.KeyOf(sn))
			if i < 0 || i != slots[sn] || tb.subnet(i) != sn || tb.public(i) != p.PublicIP || tb.targetAlong(i, true) != sn.Addr() || tb.targetAlong(i, false) != p.PublicIP {
				t.Fatalf("step %d: %v at slot %d (want %d): %v %v", step, sn, i, slots[sn], tb.subnet(max(i, 0)), tb.public(max(i, 0)))
			}
		}
	}
	for step := range 20000 {
		sn := prefix(rng.IntN(3000))
		if _, ok := want[sn]; ok && rng.IntN(2) == 0 {
			tb.remove(slots[sn])
			delete(want, sn)
			delete(slots, sn)
		} else if !ok {
			p := Peer{Subnet: sn, PublicIP: netip.AddrFrom4([4]byte{172, 16, byte(step >> 8), byte(step)})}
			if rng.IntN(3) == 0 {
				p.PublicIP = netip.AddrFrom16([16]byte{0xfd, 0, 15: byte(step)})
			}
			i := tb.add(peer{key: subnet.KeyOf(sn)})
			tb.setPublic(i, p.PublicIP)
			want[sn], slots[sn] = p, i
		}
		if step%500 == 0 {
			check(step)
		}
	}
	check(-1)
	if len(tb.peers) > 3000 {
		t.Errorf("%d slots for at most 3,000 peers: removed slots not reused", len(tb.peers))
	}
	for sn := range want {
		tb.remove(slots[sn])
	}
	tb.shrink()
	if tb.live != 0 || len(tb.peers) != 0 || tb.index.Len() != 0 || len(tb.free) != 0 {
		t.Errorf("emptied: %d live, %d slots, index of %d, %d free", tb.live, len(tb.peers), tb.index.Len(), len(tb.free))
	}
}
