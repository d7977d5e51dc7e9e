package subnet

import (
	"errors"
	"strings"
	"testing"
)

func TestParseConfigDefaults(t *testing.T) {
	tests := []struct {
		name, json                 string
		subnetLen                  int
		min, max, backend, network string
	}{
		{"all defaults /16", `{"Network":"10.5.0.0/16"}`, 24, "10.5.1.0", "10.5.255.0", "udp", "10.5.0.0/16"},
		{"/22 still 24", `{"Network":"10.5.0.0/22"}`, 24, "10.5.1.0", "10.5.3.0", "udp", "10.5.0.0/22"},
		{"/23 gives prefix+2", `{"Network":"10.5.0.0/23"}`, 25, "10.5.0.128", "10.5.1.128", "udp", "10.5.0.0/23"},
		{"/28 gives 30", `{"Network":"10.5.0.0/28"}`, 30, "10.5.0.4", "10.5.0.12", "udp", "10.5.0.0/28"},
		{"/8", `{"Network":"10.0.0.0/8"}`, 24, "10.0.1.0", "10.255.255.0", "udp", "10.0.0.0/8"},
		{"host bits cleared", `{"Network":"10.5.1.0/16"}`, 24, "10.5.1.0", "10.5.255.0", "udp", "10.5.0.0/16"},
		{"explicit SubnetLen", `{"Network":"10.5.0.0/16","SubnetLen":20}`, 20, "10.5.16.0", "10.5.240.0", "udp", "10.5.0.0/16"},
		{"explicit min max", `{"Network":"10.5.0.0/16","SubnetMin":"10.5.10.0","SubnetMax":"10.5.20.0"}`, 24, "10.5.10.0", "10.5.20.0", "udp", "10.5.0.0/16"},
		{"min only", `{"Network":"10.5.0.0/16","SubnetMin":"10.5.0.0"}`, 24, "10.5.0.0", "10.5.255.0", "udp", "10.5.0.0/16"},
		{"backend vxlan", `{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":1}}`, 24, "10.5.1.0", "10.5.255.0", "vxlan", "10.5.0.0/16"},
		{"backend null", `{"Network":"10.5.0.0/16","Backend":null}`, 24, "10.5.1.0", "10.5.255.0", "udp", "10.5.0.0/16"},
		{"keys any case, unknown ignored", `{"network":"10.5.0.0/16","SUBNETLEN":26,"backend":{"type":"host-gw"},"EnableIPv6":false}`, 26, "10.5.0.64", "10.5.255.192", "host-gw", "10.5.0.0/16"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := ParseConfig([]byte(tt.json))
			if err != nil {
				t.Fatal(err)
			}
			if c.Network.String() != tt.network || c.SubnetLen != tt.subnetLen || c.SubnetMin.String() != tt.min ||
				c.SubnetMax.String() != tt.max || c.BackendType != tt.backend {
				t.Errorf("got Network=%s SubnetLen=%d Min=%s Max=%s Backend=%s", c.Network, c.SubnetLen, c.SubnetMin, c.SubnetMax, c.BackendType)
			}
		})
	}
}

func TestParseConfigBackendRawKept(t *testing.T) {
	c, err := ParseConfig([]byte(`{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":7}}`))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(c.Backend), `"VNI":7`) {
		t.Errorf("Backend raw = %s", c.Backend)
	}
	c, _ = ParseConfig([]byte(`{"Network":"10.5.0.0/16"}`))
	if c.Backend != nil {
		t.Errorf("Backend raw = %s, want nil", c.Backend)
	}
}

func TestParseConfigErrors(t *testing.T) {
	tests := []struct{ name, json, want string }{
		{"not json", `{`, "not a JSON object"},
		{"array", `[]`, "not a JSON object"},
		{"trailing", `{"Network":"10.5.0.0/16"} x`, "trailing data"},
		{"no network", `{}`, "Network is missing"},
		{"network number", `{"Network":10}`, "Network 10 is not a string"},
		{"network garbage", `{"Network":"banana"}`, `Network "banana" is not an IPv4 CIDR`},
		{"network no len", `{"Network":"10.5.0.0"}`, `Network "10.5.0.0" is not an IPv4 CIDR`},
		{"network ipv6", `{"Network":"fd00::/64"}`, `Network "fd00::/64" is not an IPv4 CIDR`},
		{"network too small", `{"Network":"10.5.0.0/29"}`, "Network 10.5.0.0/29 is too small: the prefix must be /28 or shorter"},
		{"subnetlen 31", `{"Network":"10.5.0.0/16","SubnetLen":31}`, "SubnetLen 31 is longer than 30"},
		{"subnetlen short", `{"Network":"10.5.0.0/16","SubnetLen":17}`, "SubnetLen 17 is shorter than the Network prefix + 2 (18 for 10.5.0.0/16)"},
		{"subnetlen string", `{"Network":"10.5.0.0/16","SubnetLen":"24"}`, `SubnetLen "24" is not a whole number`},
		{"subnetlen fraction", `{"Network":"10.5.0.0/16","SubnetLen":24.5}`, `SubnetLen 24.5 is not a whole number`},
		{"min garbage", `{"Network":"10.5.0.0/16","SubnetMin":"x"}`, `SubnetMin "x" is not an IPv4 address`},
		{"min number", `{"Network":"10.5.0.0/16","SubnetMin":5}`, `SubnetMin 5 is not a string`},
		{"min outside", `{"Network":"10.5.0.0/16","SubnetMin":"10.6.1.0"}`, "SubnetMin 10.6.1.0 is outside Network 10.5.0.0/16"},
		{"min not boundary", `{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.1"}`, "SubnetMin 10.5.1.1 is not on a /24 boundary"},
		{"max outside", `{"Network":"10.5.0.0/16","SubnetMax":"10.4.0.0"}`, "SubnetMax 10.4.0.0 is outside Network 10.5.0.0/16"},
		{"max not boundary", `{"Network":"10.5.0.0/16","SubnetMax":"10.5.3.128"}`, "SubnetMax 10.5.3.128 is not on a /24 boundary"},
		{"min above max", `{"Network":"10.5.0.0/16","SubnetMin":"10.5.9.0","SubnetMax":"10.5.8.0"}`, "SubnetMin 10.5.9.0 is above SubnetMax 10.5.8.0"},
		{"backend string", `{"Network":"10.5.0.0/16","Backend":"vxlan"}`, "Backend is not a JSON object"},
		{"backend no type", `{"Network":"10.5.0.0/16","Backend":{"VNI":1}}`, "Backend.Type is missing"},
		{"backend empty type", `{"Network":"10.5.0.0/16","Backend":{"Type":""}}`, "Backend.Type is empty"},
		{"backend type number", `{"Network":"10.5.0.0/16","Backend":{"Type":1}}`, "Backend.Type 1 is not a string"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseConfig([]byte(tt.json))
			if !errors.Is(err, ErrInvalidConfig) {
				t.Fatalf("err = %v, want ErrInvalidConfig", err)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("err = %q, want it to contain %q", err, tt.want)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("err spans lines: %q", err)
			}
		})
	}
}

func TestConfigInRangeAndSubnets(t *testing.T) {
	c, err := ParseConfig([]byte(`{"Network":"10.5.0.0/16","SubnetMin":"10.5.3.0","SubnetMax":"10.5.6.0"}`))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	c.Subnets(func(p netipPrefix) bool { got = append(got, p.String()); return true })
	if strings.Join(got, " ") != "10.5.3.0/24 10.5.4.0/24 10.5.5.0/24 10.5.6.0/24" {
		t.Errorf("Subnets = %v", got)
	}
	n := 0
	c.Subnets(func(netipPrefix) bool { n++; return n < 2 })
	if n != 2 {
		t.Errorf("Subnets did not stop: %d", n)
	}
	for s, want := range map[string]bool{
		"10.5.3.0/24": true, "10.5.6.0/24": true, "10.5.2.0/24": false, "10.5.7.0/24": false,
		"10.5.4.0/25": false, "10.6.4.0/24": false, "10.5.4.1/24": false,
	} {
		if got := c.InRange(mustPrefix(s)); got != want {
			t.Errorf("InRange(%s) = %v, want %v", s, got, want)
		}
	}
}

func TestParseConfigTopOfSpace(t *testing.T) {
	c, err := ParseConfig([]byte(`{"Network":"255.255.0.0/16"}`))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	c.Subnets(func(netipPrefix) bool { n++; return true })
	if n != 255 || c.SubnetMax.String() != "255.255.255.0" {
		t.Errorf("n=%d max=%s", n, c.SubnetMax)
	}
}
