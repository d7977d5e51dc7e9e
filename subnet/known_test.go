package subnet

import (
	"net/netip"
	"testing"
)

func TestDiffLeases(t *testing.T) {
	l := func(p, pub, data string) Lease {
		return Lease{Subnet: mustPrefix(p), Attrs: LeaseAttrs{PublicIP: netip.MustParseAddr(pub), BackendType: "vxlan", BackendData: []byte(data)}}
	}
	before := map[netip.Prefix]LeaseSummary{}
	for _, x := range []Lease{l("10.5.1.0/24", "192.168.0.1", `{"VtepMAC":"a"}`), l("10.5.2.0/24", "192.168.0.2", ""), l("10.5.3.0/24", "192.168.0.3", "")} {
		before[x.Subnet] = Summarize(x.Attrs)
	}
	current := map[netip.Prefix]Lease{}
	for _, x := range []Lease{l("10.5.1.0/24", "192.168.0.1", `{"VtepMAC":"b"}`), l("10.5.3.0/24", "192.168.0.3", ""), l("10.5.4.0/24", "192.168.0.4", "")} {
		current[x.Subnet] = x
	}
	evs := DiffLeases(before, current)
	var got string
	for _, e := range evs {
		got += e.Type.String() + " " + e.Lease.Subnet.String() + "@" + e.Lease.Attrs.PublicIP.String() + "; "
	}
	want := "added 10.5.1.0/24@192.168.0.1; added 10.5.4.0/24@192.168.0.4; removed 10.5.2.0/24@192.168.0.2; "
	if got != want {
		t.Errorf("DiffLeases = %s\nwant          %s", got, want)
	}
	if len(DiffLeases(before, map[netip.Prefix]Lease{})) != 3 {
		t.Errorf("diff against an empty set must remove all three")
	}
}
