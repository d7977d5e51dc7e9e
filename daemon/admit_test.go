package daemon

import (
	"net/netip"
	"strings"
	"testing"

	"k8s.io/klog/v2/ktesting"

	"github.com/flanneld-go/flanneld/subnet"
)

// TestAdmission: which leases reach the backend, with lease values in the
// forms flannel's nodes write them, and each skip logged once per reason.
func TestAdmission(t *testing.T) {
	parse := func(v string) subnet.LeaseAttrs {
		t.Helper()
		a, err := subnet.ParseLeaseAttrs([]byte(v))
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	tests := []struct {
		backend, subnet, value string
		want                   string // "" admitted, else part of the reason
	}{
		// flannel's udp backend (v0.10 to v0.28) writes no BackendType.
		{"udp", "10.5.3.0/24", `{"PublicIP":"172.30.0.4"}`, ""},
		{"udp", "10.5.3.0/24", `{"PublicIP":"172.30.0.4","BackendType":"udp"}`, ""},
		{"udp", "10.5.3.0/24", `{"PublicIP":"172.30.0.4","BackendType":"vxlan","BackendData":{"VtepMAC":"82:4b:b6:2f:54:4e"}}`, `backend type is "vxlan", not "udp"`},
		{"vxlan", "10.5.3.0/24", `{"PublicIP":"172.30.0.4","BackendType":"vxlan","BackendData":{"VtepMAC":"82:4b:b6:2f:54:4e"}}`, ""},
		{"vxlan", "10.5.3.0/24", `{"PublicIP":"172.30.0.4","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"82:4b:b6:2f:54:4e"}}`, ""},
		{"vxlan", "10.5.3.0/24", `{"PublicIP":"172.30.0.4"}`, `backend type is none (udp), not "vxlan"`},
		{"host-gw", "10.5.3.0/24", `{"PublicIP":"172.30.0.4","BackendType":"host-gw"}`, ""},
		{"host-gw", "10.6.3.0/24", `{"PublicIP":"172.30.0.4","BackendType":"host-gw"}`, "does not fit the network config"},
		{"host-gw", "10.5.3.0/25", `{"PublicIP":"172.30.0.4","BackendType":"host-gw"}`, "does not fit the network config"},
		{"host-gw", "10.5.3.0/24", `{"PublicIP":"192.168.8.1","BackendType":"host-gw"}`, "this node's own"},
	}
	for _, tt := range tests {
		cfg := &subnet.Config{Network: netip.MustParsePrefix("10.5.0.0/16"), SubnetLen: 24, BackendType: tt.backend}
		log := ktesting.NewLogger(t, ktesting.NewConfig(ktesting.BufferLogs(true)))
		a := newAdmission(cfg, netip.MustParseAddr("192.168.8.1"), log)
		l := subnet.Lease{Subnet: netip.MustParsePrefix(tt.subnet), Attrs: parse(tt.value)}
		got := a.admit(l)
		if got != (tt.want == "") {
			t.Errorf("%s node, lease %s %s: admitted %v, want %v", tt.backend, tt.subnet, tt.value, got, tt.want == "")
			continue
		}
		a.admit(l) // the same lease again: no second line
		buf := log.GetSink().(ktesting.Underlier).GetBuffer()
		if n := countLog(buf, "Skipping a lease", "", ""); n != min(1, len(tt.want)) || !strings.Contains(buf.String(), strings.ReplaceAll(tt.want, `"`, `\"`)) {
			t.Errorf("%s node, lease %s %s: %d skip lines, want one naming %q:\n%s", tt.backend, tt.subnet, tt.value, n, tt.want, buf.String())
		}
		if tt.want != "" {
			// Removed, then back: logged again; fixed: the record goes.
			a.forget(l.Subnet)
			a.admit(l)
			if n := countLog(buf, "Skipping a lease", "", ""); n != 2 {
				t.Errorf("after a removal the skip was logged %d times in all, want 2", n)
			}
			l.Attrs, l.Subnet = parse(`{"PublicIP":"172.30.0.9","BackendType":"`+subnet.WireBackendType(tt.backend)+`"}`), netip.MustParsePrefix("10.5.9.0/24")
			a.skipped[l.Subnet] = "old"
			if !a.admit(l) || len(a.skipped) != 1 {
				t.Errorf("a good lease was not admitted or left its record: %v", a.skipped)
			}
		}
	}
}

func TestWireBackendType(t *testing.T) {
	for typ, want := range map[string]string{"udp": "", "vxlan": "vxlan", "host-gw": "host-gw"} {
		if got := subnet.WireBackendType(typ); got != want {
			t.Errorf("WireBackendType(%q) = %q, want %q", typ, got, want)
		}
	}
}
