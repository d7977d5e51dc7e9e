package subnet

import (
	"net/netip"
	"testing"
)

func TestPrefixKey(t *testing.T) {
	ps := []string{"10.5.34.0/24", "0.0.0.0/0", "fc00:0:0:22::/64", "::ffff:10.5.34.0/120", "10.5.34.0/25"}
	keys := map[PrefixKey]string{}
	for _, s := range ps {
		p := netip.MustParsePrefix(s)
		k := KeyOf(p)
		if got := k.Prefix(); got != p {
			t.Errorf("KeyOf(%s).Prefix() = %s", p, got)
		}
		if other, dup := keys[k]; dup {
			t.Errorf("%s and %s have one key", s, other)
		}
		keys[k] = s
	}
}
