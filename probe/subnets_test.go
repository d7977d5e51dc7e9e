package probe

import (
	"net/netip"
	"testing"
)

// TestSubnets: what was added is found, sorted or not; nothing else is
// (another length, an IPv4-mapped IPv6 twin, an invalid prefix).
func TestSubnets(t *testing.T) {
	var s Subnets
	added := []string{"10.5.9.0/24", "fc00:5:0:3::/64", "10.5.2.0/24", "10.5.3.0/25", "fc00:5:0:1::/64"}
	for _, p := range added {
		s.Add(netip.MustParsePrefix(p))
	}
	s.Add(netip.Prefix{})
	if n := len(s.v4) + len(s.v6); n != len(added) {
		t.Errorf("%d subnets kept, want %d", n, len(added))
	}
	absent := []string{"10.5.3.0/24", "10.5.9.0/23", "::ffff:10.5.9.0/120", "fc00:5:0:3::/65", "fc00:5:0:2::/64", "10.5.1.0/24"}
	check := func(s *Subnets, how string) {
		t.Helper()
		for _, p := range added {
			if !s.Has(netip.MustParsePrefix(p)) {
				t.Errorf("%s: %s not found", how, p)
			}
		}
		for _, p := range absent {
			if s.Has(netip.MustParsePrefix(p)) {
				t.Errorf("%s: %s found", how, p)
			}
		}
		if s.Has(netip.Prefix{}) {
			t.Errorf("%s: the invalid prefix found", how)
		}
	}
	c := s.sorted()
	if c == &s {
		t.Fatal("an unsorted set searched as it is")
	}
	check(c, "a sorted copy")
	s.Sort()
	if s.sorted() != &s {
		t.Error("a sorted set copied")
	}
	check(&s, "sorted")
}
