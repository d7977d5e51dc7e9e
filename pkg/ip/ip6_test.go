package ip

import (
	"net/netip"
	"testing"
)

func TestLeaseKey(t *testing.T) {
	tests := []struct{ v4, v6, key string }{
		{"10.5.34.0/24", "", "10.5.34.0-24"},
		{"10.5.34.0/24", "fc00:0:0:22::/64", "10.5.34.0-24&fc00:0:0:22::-64"},
		{"", "fc00::/48", "0.0.0.0-0&fc00::-48"},
	}
	for _, tt := range tests {
		var v4, v6 netip.Prefix
		if tt.v4 != "" {
			v4 = netip.MustParsePrefix(tt.v4)
		}
		if tt.v6 != "" {
			v6 = netip.MustParsePrefix(tt.v6)
		}
		if got := LeaseKey(v4, v6); got != tt.key {
			t.Errorf("LeaseKey(%v, %v) = %q, want %q", v4, v6, got, tt.key)
		}
		g4, g6, err := ParseLeaseKey(tt.key)
		if err != nil || g4 != v4 || g6 != v6 {
			t.Errorf("ParseLeaseKey(%q) = %v, %v, %v", tt.key, g4, g6, err)
		}
	}
	for _, bad := range []string{"10.5.34.0-24&fc00::1-64", "10.5.34.0-24&fc00::-129", "10.5.34.0-24&fc00:0000::-64", "0.0.0.0-0", "10.5.34.0-24&10.0.0.0-8"} {
		if _, _, err := ParseLeaseKey(bad); err == nil {
			t.Errorf("ParseLeaseKey(%q) accepted", bad)
		}
	}
}

func TestSubnets6(t *testing.T) {
	n := netip.MustParsePrefix("fc00::/48")
	if got := FirstSubnet6(n, 64).String(); got != "fc00:0:0:1::" {
		t.Errorf("FirstSubnet6 = %s", got)
	}
	if got := LastSubnet6(n, 64).String(); got != "fc00:0:0:ffff::" {
		t.Errorf("LastSubnet6 = %s", got)
	}
	p, ok := Next6(netip.MustParsePrefix("fc00:0:0:ffff::/64"))
	if !ok || p.String() != "fc00:0:1::/64" {
		t.Errorf("Next6 = %v %v", p, ok)
	}
	if _, ok := Next6(netip.MustParsePrefix("ffff:ffff:ffff:ffff::/64")); ok {
		t.Error("Next6 past the end")
	}
	if got := FirstSubnet6(netip.MustParsePrefix("fc00::/120"), 122).String(); got != "fc00::40" {
		t.Errorf("FirstSubnet6 /122 = %s", got)
	}
	if got := HostAddr6(netip.MustParsePrefix("fc00:0:0:22::/64")).String(); got != "fc00:0:0:22::1" {
		t.Errorf("HostAddr6 = %s", got)
	}
}
