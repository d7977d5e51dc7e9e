package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/flanneld-go/flanneld/e2e/lab"
)

// TestDualStack runs three hosts on an IPv4+IPv6 (or IPv6-only) underlay
// (fd5e::/64, inside the lab's namespaces) for vxlan and host-gw, with the
// rules in iptables and in nftables: subnet.env carries both subnets, ping
// and ping -6 pass between every pair of hosts' bridges, the IPv6 rules are
// in place (and come back when deleted by hand), and a restart keeps both
// subnets.
func TestDualStack(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, backend string
		v4, nft       bool
	}{
		{"vxlan/iptables", "vxlan", true, false},
		{"vxlan/nftables", "vxlan", true, true},
		{"host-gw/iptables", "host-gw", true, false},
		{"host-gw/nftables", "host-gw", true, true},
		{"vxlan-ipv6-only/iptables", "vxlan", false, false},
		{"vxlan-ipv6-only/nftables", "vxlan", false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			testDualStack(t, tc.backend, tc.v4, tc.nft)
		})
	}
}

func testDualStack(t *testing.T, backend string, v4, nft bool) {
	cfg := fmt.Sprintf(`{"EnableIPv4":%t,"EnableIPv6":true,"IPv6Network":"fc00:5::/48","EnableNFTables":%t,"Backend":{"Type":%q}`, v4, nft, backend)
	if v4 {
		cfg += `,"Network":"10.5.0.0/16"`
	}
	cfg += "}"
	l := newLabWith(t, lab.Options{Hosts: 3, LAN6: netip.MustParsePrefix("fd5e::/64")}, cfg)
	hosts := l.Hosts()
	envs := startAll(t, l, "--ip-masq", "--iptables-resync", "1")
	ctx := testCtx(t, converge)
	for i, h := range hosts {
		e := envs[i]
		if !e.IPv6Network.IsValid() || e.IPv6Network.String() != "fc00:5::/48" || e.IPv6Subnet.Bits() != 64 {
			t.Fatalf("%s: subnet.env %v", h.Name, e.Vars)
		}
		if v4 != e.Network.IsValid() {
			t.Errorf("%s: FLANNEL_NETWORK %v with EnableIPv4 %t", h.Name, e.Network, v4)
		}
		if v4 {
			if err := h.SetBridgeAddr(e.Subnet); err != nil {
				t.Fatal(err)
			}
		}
		if err := h.SetBridgeAddr(e.IPv6Subnet); err != nil {
			t.Fatal(err)
		}
	}
	pairs := 0
	for i, from := range hosts {
		for j := range hosts {
			if i == j {
				continue
			}
			if v4 {
				if err := from.WaitPing(ctx, envs[i].Subnet.Addr(), envs[j].Subnet.Addr()); err != nil {
					t.Errorf("ping %s -> %s: %v", from.Name, hosts[j].Name, err)
				}
			}
			if err := from.WaitPing(ctx, envs[i].IPv6Subnet.Addr(), envs[j].IPv6Subnet.Addr()); err != nil {
				t.Errorf("ping -6 %s -> %s: %v", from.Name, hosts[j].Name, err)
				continue
			}
			pairs++
		}
	}
	t.Logf("%s: ping -6 %d/6 pairs (and ping for IPv4: %t)", backend, pairs, v4)

	h := hosts[0]
	if nft {
		if err := nftHas(ctx, h, "ip6", "flannel-ipv6", "forward", "fc00:5::/48"); err != nil {
			t.Fatal(err)
		}
		if v4 {
			if err := nftHas(ctx, h, "ip", "flannel-ipv4", "forward", "10.5.0.0/16"); err != nil {
				t.Fatal(err)
			}
		}
		// Deleted by hand: back within the resync.
		if _, err := h.Exec(ctx, "nft", "flush", "chain", "ip6", "flannel-ipv6", "forward"); err != nil {
			t.Fatal(err)
		}
		eventually(t, "the nftables forward rules back", func() error {
			return nftHas(ctx, h, "ip6", "flannel-ipv6", "forward", "fc00:5::/48")
		})
		if out, _ := h.Exec(ctx, "iptables-save"); strings.Contains(out, "FLANNEL-FWD") {
			t.Errorf("iptables chains in nftables mode:\n%s", out)
		}
	} else {
		out, err := h.Exec(ctx, "ip6tables-save")
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{"-A FLANNEL-FWD -s fc00:5::/48", "-A FLANNEL-FWD -d fc00:5::/48", "-A FORWARD", "-A POSTROUTING"} {
			if !strings.Contains(out, want) {
				t.Errorf("ip6tables-save lacks %q:\n%s", want, out)
			}
		}
	}

	// A restart keeps both subnets.
	if code := stop(t, h.Daemon()); code != 0 {
		t.Fatalf("exit code %d", code)
	}
	startDaemon(t, h, "--ip-masq", "--iptables-resync", "1")
	time.Sleep(500 * time.Millisecond)
	again := waitEnv(t, h)
	if again.Subnet != envs[0].Subnet || again.IPv6Subnet != envs[0].IPv6Subnet {
		t.Errorf("restart: %v %v, want %v %v", again.Subnet, again.IPv6Subnet, envs[0].Subnet, envs[0].IPv6Subnet)
	}
	if err := h.WaitPing(ctx, envs[0].IPv6Subnet.Addr(), envs[1].IPv6Subnet.Addr()); err != nil {
		t.Errorf("ping -6 after the restart: %v", err)
	}
}

// nftHas checks with `nft -j list chain` that chain of table holds a rule
// accepting traffic from network.
func nftHas(ctx context.Context, h *lab.Host, family, table, chain, network string) error {
	out, err := h.Exec(ctx, "nft", "-j", "list", "chain", family, table, chain)
	if err != nil {
		return fmt.Errorf("nft list chain %s %s %s: %v: %s", family, table, chain, err, out)
	}
	var doc struct {
		Nftables []map[string]json.RawMessage `json:"nftables"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		return fmt.Errorf("parsing nft -j output: %v", err)
	}
	addr, bits, _ := strings.Cut(network, "/")
	for _, item := range doc.Nftables {
		rule, ok := item["rule"]
		if ok && strings.Contains(string(rule), `"`+addr+`"`) && strings.Contains(string(rule), `"len": `+bits) && strings.Contains(string(rule), `"accept"`) {
			return nil
		}
	}
	return fmt.Errorf("no rule accepting %s in %s %s %s: %s", network, family, table, chain, out)
}
