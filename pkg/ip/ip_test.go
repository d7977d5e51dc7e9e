package ip

import (
	"errors"
	"net/netip"
	"testing"
)

func TestParseRejectsIPv6(t *testing.T) {
	for _, s := range []string{"::1", "fe80::1", "::ffff:10.0.0.1"} {
		if _, err := ParseAddr(s); !errors.Is(err, ErrNotIPv4) {
			t.Errorf("ParseAddr(%q) = %v, want ErrNotIPv4", s, err)
		}
	}
	if _, err := ParsePrefix("fd00::/64"); !errors.Is(err, ErrNotIPv4) {
		t.Errorf("ParsePrefix(fd00::/64) = %v, want ErrNotIPv4", err)
	}
	if _, err := ParseAddr("10.0.0"); err == nil {
		t.Error("ParseAddr(10.0.0) succeeded")
	}
}

func TestParsePrefixMasks(t *testing.T) {
	p, err := ParsePrefix("10.5.1.7/16")
	if err != nil || p.String() != "10.5.0.0/16" {
		t.Fatalf("ParsePrefix = %v, %v; want 10.5.0.0/16", p, err)
	}
}

func TestKeyCodec(t *testing.T) {
	for _, s := range []string{"10.5.34.0-24", "0.0.0.0-0", "192.168.8.128-25", "10.5.0.4-30"} {
		p, err := ParseKey(s)
		if err != nil {
			t.Fatalf("ParseKey(%q): %v", s, err)
		}
		if got := Key(p); got != s {
			t.Errorf("Key(ParseKey(%q)) = %q", s, got)
		}
	}
	for _, s := range []string{"", "10.5.34.0", "10.5.34.0-", "10.5.34.0-33", "10.5.34.1-24", "10.5.34.0-+24",
		"10.5.34.0-024", "fd00::-64", "10.5.34.0/24", "x-24", "10.5.34.0-24-1"} {
		if p, err := ParseKey(s); err == nil {
			t.Errorf("ParseKey(%q) = %v, want error", s, p)
		}
	}
}

func TestContains(t *testing.T) {
	n := netip.MustParsePrefix("10.5.0.0/16")
	if !Contains(n, netip.MustParsePrefix("10.5.34.0/24")) {
		t.Error("10.5.0.0/16 should contain 10.5.34.0/24")
	}
	if Contains(n, netip.MustParsePrefix("10.0.0.0/8")) {
		t.Error("10.5.0.0/16 should not contain 10.0.0.0/8")
	}
	if Contains(n, netip.MustParsePrefix("10.6.0.0/24")) {
		t.Error("10.5.0.0/16 should not contain 10.6.0.0/24")
	}
}

func TestNetConversions(t *testing.T) {
	p := netip.MustParsePrefix("10.5.34.0/24")
	n := IPNet(p)
	if n.String() != "10.5.34.0/24" || len(n.IP) != 4 {
		t.Fatalf("IPNet = %v (len %d)", n, len(n.IP))
	}
	back, ok := FromIPNet(n)
	if !ok || back != p {
		t.Fatalf("FromIPNet = %v, %v", back, ok)
	}
	h := HostNet(netip.MustParseAddr("10.5.34.0"), 16)
	if h.String() != "10.5.34.0/16" {
		t.Fatalf("HostNet = %v", h)
	}
	if a, ok := FromIP(IP(netip.MustParseAddr("1.2.3.4")).To16()); !ok || a.String() != "1.2.3.4" {
		t.Fatalf("FromIP(16-byte) = %v, %v", a, ok)
	}
	if _, ok := FromIP(IP(netip.MustParseAddr("1.2.3.4"))[:3]); ok {
		t.Fatal("FromIP accepted a 3-byte IP")
	}
	if FromUint32(Uint32(netip.MustParseAddr("192.168.8.101"))).String() != "192.168.8.101" {
		t.Fatal("Uint32 round trip")
	}
}
