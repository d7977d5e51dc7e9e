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
			before := map[PrefixKey]LeaseSummary{}
			for _, l := range tc.known {
				before[KeyOf(l.Subnet)] = Summarize(l.Attrs)
			}
			evs, after := DiffLeases(before, tc.current)
			if got := evString(evs); got != tc.want {
				t.Errorf("diff = %q\nwant   %q", got, tc.want)
			}
			if len(after) != len(tc.current) {
				t.Errorf("after has %d summaries, want %d", len(after), len(tc.current))
			}
			for _, l := range tc.current {
				if after[KeyOf(l.Subnet)] != SummarizeLease(l) {
					t.Errorf("after[%s] is not the summary of %v", l.Subnet, l)
				}
			}
		})
	}
}
