package e2e

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/flanneld-go/flanneld/e2e/lab"
	"github.com/flanneld-go/flanneld/probe"
)

// probeCount is the daemon's flannel_peer_probes_total, both sizes.
func probeCount(ctx context.Context, h *lab.Host) (int, error) {
	_, body, err := httpGet(ctx, h, probeHealthz+"/metrics")
	if err != nil {
		return 0, err
	}
	n, found := 0, false
	for _, line := range strings.Split(body, "\n") {
		if rest, ok := strings.CutPrefix(line, "flannel_peer_probes_total{"); ok {
			_, v, _ := strings.Cut(rest, "} ")
			c, err := strconv.Atoi(v)
			if err != nil {
				return 0, fmt.Errorf("metric line %q: %w", line, err)
			}
			n, found = n+c, true
		}
	}
	if !found {
		return 0, nil
	}
	return n, nil
}

// wireCount is the packets to UDP 8472 that left h's eth0, counted by a
// rule without a target that countWire put first in OUTPUT.
func wireCount(ctx context.Context, h *lab.Host) (int, error) {
	out, err := h.Exec(ctx, "iptables", "-w", "5", "-nvxL", "OUTPUT")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) > 2 && strings.Contains(line, "dpt:8472") {
			return strconv.Atoi(f[0])
		}
	}
	return 0, fmt.Errorf("no counting rule in OUTPUT:\n%s", out)
}

// manyPeers runs one daemon among n synthetic vxlan peers (none of them
// exists, so every probe is lost) and samples its probes for window: the
// most probes in any one-second sample (with the sample's length), the
// mean rate, the rate on the wire, and the daemon's memory then.
type manyPeersResult struct {
	maxPerSample, maxAllowed int
	meanRate, wireRate       float64
	mem                      memory
	peers                    int
}

func manyPeers(tb testing.TB, n, rate int, window time.Duration) manyPeersResult {
	needRoot(tb)
	bin := lab.BuildDaemon(tb)
	l := lab.Start(tb, lab.Options{Hosts: 1, DaemonPath: bin, LAN: benchLAN, Logf: func(string, ...any) {}})
	tb.Cleanup(func() { stopAll(tb, l) })
	ctx := testCtx(tb, 10*time.Minute)
	if err := l.SetConfig(ctx, benchConfig("vxlan")); err != nil {
		tb.Fatal(err)
	}
	if err := writeLeases(ctx, l.KeysAPI(), l, "vxlan", 0, n); err != nil {
		tb.Fatal(err)
	}
	h := l.Host(1)
	if _, err := h.Exec(ctx, "iptables", "-w", "5", "-I", "OUTPUT", "-o", "eth0", "-p", "udp", "--dport", "8472"); err != nil {
		tb.Fatal(err)
	}
	d := startDaemon(tb, h, append(probeArgs, "--peer-probe-rate", strconv.Itoa(rate))...)
	waitEnv(tb, h)
	var res manyPeersResult
	waitFor(tb, "the prober knows every peer", 2*converge, func() error {
		rep, err := peersOf(ctx, h)
		if err != nil {
			return err
		}
		if res.peers = len(rep.Peers); res.peers != n {
			return fmt.Errorf("%d peers", res.peers)
		}
		return nil
	})
	start, wstart := time.Now(), 0
	first, err := probeCount(ctx, h)
	if err == nil {
		wstart, err = wireCount(ctx, h)
	}
	if err != nil {
		tb.Fatal(err)
	}
	// Each count is read somewhere between the time before its scrape and
	// the time after it, so the probes between two counts were sent within
	// (after this scrape) - (before the previous one).
	last, lastAt, lastBefore := first, start, start
	for time.Since(start) < window {
		time.Sleep(time.Second)
		before := time.Now()
		c, err := probeCount(ctx, h)
		if err != nil {
			tb.Fatal(err)
		}
		now := time.Now()
		if c-last > res.maxPerSample {
			res.maxPerSample = c - last
			res.maxAllowed = int(float64(rate)*now.Sub(lastBefore).Seconds()) + 1
		}
		last, lastAt, lastBefore = c, now, before
	}
	wend, err := wireCount(ctx, h)
	if err != nil {
		tb.Fatal(err)
	}
	elapsed := lastAt.Sub(start).Seconds()
	res.meanRate = float64(last-first) / elapsed
	res.wireRate = float64(wend-wstart) / elapsed
	if res.mem, err = readMemory(d.Pid()); err != nil {
		tb.Fatal(err)
	}
	return res
}

// TestPeerProbes5000: a node with 5,000 peers (none answers) sends, in
// every one-second sample, no more probes than the rate allows; the mean
// rate on the wire stays within it too.
func TestPeerProbes5000(t *testing.T) {
	if testing.Short() {
		t.Skip("5,000 leases: skipped with -short")
	}
	res := manyPeers(t, 5000, probe.DefaultRate, 10*time.Second)
	t.Logf("5,000 peers at rate %d: at most %d probes in a sample (allowed %d), mean %.1f/s, on the wire %.1f/s, RssAnon %.1f MB, VmHWM %.1f MB",
		probe.DefaultRate, res.maxPerSample, res.maxAllowed, res.meanRate, res.wireRate, res.mem.Anon, res.mem.Peak)
	if res.maxPerSample > res.maxAllowed || res.meanRate > probe.DefaultRate || res.wireRate > probe.DefaultRate+1 {
		t.Errorf("probes above the rate %d: %d in one sample (allowed %d), mean %.1f/s, wire %.1f/s", probe.DefaultRate, res.maxPerSample, res.maxAllowed, res.meanRate, res.wireRate)
	}
}

// BenchmarkPeerProbes5000 reports the probe rate and the daemon's memory
// among 5,000 peers, with probes at the default rate and off.
func BenchmarkPeerProbes5000(b *testing.B) {
	for _, rate := range []int{probe.DefaultRate, 0} {
		b.Run(fmt.Sprintf("rate=%d", rate), func(b *testing.B) {
			for range b.N {
				var res manyPeersResult
				if rate == 0 {
					res = manyPeersOff(b, 5000)
				} else {
					res = manyPeers(b, 5000, rate, 30*time.Second)
				}
				b.ReportMetric(res.meanRate, "probes/s")
				b.ReportMetric(res.wireRate, "wire-pkts/s")
				b.ReportMetric(float64(res.maxPerSample), "max-probes/sample")
				b.ReportMetric(res.mem.Anon, "RssAnon-MB")
				b.ReportMetric(res.mem.Peak, "VmHWM-MB")
			}
		})
	}
}

// manyPeersOff is the memory of a daemon among n peers with probes off.
func manyPeersOff(b *testing.B, n int) manyPeersResult {
	needRoot(b)
	bin := lab.BuildDaemon(b)
	l := lab.Start(b, lab.Options{Hosts: 1, DaemonPath: bin, LAN: benchLAN, Logf: func(string, ...any) {}})
	b.Cleanup(func() { stopAll(b, l) })
	ctx := testCtx(b, 10*time.Minute)
	if err := l.SetConfig(ctx, benchConfig("vxlan")); err != nil {
		b.Fatal(err)
	}
	if err := writeLeases(ctx, l.KeysAPI(), l, "vxlan", 0, n); err != nil {
		b.Fatal(err)
	}
	h := l.Host(1)
	d := startDaemon(b, h, append(probeArgs, "--peer-probe-rate", "0")...)
	waitEnv(b, h)
	time.Sleep(30 * time.Second)
	m, err := readMemory(d.Pid())
	if err != nil {
		b.Fatal(err)
	}
	return manyPeersResult{mem: m}
}

// BenchmarkPeerProbeDetection measures, between two vxlan hosts, the time
// from a firewall rule going in at host2 until host1's /peers shows the
// change: UDP 8472 dropped (unreachable) and underlay packets above 1,200
// bytes dropped (mtu-blackhole). It reports the median and p90 over b.N
// rules (use -benchtime=10x and -timeout 40m), each put in at a random
// point of the probes' period; after each the rule goes and host1 is let
// recover, untimed.
func BenchmarkPeerProbeDetection(b *testing.B) {
	for _, c := range []struct {
		name, state string
		rule        []string
		phase       time.Duration // the period of the probes that detect it
	}{
		{"blocked-port", "unreachable", []string{"INPUT", "-p", "udp", "--dport", "8472", "-j", "DROP"}, probe.MinRound},
		{"mtu-blackhole", "mtu-blackhole", []string{"INPUT", "-p", "udp", "--dport", "8472", "-m", "length", "--length", "1201:65535", "-j", "DROP"}, 3 * probe.MinRound},
	} {
		b.Run(c.name, func(b *testing.B) {
			l := newLab(b, 2, vxlanConfig)
			envs := startAll(b, l, probeArgs...)
			h1, h2 := l.Host(1), l.Host(2)
			s2 := subnetOf(envs[1])
			waitState(b, h1, s2, "reachable", converge)
			var took []time.Duration
			b.ResetTimer()
			for range b.N {
				// The rule goes in at a random point of the probes' period:
				// right after a recovery the next probe is a round away.
				time.Sleep(rand.N(c.phase))
				netfilter(b, h2, append([]string{"-A"}, c.rule...)...)
				took = append(took, waitState(b, h1, s2, c.state, 2*time.Minute))
				netfilter(b, h2, append([]string{"-D"}, c.rule...)...)
				waitState(b, h1, s2, "reachable", 2*time.Minute)
			}
			b.StopTimer()
			slices.Sort(took)
			b.ReportMetric(took[len(took)/2].Seconds(), "median-s")
			b.ReportMetric(took[len(took)*9/10].Seconds(), "p90-s")
			b.ReportMetric(0, "ns/op")
			if os.Getenv("PROBE_BENCH_VERBOSE") != "" {
				b.Logf("%s detection times: %v", c.name, took)
			}
		})
	}
}
