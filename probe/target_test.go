package probe

import (
	"net/netip"
	"testing"

	"github.com/flanneld-go/flanneld/subnet"
)

// TestPathOf: the port to name, the source and each peer's target per
// backend, from configs as operators write them.
func TestPathOf(t *testing.T) {
	own := subnet.Lease{Subnet: netip.MustParsePrefix("10.5.1.0/24"), Attrs: subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("172.30.0.1")}}
	remote := []subnet.Lease{{Subnet: netip.MustParsePrefix("10.5.3.0/24"), Attrs: subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("172.30.0.4")}}}
	for _, tt := range []struct {
		config         string
		port           int
		source, target string // "" target: not probed
	}{
		{`{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}`, 8472, "10.5.1.0", "10.5.3.0"},
		{`{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","Port":4789}}`, 4789, "10.5.1.0", "10.5.3.0"},
		{`{"Network":"10.5.0.0/16"}`, 8285, "10.5.1.0", "10.5.3.0"},
		{`{"Network":"10.5.0.0/16","Backend":{"Type":"udp","Port":9000}}`, 9000, "10.5.1.0", "10.5.3.0"},
		{`{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}`, 0, "172.30.0.1", "172.30.0.4"},
		{`{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}`, 0, "172.30.0.1", ""},
	} {
		cfg, err := subnet.ParseConfig([]byte(tt.config))
		if err != nil {
			t.Fatal(err)
		}
		p := PathOf(cfg, 1450, own)
		peers := PeersOf(p, remote)
		target := ""
		if len(peers) == 1 {
			target = p.target(peers[0].Subnet, peers[0].PublicIP).String()
		}
		if p.Port != tt.port || p.Source.String() != tt.source || target != tt.target {
			t.Errorf("%s: port %d, source %s, target %q; want %d, %s, %q", tt.config, p.Port, p.Source, target, tt.port, tt.source, tt.target)
		}
	}
	// Dual stack: one peer per family, each from its own source.
	cfg, err := subnet.ParseConfig([]byte(`{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00:5::/48","Backend":{"Type":"vxlan"}}`))
	if err != nil {
		t.Fatal(err)
	}
	own.IPv6Subnet = netip.MustParsePrefix("fc00:5:0:1::/64")
	remote[0].IPv6Subnet, remote[0].Attrs.PublicIPv6 = netip.MustParsePrefix("fc00:5:0:3::/64"), netip.MustParseAddr("fd5e::4")
	p := PathOf(cfg, 1430, own)
	peers := PeersOf(p, remote)
	if p.Source.String() != "10.5.1.0" || p.Source6.String() != "fc00:5:0:1::" || len(peers) != 2 ||
		p.target(peers[1].Subnet, peers[1].PublicIP).String() != "fc00:5:0:3::" || peers[1].PublicIP.String() != "fd5e::4" {
		t.Errorf("dual stack: sources %s %s, peers %+v", p.Source, p.Source6, peers)
	}
	cfg.EnableIPv4 = false
	if p := PathOf(cfg, 1430, own); p.Source.IsValid() || len(PeersOf(p, remote)) != 1 {
		t.Errorf("IPv6 only: source %s, peers %+v", p.Source, PeersOf(p, remote))
	}
	cfg, _ = subnet.ParseConfig([]byte(`{"Network":"10.5.0.0/16","Backend":{"Type":"wireguard","ListenPortV6":5555}}`))
	wg := PathOf(cfg, 1420, own)
	if got, got6 := wg.Remedy(false), wg.Remedy(true); got != "check that UDP 51820 passes between the hosts" || got6 != "check that UDP 5555 passes between the hosts" {
		t.Errorf("wireguard remedies %q, %q", got, got6)
	}
}
