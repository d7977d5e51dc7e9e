package main

import (
	"net/netip"
	"strings"
	"testing"

	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/subnet"
)

// TestPeerProbeRateFlag: default 20, FLANNELD_PEER_PROBE_RATE, the command
// line winning, 0 turning probes off, and out-of-range values.
func TestPeerProbeRateFlag(t *testing.T) {
	for _, tt := range []struct {
		args []string
		env  map[string]string
		want int
	}{
		{nil, nil, 20},
		{nil, map[string]string{"FLANNELD_PEER_PROBE_RATE": "5"}, 5},
		{[]string{"--peer-probe-rate=0"}, map[string]string{"FLANNELD_PEER_PROBE_RATE": "5"}, 0},
	} {
		f, err := parseFlags(tt.args, env(tt.env))
		if err != nil || f.peerProbeRate != tt.want {
			t.Errorf("parseFlags(%q, %v): rate %v, %v; want %d", tt.args, tt.env, f, err, tt.want)
		}
	}
	for _, bad := range []string{"--peer-probe-rate=-1", "--peer-probe-rate=10001"} {
		if _, err := parseFlags([]string{bad}, env(nil)); err == nil || !strings.Contains(err.Error(), "is out of range: use 0..10000") {
			t.Errorf("%s: %v", bad, err)
		}
	}
	if _, err := parseFlags([]string{"--peer-probe-rate=fast"}, env(nil)); err == nil || !strings.Contains(err.Error(), "must be a whole number") {
		t.Errorf("--peer-probe-rate=fast: %v", err)
	}
	if f, err := parseFlags([]string{"--check"}, env(nil)); err != nil || !f.check {
		t.Errorf("--check: %v", err)
	}
}

// vxlanLeases is n remote vxlan leases, a /24 each.
func vxlanLeases(n int) []subnet.Lease {
	out := make([]subnet.Lease, 0, n)
	for i := range n {
		out = append(out, subnet.Lease{Subnet: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 0}), 24),
			Attrs: subnet.LeaseAttrs{PublicIP: netip.AddrFrom4([4]byte{172, 16, byte(i >> 8), byte(i)}), BackendType: "vxlan"}})
	}
	return out
}

// BenchmarkOnApplyUnchanged is what the agent's loop pays at each resync
// for the prober and the host checks at 10,000 leases when no lease
// changed: one onApply with the set it had.
func BenchmarkOnApplyUnchanged(b *testing.B) {
	f, err := parseFlags(nil, env(nil))
	if err != nil {
		b.Fatal(err)
	}
	cfg, err := subnet.ParseConfig([]byte(`{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan"}}`))
	if err != nil {
		b.Fatal(err)
	}
	h := newOverlayHealth(f, "eth0", 1500, klog.Background())
	own := subnet.Lease{Subnet: netip.MustParsePrefix("10.200.0.0/24"), Attrs: subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("172.17.0.1")}}
	remote := vxlanLeases(10000)
	h.onApply(cfg, 1450, own, remote)
	b.ReportAllocs()
	for b.Loop() {
		h.onApply(cfg, 1450, own, remote)
	}
}
