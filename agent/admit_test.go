package agent

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
		// A PublicIP that no node can have: every node would route the
		// subnet to itself, to a group or nowhere.
		{"host-gw", "10.5.3.0/24", `{"PublicIP":"127.0.0.1","BackendType":"host-gw"}`, "PublicIP 127.0.0.1 is not a usable unicast address (loopback)"},
		{"vxlan", "10.5.3.0/24", `{"PublicIP":"127.8.9.10","BackendType":"vxlan","BackendData":{"VtepMAC":"82:4b:b6:2f:54:4e"}}`, "(loopback)"},
		{"vxlan", "10.5.3.0/24", `{"PublicIP":"224.0.0.1","BackendType":"vxlan","BackendData":{"VtepMAC":"82:4b:b6:2f:54:4e"}}`, "PublicIP 224.0.0.1 is not a usable unicast address (multicast)"},
		{"udp", "10.5.3.0/24", `{"PublicIP":"239.1.2.3"}`, "(multicast)"},
		{"udp", "10.5.3.0/24", `{"PublicIP":"0.0.0.0"}`, "PublicIP 0.0.0.0 is not a usable unicast address (unspecified)"},
		{"host-gw", "10.5.3.0/24", `{"PublicIP":"255.255.255.255","BackendType":"host-gw"}`, "(broadcast)"},
		{"host-gw", "10.5.3.0/24", `{"PublicIP":"169.254.3.4","BackendType":"host-gw"}`, "PublicIP 169.254.3.4 is not a usable unicast address (link-local)"},
		// Usable: private, public, a subnet's broadcast or network address
		// (a /31 or /32 host address may end in 255 or 0).
		{"host-gw", "10.5.3.0/24", `{"PublicIP":"8.8.4.4","BackendType":"host-gw"}`, ""},
		{"host-gw", "10.5.3.0/24", `{"PublicIP":"192.168.1.255","BackendType":"host-gw"}`, ""},
		{"host-gw", "10.5.3.0/24", `{"PublicIP":"172.30.0.0","BackendType":"host-gw"}`, ""},
		{"host-gw", "10.5.3.0/24", `{"PublicIP":"169.255.0.1","BackendType":"host-gw"}`, ""},
	}
	for _, tt := range tests {
		cfg := &subnet.Config{Network: netip.MustParsePrefix("10.5.0.0/16"), SubnetLen: 24, BackendType: tt.backend}
		log := ktesting.NewLogger(t, ktesting.NewConfig(ktesting.BufferLogs(true)))
		cfg.EnableIPv4 = true
		a := newAdmission(cfg, netip.MustParseAddr("192.168.8.1"), netip.Addr{}, log)
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
	for typ, want := range map[string]string{"udp": "", "alloc": "", "vxlan": "vxlan", "host-gw": "host-gw", "extension": "extension"} {
		if got := subnet.WireBackendType(typ); got != want {
			t.Errorf("WireBackendType(%q) = %q, want %q", typ, got, want)
		}
	}
}

// TestAdmissionDualStack: the IPv6 part of a lease checked on a node with
// IPv6, ignored on one without; IPv6-only leases on an IPv6-only node.
func TestAdmissionDualStack(t *testing.T) {
	dual, err := subnet.ParseConfig([]byte(`{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"vxlan"}}`))
	if err != nil {
		t.Fatal(err)
	}
	v4only, _ := subnet.ParseConfig([]byte(`{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}`))
	v6only, _ := subnet.ParseConfig([]byte(`{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"vxlan"}}`))
	lease := func(v4, v6, pub, pub6 string) subnet.Lease {
		l := subnet.Lease{Attrs: subnet.LeaseAttrs{BackendType: "vxlan"}}
		if v4 != "" {
			l.Subnet = netip.MustParsePrefix(v4)
		}
		if v6 != "" {
			l.IPv6Subnet = netip.MustParsePrefix(v6)
		}
		if pub != "" {
			l.Attrs.PublicIP = netip.MustParseAddr(pub)
		}
		if pub6 != "" {
			l.Attrs.PublicIPv6 = netip.MustParseAddr(pub6)
		}
		return l
	}
	tests := []struct {
		name string
		cfg  *subnet.Config
		l    subnet.Lease
		want string
	}{
		{"dual lease, dual node", dual, lease("10.5.3.0/24", "fc00:0:0:3::/64", "172.30.0.4", "fd5e::4"), ""},
		{"IPv4-only lease, dual node", dual, lease("10.5.3.0/24", "", "172.30.0.4", ""), ""},
		{"IPv6 subnet outside", dual, lease("10.5.3.0/24", "fd00:0:0:3::/64", "172.30.0.4", "fd5e::4"), "IPv6 subnet does not fit"},
		{"IPv6 subnet wrong length", dual, lease("10.5.3.0/24", "fc00:0:0:3::/80", "172.30.0.4", "fd5e::4"), "IPv6 subnet does not fit"},
		{"IPv6 subnet, no PublicIPv6", dual, lease("10.5.3.0/24", "fc00:0:0:3::/64", "172.30.0.4", ""), "no IPv6 PublicIPv6"},
		{"own PublicIPv6", dual, lease("10.5.3.0/24", "fc00:0:0:3::/64", "172.30.0.4", "fd5e::1"), "this node's own"},
		{"dual lease, IPv4 node", v4only, lease("10.5.3.0/24", "fd00:0:0:3::/64", "172.30.0.4", "fd5e::4"), ""},
		{"IPv6-only lease, IPv6 node", v6only, lease("", "fc00:0:0:3::/64", "0.0.0.0", "fd5e::4"), ""},
		{"IPv6-only lease, IPv4 node", v4only, lease("", "fc00:0:0:3::/64", "0.0.0.0", "fd5e::4"), "no subnet of a family"},
		{"IPv4 lease, IPv6-only node", v6only, lease("10.5.3.0/24", "", "172.30.0.4", ""), "EnableIPv4 false"},
		{"loopback PublicIPv6", dual, lease("10.5.3.0/24", "fc00:0:0:3::/64", "172.30.0.4", "::1"), "PublicIPv6 ::1 is not a usable unicast address (loopback)"},
		{"unspecified PublicIPv6", dual, lease("10.5.3.0/24", "fc00:0:0:3::/64", "172.30.0.4", "::"), "(unspecified)"},
		{"multicast PublicIPv6", dual, lease("10.5.3.0/24", "fc00:0:0:3::/64", "172.30.0.4", "ff02::1"), "PublicIPv6 ff02::1 is not a usable unicast address (multicast)"},
		{"link-local PublicIPv6", dual, lease("10.5.3.0/24", "fc00:0:0:3::/64", "172.30.0.4", "fe80::1"), "PublicIPv6 fe80::1 is not a usable unicast address (link-local)"},
		{"link-local PublicIPv6, IPv6-only node", v6only, lease("", "fc00:0:0:3::/64", "0.0.0.0", "fe80::4"), "(link-local)"},
		{"loopback PublicIP, dual node", dual, lease("10.5.3.0/24", "fc00:0:0:3::/64", "127.0.0.1", "fd5e::4"), "(loopback)"},
		{"global PublicIPv6", dual, lease("10.5.3.0/24", "fc00:0:0:3::/64", "172.30.0.4", "2001:db8::4"), ""},
		// A node without IPv6 ignores the IPv6 part, however bad.
		{"loopback PublicIPv6, IPv4 node", v4only, lease("10.5.3.0/24", "fd00:0:0:3::/64", "172.30.0.4", "::1"), ""},
	}
	for _, tt := range tests {
		a := newAdmission(tt.cfg, netip.MustParseAddr("192.168.8.1"), netip.MustParseAddr("fd5e::1"), ktesting.NewLogger(t, ktesting.NewConfig()))
		if got := a.reason(tt.l); (got == "") != (tt.want == "") || !strings.Contains(got, tt.want) {
			t.Errorf("%s: reason %q, want %q", tt.name, got, tt.want)
		}
	}
}
