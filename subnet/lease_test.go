package subnet

import (
	"errors"
	"net/netip"
	"testing"
)

func TestLeaseAttrsWireFormat(t *testing.T) {
	a := LeaseAttrs{PublicIP: netip.MustParseAddr("192.168.8.101"), BackendType: "vxlan",
		BackendData: []byte(`{"VtepMAC":"82:4b:b6:2f:54:4e"}`)}
	b, err := a.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	want := `{"PublicIP":"192.168.8.101","BackendType":"vxlan","BackendData":{"VtepMAC":"82:4b:b6:2f:54:4e"}}`
	if string(b) != want {
		t.Errorf("Marshal = %s\nwant      %s", b, want)
	}
	b, _ = LeaseAttrs{PublicIP: netip.MustParseAddr("10.0.0.1")}.Marshal()
	if string(b) != `{"PublicIP":"10.0.0.1"}` {
		t.Errorf("empty backend fields not omitted: %s", b)
	}
	back, err := ParseLeaseAttrs([]byte(want))
	if err != nil || back.PublicIP != a.PublicIP || back.BackendType != "vxlan" || string(back.BackendData) != string(a.BackendData) {
		t.Errorf("round trip = %+v, %v", back, err)
	}
}

func TestParseLeaseAttrs(t *testing.T) {
	good := []string{
		`{"PublicIP":"10.0.0.1"}`,
		`{"publicip":"10.0.0.1","backendtype":"udp"}`,
		`{"PublicIP":"10.0.0.1","BackendType":"host-gw","BackendData":null}`,
		`{"PublicIP":"10.0.0.1","Extra":[1,2]}`,
	}
	for _, s := range good {
		a, err := ParseLeaseAttrs([]byte(s))
		if err != nil || a.PublicIP.String() != "10.0.0.1" || a.BackendData != nil {
			t.Errorf("ParseLeaseAttrs(%s) = %+v, %v", s, a, err)
		}
	}
	bad := []string{``, `garbage`, `{}`, `{"PublicIP":""}`, `{"PublicIP":"fd00::1"}`, `{"PublicIP":"::ffff:10.0.0.1"}`,
		`{"PublicIP":5}`, `{"PublicIP":"10.0.0.1","BackendType":7}`, `[]`, `null`}
	for _, s := range bad {
		if a, err := ParseLeaseAttrs([]byte(s)); !errors.Is(err, ErrBadLease) {
			t.Errorf("ParseLeaseAttrs(%s) = %+v, %v; want ErrBadLease", s, a, err)
		}
	}
}

// BenchmarkParseLeaseAttrs parses a vxlan lease value as flannel writes it:
// the fast path ParseLeaseAttrs takes, against encoding/json.
func BenchmarkParseLeaseAttrs(b *testing.B) {
	v := []byte(`{"PublicIP":"192.168.8.101","BackendType":"vxlan","BackendData":{"VtepMAC":"82:4b:b6:2f:54:4e"}}`)
	for _, bc := range []struct {
		name  string
		parse func([]byte) (LeaseAttrs, error)
	}{{"ParseLeaseAttrs", ParseLeaseAttrs}, {"encoding-json", parseLeaseAttrsJSON}} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := bc.parse(v); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestLeaseAttrsDualStack: the value shapes flannel v0.28 writes (with and
// without IPv6) parse, and ours round-trip, leaving PublicIPv6 out when
// there is none (flannel v0.10 reads it as before).
func TestLeaseAttrsDualStack(t *testing.T) {
	a, err := ParseLeaseAttrs([]byte(`{"PublicIP":"10.5.0.4","PublicIPv6":"fc00::4","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"82:4b:b6:2f:54:4e"},"BackendV6Data":{"VNI":1,"VtepMAC":"82:4b:b6:2f:54:4f"}}`))
	if err != nil || a.PublicIPv6.String() != "fc00::4" || string(a.BackendV6Data) != `{"VNI":1,"VtepMAC":"82:4b:b6:2f:54:4f"}` {
		t.Fatalf("dual-stack value: %+v, %v", a, err)
	}
	out, err := a.Marshal()
	if err != nil || string(out) != `{"PublicIP":"10.5.0.4","PublicIPv6":"fc00::4","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"82:4b:b6:2f:54:4e"},"BackendV6Data":{"VNI":1,"VtepMAC":"82:4b:b6:2f:54:4f"}}` {
		t.Errorf("Marshal = %s, %v", out, err)
	}
	a, err = ParseLeaseAttrs([]byte(`{"PublicIP":"10.5.0.4","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"82:4b:b6:2f:54:4e"}}`))
	if err != nil || a.PublicIPv6.IsValid() {
		t.Fatalf("v0.28 value without IPv6: %+v, %v", a, err)
	}
	if out, _ := a.Marshal(); string(out) != `{"PublicIP":"10.5.0.4","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"82:4b:b6:2f:54:4e"}}` {
		t.Errorf("Marshal without IPv6 = %s", out)
	}
	if _, err := ParseLeaseAttrs([]byte(`{"PublicIP":"10.5.0.4","PublicIPv6":"10.0.0.1"}`)); !errors.Is(err, ErrBadLease) {
		t.Errorf("an IPv4 PublicIPv6 was accepted: %v", err)
	}
}

// TestParseLeaseAttrsSharesBackendType: in a lease value of the canonical
// form a known BackendType costs no allocation of its own, and the name
// parsed is the one written, known or not.
func TestParseLeaseAttrsSharesBackendType(t *testing.T) {
	for _, typ := range []string{"vxlan", "host-gw", "udp", "wireguard", "extension", "alloc", "ipip", "ipsec", "gce", "vxlan2"} {
		v := []byte(`{"PublicIP":"172.30.0.4","BackendType":"` + typ + `"}`)
		a, err := ParseLeaseAttrs(v)
		if err != nil || a.BackendType != typ {
			t.Errorf("ParseLeaseAttrs(%s) = %+v, %v; want BackendType %q", v, a, err, typ)
		}
	}
	known, other := []byte(`{"PublicIP":"172.30.0.4","BackendType":"host-gw"}`), []byte(`{"PublicIP":"172.30.0.4","BackendType":"host-gx"}`)
	nKnown := testing.AllocsPerRun(100, func() { ParseLeaseAttrs(known) })
	nOther := testing.AllocsPerRun(100, func() { ParseLeaseAttrs(other) })
	if nKnown != nOther-1 {
		t.Errorf("parsing a host-gw lease value allocates %v times, another name %v; want one fewer", nKnown, nOther)
	}
}
