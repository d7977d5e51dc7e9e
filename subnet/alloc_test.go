package subnet

import "testing"

func TestClaimedPrefix(t *testing.T) {
	for _, tc := range []struct {
		name string
		want string // "" = no claim
	}{
		{"10.5.34.0-24", "10.5.34.0/24"},
		{"10.5.34.7-24", "10.5.34.0/24"}, // not canonical, still claims its subnet
		{"10.5.0.0-16", "10.5.0.0/16"},
		{"10.5.34.0-33", ""},
		{"10.5.34.0", ""},
		{"garbage", ""},
		{"::1-64", ""},
		{"10.5.34.0-x", ""},
		{"10.5.34.0-24x", "10.5.34.0/24"},
		{"10.5.34.0-", ""},
		{"10.5.34.0-24&fc00:0:0:22::-64", "10.5.34.0/24"}, // dual stack: the IPv4 part
	} {
		p, ok := ClaimedPrefix(tc.name)
		switch {
		case tc.want == "" && ok:
			t.Errorf("ClaimedPrefix(%q) = %v, want no claim", tc.name, p)
		case tc.want != "" && (!ok || p != mustPrefix(tc.want)):
			t.Errorf("ClaimedPrefix(%q) = %v, %v; want %s", tc.name, p, ok, tc.want)
		}
	}
}
