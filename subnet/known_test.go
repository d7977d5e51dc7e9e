package subnet

import (
	"net/netip"
	"testing"
	"time"
)

func TestDiffLeases(t *testing.T) {
	lease := func(s, publicIP, data string) Lease {
		l := Lease{Subnet: mustPrefix(s), Attrs: LeaseAttrs{PublicIP: netip.MustParseAddr(publicIP), BackendType: "vxlan"}}
		if data != "" {
			l.Attrs.BackendData = []byte(data)
		}
		return l
	}
	leaseMap := func(ls ...Lease) []Lease { return ls }
	a := lease("10.5.1.0/24", "192.168.0.1", "")
	b := lease("10.5.2.0/24", "192.168.0.2", `{"VtepMAC":"aa"}`)
	b2 := lease("10.5.2.0/24", "192.168.0.2", `{"VtepMAC":"bb"}`)
	c := lease("10.5.3.0/24", "192.168.0.3", "")
	cRenewed := c
	cRenewed.Expiration = time.Unix(1e9, 0)
	aUDP := a
	aUDP.Attrs.BackendType = "udp"
	for _, tc := range []struct {
		name           string
		known, current []Lease
		want           string
	}{
		{"both empty", leaseMap(), leaseMap(), ""},
		{"initial", leaseMap(), leaseMap(c, a, b), `+10.5.1.0/24@192.168.0.1 +10.5.2.0/24@192.168.0.2{"VtepMAC":"aa"} +10.5.3.0/24@192.168.0.3`},
		{"all gone", leaseMap(a, b), leaseMap(), "-10.5.1.0/24@192.168.0.1 -10.5.2.0/24@192.168.0.2"},
		{"changed value is added", leaseMap(a, b), leaseMap(a, b2), `+10.5.2.0/24@192.168.0.2{"VtepMAC":"bb"}`},
		{"renewal is no event", leaseMap(a, c), leaseMap(a, cRenewed), ""},
		{"changed type is added", leaseMap(a, c), leaseMap(aUDP, c), "+10.5.1.0/24@192.168.0.1"},
		{"mixed, adds first", leaseMap(a, b), leaseMap(b2, c), `+10.5.2.0/24@192.168.0.2{"VtepMAC":"bb"} +10.5.3.0/24@192.168.0.3 -10.5.1.0/24@192.168.0.1`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := NewSummaries(0)
			for _, l := range tc.known {
				before.Set(KeyOf(l.Subnet), Summarize(l.Attrs))
			}
			evs, after := DiffLeases(before, tc.current)
			if got := evString(evs); got != tc.want {
				t.Errorf("diff = %q\nwant   %q", got, tc.want)
			}
			if after.Len() != len(tc.current) {
				t.Errorf("after has %d summaries, want %d", after.Len(), len(tc.current))
			}
			for _, l := range tc.current {
				if sum, _ := after.Get(KeyOf(l.Subnet)); sum != SummarizeLease(l) {
					t.Errorf("after[%s] is not the summary of %v", l.Subnet, l)
				}
			}
		})
	}
}

func TestSummaries(t *testing.T) {
	s := NewSummaries(0)
	want := map[PrefixKey]LeaseSummary{}
	for i := range 3000 {
		k := KeyOf(netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i % 700 >> 8), byte(i % 700), 0}), 24))
		sum := LeaseSummary{sum: uint64(i)}
		if i%3 == 2 {
			s.Delete(k)
			delete(want, k)
		} else {
			s.Set(k, sum)
			want[k] = sum
		}
	}
	if s.Len() != len(want) {
		t.Fatalf("Len %d, want %d", s.Len(), len(want))
	}
	for k, sum := range want {
		if got, ok := s.Get(k); !ok || got != sum {
			t.Errorf("Get(%v) = %v, %v; want %v", k.Prefix(), got, ok, sum)
		}
	}
	n := 0
	for k, sum := range s.All() {
		if want[k] != sum {
			t.Errorf("All yields %v %v, want %v", k.Prefix(), sum, want[k])
		}
		n++
	}
	if n != len(want) {
		t.Errorf("All yields %d, want %d", n, len(want))
	}
	if _, ok := s.Get(KeyOf(netip.MustParsePrefix("10.9.9.0/24"))); ok {
		t.Error("Get of a key never set found one")
	}
}
