package subnet

import (
	"errors"
	"strings"
	"testing"
)

func TestParseConfigIPv6Defaults(t *testing.T) {
	tests := []struct {
		name, json         string
		v4, v6             bool
		network, min, max  string
		subnetLen          int
		nftables, backend6 bool
	}{
		{"dual stack /48", `{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"vxlan"}}`,
			true, true, "fc00::/48", "fc00:0:0:1::", "fc00:0:0:ffff::", 64, false, true},
		{"/62 still 64", `{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/62","Backend":{"Type":"vxlan"}}`,
			true, true, "fc00::/62", "fc00:0:0:1::", "fc00:0:0:3::", 64, false, true},
		{"/63 gives prefix+2", `{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/63","Backend":{"Type":"vxlan"}}`,
			true, true, "fc00::/63", "fc00::8000:0:0:0", "fc00:0:0:1:8000::", 65, false, true},
		{"/124 gives 126", `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/124","Backend":{"Type":"vxlan"}}`,
			false, true, "fc00::/124", "fc00::4", "fc00::c", 126, false, true},
		{"explicit", `{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetLen":56,"IPv6SubnetMin":"fc00:0:0:1000::","IPv6SubnetMax":"fc00:0:0:2000::","Backend":{"Type":"host-gw"},"EnableNFTables":true}`,
			true, true, "fc00::/48", "fc00:0:0:1000::", "fc00:0:0:2000::", 56, true, true},
		{"host bits cleared, keys any case", `{"network":"10.5.0.0/16","enableipv6":true,"ipv6network":"fc00::1/48","backend":{"type":"vxlan"}}`,
			true, true, "fc00::/48", "fc00:0:0:1::", "fc00:0:0:ffff::", 64, false, true},
		{"IPv4 only by default", `{"Network":"10.5.0.0/16"}`, true, false, "invalid Prefix", "invalid IP", "invalid IP", 0, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := ParseConfig([]byte(tt.json))
			if err != nil {
				t.Fatal(err)
			}
			if c.EnableIPv4 != tt.v4 || c.EnableIPv6 != tt.v6 || c.IPv6Network.String() != tt.network || c.IPv6SubnetLen != tt.subnetLen ||
				c.IPv6SubnetMin.String() != tt.min || c.IPv6SubnetMax.String() != tt.max || c.EnableNFTables != tt.nftables {
				t.Errorf("got v4=%v v6=%v IPv6Network=%s IPv6SubnetLen=%d Min=%s Max=%s nft=%v", c.EnableIPv4, c.EnableIPv6,
					c.IPv6Network, c.IPv6SubnetLen, c.IPv6SubnetMin, c.IPv6SubnetMax, c.EnableNFTables)
			}
		})
	}
}

func TestParseConfigIPv6Errors(t *testing.T) {
	const dual = `"Network":"10.5.0.0/16","EnableIPv6":true,"Backend":{"Type":"vxlan"},`
	tests := []struct{ name, json, want string }{
		{"neither family", `{"EnableIPv4":false}`, "EnableIPv4 and EnableIPv6 are both false"},
		{"IPv6Network without EnableIPv6", `{"Network":"10.5.0.0/16","IPv6Network":"fc00::/48"}`, "IPv6Network is set but EnableIPv6 is not true"},
		{"EnableIPv6 without IPv6Network", `{"Network":"10.5.0.0/16","EnableIPv6":true}`, "EnableIPv6 is true but IPv6Network is missing"},
		{"enable not bool", `{"Network":"10.5.0.0/16","EnableIPv6":"yes"}`, `EnableIPv6 "yes" is not true or false`},
		{"nftables not bool", `{"Network":"10.5.0.0/16","EnableNFTables":1}`, `EnableNFTables 1 is not true or false`},
		{"IPv6Network is IPv4", `{` + dual + `"IPv6Network":"10.6.0.0/16"}`, `IPv6Network "10.6.0.0/16" is not an IPv6 CIDR`},
		{"IPv6Network garbage", `{` + dual + `"IPv6Network":"fc00::"}`, `IPv6Network "fc00::" is not an IPv6 CIDR`},
		{"IPv6Network too small", `{` + dual + `"IPv6Network":"fc00::/125"}`, "IPv6Network fc00::/125 is too small"},
		{"IPv6SubnetLen 127", `{` + dual + `"IPv6Network":"fc00::/48","IPv6SubnetLen":127}`, "IPv6SubnetLen 127 is longer than 126"},
		{"IPv6SubnetLen short", `{` + dual + `"IPv6Network":"fc00::/48","IPv6SubnetLen":49}`, "IPv6SubnetLen 49 is shorter than the IPv6Network prefix + 2 (50 for fc00::/48)"},
		{"IPv6SubnetLen string", `{` + dual + `"IPv6Network":"fc00::/48","IPv6SubnetLen":"64"}`, `IPv6SubnetLen "64" is not a whole number`},
		{"min outside", `{` + dual + `"IPv6Network":"fc00::/48","IPv6SubnetMin":"fd00::"}`, "IPv6SubnetMin fd00:: is outside IPv6Network fc00::/48"},
		{"min not boundary", `{` + dual + `"IPv6Network":"fc00::/48","IPv6SubnetMin":"fc00:0:0:1::1"}`, "IPv6SubnetMin fc00:0:0:1::1 is not on a /64 boundary"},
		{"max IPv4", `{` + dual + `"IPv6Network":"fc00::/48","IPv6SubnetMax":"10.5.0.0"}`, `IPv6SubnetMax "10.5.0.0" is not an IPv6 address`},
		{"min above max", `{` + dual + `"IPv6Network":"fc00::/48","IPv6SubnetMin":"fc00:0:0:9::","IPv6SubnetMax":"fc00:0:0:8::"}`, "IPv6SubnetMin fc00:0:0:9:: is above IPv6SubnetMax fc00:0:0:8::"},
		{"udp with IPv6", `{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48"}`, "the udp backend carries IPv4 only"},
		{"IPv6-only still checks IPv6", `{"EnableIPv4":false,"EnableIPv6":true,"Backend":{"Type":"vxlan"}}`, "IPv6Network is missing"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseConfig([]byte(tt.json))
			if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("ParseConfig = %v, want an invalid-config error containing %q", err, tt.want)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error is not one line: %q", err)
			}
		})
	}
	// IPv6-only ignores the IPv4 keys, as flannel does.
	c, err := ParseConfig([]byte(`{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48","Network":"banana","Backend":{"Type":"vxlan"}}`))
	if err != nil || c.Network.IsValid() {
		t.Errorf("IPv6-only config: %v, Network %v", err, c)
	}
}
