package main

import (
	"context"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"k8s.io/klog/v2"
	"k8s.io/klog/v2/ktesting"

	"github.com/flanneld-go/flanneld/probe"
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

// testOwnLease is the own lease of the overlayHealth tests.
var testOwnLease = subnet.Lease{Subnet: netip.MustParsePrefix("10.200.0.0/24"), Attrs: subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("172.17.0.1")}}

// testHealth returns an overlayHealth with the default flags (its prober
// not running) and a vxlan config of 10.0.0.0/8.
func testHealth(tb testing.TB, log klog.Logger) (*overlayHealth, *subnet.Config) {
	tb.Helper()
	f, err := parseFlags(nil, env(nil))
	if err != nil {
		tb.Fatal(err)
	}
	cfg, err := subnet.ParseConfig([]byte(`{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan"}}`))
	if err != nil {
		tb.Fatal(err)
	}
	return newOverlayHealth(f, "eth0", 1500, log), cfg
}

// BenchmarkOnApplyUnchanged is what the agent's loop pays at each resync
// for the prober and the host checks at 10,000 leases when no lease
// changed: one onApply with the set it had.
func BenchmarkOnApplyUnchanged(b *testing.B) {
	h, cfg := testHealth(b, klog.Background())
	own := testOwnLease
	remote := vxlanLeases(10000)
	h.onApply(cfg, 1450, own, remote)
	b.ReportAllocs()
	for b.Loop() {
		h.onApply(cfg, 1450, own, remote)
	}
}

// TestOverlayHealthOnApply: each Apply that changes a lease's subnets or
// public addresses reaches the prober (read back through its report), one
// that changes nothing (the same leases, in another order) hands nothing
// on and allocates next to nothing, and the digest tells every field the
// prober and the checks use.
func TestOverlayHealthOnApply(t *testing.T) {
	// The probe sockets bind to the own overlay address, which this host
	// must not have: they then cannot open and no probe leaves.
	own := testOwnLease
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_nonlocal_bind"); err != nil || strings.TrimSpace(string(b)) != "0" {
		t.Skipf("net.ipv4.ip_nonlocal_bind is not 0 (%q, %v): the prober could send probes from this host", b, err)
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.Equal(net.IP(own.Subnet.Addr().AsSlice())) {
			t.Skipf("this host has %s: the prober could send probes from it", n.IP)
		}
	}
	h, cfg := testHealth(t, ktesting.NewLogger(t, ktesting.NewConfig()))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- h.prober.Run(ctx) }()
	defer func() { cancel(); <-done }()
	// reported waits until the prober's report has the leases' peers.
	reported := func(what string, leases []subnet.Lease) {
		t.Helper()
		want := map[netip.Prefix]netip.Addr{}
		for _, l := range leases {
			want[l.Subnet] = l.Attrs.PublicIP
		}
		var rep probe.Report
		for range 500 {
			rep, err = h.prober.Report(ctx)
			if err != nil {
				t.Fatal(err)
			}
			same := len(rep.Peers) == len(want)
			for _, p := range rep.Peers {
				same = same && want[p.Subnet] == p.PublicIP
			}
			if same {
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Fatalf("%s: the prober has %d peers, want the %d of the leases", what, len(rep.Peers), len(want))
	}

	leases := vxlanLeases(50)
	h.onApply(cfg, 1450, own, leases)
	reported("first set", leases)
	first := h.last

	shuffled := slices.Clone(leases)
	slices.Reverse(shuffled)
	if n := testing.AllocsPerRun(10, func() { h.onApply(cfg, 1450, own, shuffled) }); n > 5 || h.last != first {
		t.Errorf("the same leases in another order: %v allocations per onApply, input %+v (was %+v); want it handed nothing on", n, h.last, first)
	}

	changed := slices.Clone(leases)
	changed[7].Attrs.PublicIP = netip.MustParseAddr("172.16.9.9")
	h.onApply(cfg, 1450, own, changed)
	reported("a public address changed", changed)
	h.onApply(cfg, 1450, own, changed[1:])
	reported("a lease gone", changed[1:])

	// Every field the prober and the checks use changes the digest.
	base := h.digest(leases)
	for name, change := range map[string]func(l *subnet.Lease){
		"subnet":       func(l *subnet.Lease) { l.Subnet = netip.MustParsePrefix("10.99.0.0/24") },
		"subnet bits":  func(l *subnet.Lease) { l.Subnet = netip.PrefixFrom(l.Subnet.Addr(), 25) },
		"IPv6 subnet":  func(l *subnet.Lease) { l.IPv6Subnet = netip.MustParsePrefix("fc00::/64") },
		"public IP":    func(l *subnet.Lease) { l.Attrs.PublicIP = netip.MustParseAddr("172.16.99.99") },
		"public IPv6":  func(l *subnet.Lease) { l.Attrs.PublicIPv6 = netip.MustParseAddr("fd00::1") },
		"no public IP": func(l *subnet.Lease) { l.Attrs.PublicIP = netip.Addr{} },
	} {
		c := slices.Clone(leases)
		change(&c[3])
		if h.digest(c) == base {
			t.Errorf("%s changed: same digest", name)
		}
	}
	if h.digest(shuffled) != base || h.digest(leases[1:]) == base {
		t.Errorf("digest: order counts or a lease less does not")
	}
}

// BenchmarkOnApplyOneChanged is onApply at 10,000 leases when one lease
// changed its public address since the last: what the prober and the
// checks are handed then.
func BenchmarkOnApplyOneChanged(b *testing.B) {
	h, cfg := testHealth(b, klog.Background())
	own := testOwnLease
	sets := [2][]subnet.Lease{vxlanLeases(10000), vxlanLeases(10000)}
	sets[1][5000].Attrs.PublicIP = netip.MustParseAddr("172.31.0.1")
	b.ReportAllocs()
	n := 0
	for b.Loop() {
		h.onApply(cfg, 1450, own, sets[n%2])
		n++
	}
}
