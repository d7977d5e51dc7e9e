package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/flanneld-go/flanneld/e2e/lab"
	"github.com/flanneld-go/flanneld/internal/etcdtest"
	"github.com/flanneld-go/flanneld/probe"
)

// probeHealthz is the healthz listener of the probe tests (loopback of
// each host's namespace).
const probeHealthz = "http://127.0.0.1:8471"

var probeArgs = []string{"--healthz-port", "8471", "--healthz-ip", "127.0.0.1", "--route-resync", "1"}

// peersOf reads h's /peers.
func peersOf(ctx context.Context, h *lab.Host) (probe.Report, error) {
	var rep probe.Report
	code, body, err := httpGet(ctx, h, probeHealthz+"/peers")
	if err != nil {
		return rep, err
	}
	if code != 200 {
		return rep, fmt.Errorf("GET /peers on %s: %d %s", h.Name, code, body)
	}
	err = json.Unmarshal([]byte(body), &rep)
	return rep, err
}

// stateOf is the state h's /peers gives the peer with subnet p.
func stateOf(ctx context.Context, h *lab.Host, p netip.Prefix) (string, error) {
	rep, err := peersOf(ctx, h)
	if err != nil {
		return "", err
	}
	for _, ps := range rep.Peers {
		if ps.Subnet == p {
			return ps.State.String(), nil
		}
	}
	return "", fmt.Errorf("%s: /peers has no %s: %+v", h.Name, p, rep.Peers)
}

// waitState waits until h reports peer p in state, and returns how long it
// took (a figure for benchmarks; tests only bound it by a deadline).
func waitState(tb testing.TB, h *lab.Host, p netip.Prefix, state string, within time.Duration) time.Duration {
	tb.Helper()
	start := time.Now()
	ctx := testCtx(tb, within+10*time.Second)
	waitFor(tb, fmt.Sprintf("%s reports %s %s", h.Name, p, state), within, func() error {
		s, err := stateOf(ctx, h, p)
		if err != nil {
			return err
		}
		if s != state {
			return fmt.Errorf("state %s", s)
		}
		return nil
	})
	return time.Since(start)
}

// netfilter runs iptables with args inside h.
func netfilter(tb testing.TB, h *lab.Host, args ...string) {
	tb.Helper()
	if _, err := h.Exec(context.Background(), append([]string{"iptables", "-w", "5"}, args...)...); err != nil {
		tb.Fatal(err)
	}
}

func subnetOf(env lab.SubnetEnv) netip.Prefix { return env.Subnet.Masked() }

// TestPeerProbes: three vxlan hosts probe each other. Dropping UDP 8472
// from host1 at host2 makes that pair unreachable in both directions (host3
// sees both reachable), logged with the port to check and shown in /peers
// and /metrics while /readyz stays 200; without the rule both are reachable
// again. Dropping underlay packets above 1,200 bytes at host2 makes it an
// MTU black hole to host1 while small probes pass.
func TestPeerProbes(t *testing.T) {
	l := newLab(t, 3, vxlanConfig)
	envs := startAll(t, l, probeArgs...)
	h1, h2, h3 := l.Host(1), l.Host(2), l.Host(3)
	s1, s2, s3 := subnetOf(envs[0]), subnetOf(envs[1]), subnetOf(envs[2])
	for i, h := range l.Hosts() {
		for j, env := range envs {
			if i != j {
				waitState(t, h, subnetOf(env), "reachable", converge)
			}
		}
	}
	ctx := testCtx(t, 5*time.Minute)
	// A healthy vxlan host passes every host check (its own device holds
	// UDP 8472, its routes are flanneld's).
	eventually(t, "host1 /status with every check passing", func() error {
		st, err := statusOf(ctx, h1)
		if err != nil {
			return err
		}
		if len(st) != 5 {
			return fmt.Errorf("%d checks, want 5: %+v", len(st), st)
		}
		for name, c := range st {
			if !c.OK {
				return fmt.Errorf("%s fails: %+v", name, c)
			}
		}
		return nil
	})

	// Log lines are counted from here: a peer can look unreachable for a
	// moment at start, before its entries are programmed.
	mark := len(h1.Daemon().Log())
	rule := []string{"INPUT", "-p", "udp", "--dport", "8472", "-s", h1.Addr.String(), "-j", "DROP"}
	netfilter(t, h2, append([]string{"-A"}, rule...)...)
	within := probe.MinRound + 10*time.Second
	took := waitState(t, h1, s2, "unreachable", within)
	took2 := waitState(t, h2, s1, "unreachable", within)
	t.Logf("blocked port seen by host1 after %v, by host2 after %v", took, took2)
	for _, p := range []netip.Prefix{s1, s2} {
		if s, err := stateOf(ctx, h3, p); err != nil || s != "reachable" {
			t.Errorf("host3 sees %s %s (%v), want reachable", p, s, err)
		}
	}
	want := fmt.Sprintf("peer %s (%s) unreachable over vxlan for ", s2, h2.Addr)
	if log := logSince(h1, mark); strings.Count(log, want) != 1 || !strings.Contains(log, " s: check that UDP 8472 passes between the hosts") {
		t.Errorf("host1's log has %d lines %q..., want one naming UDP 8472", strings.Count(log, want), want)
	}
	if _, body, err := httpGet(ctx, h1, probeHealthz+"/metrics"); err != nil ||
		!strings.Contains(body, fmt.Sprintf(`flannel_peer_not_reachable{subnet="%s",public_ip="%s",backend="vxlan",state="unreachable"} 1`, s2, h2.Addr)) ||
		!strings.Contains(body, `flannel_peers{state="unreachable"} 1`) || !strings.Contains(body, "flannel_peer_probe_rtt_seconds_count") ||
		strings.Contains(body, fmt.Sprintf(`subnet="%s"`, s3)) {
		t.Errorf("host1 /metrics (%v) lacks the unreachable peer's series or has one for a reachable peer:\n%s", err, grepLines(body, "peer"))
	}
	if err := wantStatus(ctx, h1, probeHealthz+"/readyz", 200); err != nil {
		t.Errorf("/readyz with an unreachable peer: %v", err)
	}

	netfilter(t, h2, append([]string{"-D"}, rule...)...)
	waitState(t, h1, s2, "reachable", within)
	waitState(t, h2, s1, "reachable", within)
	if log := h1.Daemon().Log(); !strings.Contains(log, fmt.Sprintf("peer %s (%s) reachable again over vxlan", s2, h2.Addr)) {
		t.Error("host1's log does not say the peer is reachable again")
	}

	mark = len(h1.Daemon().Log())
	mtuRule := []string{"INPUT", "-p", "udp", "--dport", "8472", "-m", "length", "--length", "1201:65535", "-j", "DROP"}
	netfilter(t, h2, append([]string{"-A"}, mtuRule...)...)
	within = 3*probe.MinRound + 15*time.Second
	took = waitState(t, h1, s2, "mtu-blackhole", within)
	t.Logf("MTU black hole seen by host1 after %v", took)
	if _, err := h1.Exec(ctx, "ping", "-n", "-c", "1", "-W", "2", "-I", s1.Addr().String(), s2.Addr().String()); err != nil {
		t.Errorf("a small ping through the black hole: %v", err)
	}
	want = fmt.Sprintf("peer %s (%s) has an MTU black hole over vxlan: 84-byte probes pass, %d-byte probes with DF set are lost", s2, h2.Addr, envs[0].MTU)
	if log := logSince(h1, mark); strings.Count(log, want) != 1 {
		t.Errorf("host1's log has %d lines %q, want one", strings.Count(log, want), want)
	}
	netfilter(t, h2, append([]string{"-D"}, mtuRule...)...)
	waitState(t, h1, s2, "reachable", within)
}

// logSince is h's daemon log from byte mark on.
func logSince(h *lab.Host, mark int) string {
	log := h.Daemon().Log()
	if mark > len(log) {
		return log
	}
	return log[mark:]
}

func grepLines(s, substr string) string {
	var out []string
	for _, line := range strings.Split(s, "\n") {
		if strings.Contains(line, substr) {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}

// TestPeerProbesForeignPeer: a peer that runs no flanneld of ours — a
// namespace set up by hand as flannel's vxlan backend sets a node up
// (flannel.1 with the subnet's first address, the VTEP of host1 in its
// fdb and neighbour table) with a lease written to the store — answers
// the probes and is reachable.
func TestPeerProbesForeignPeer(t *testing.T) {
	l := newLab(t, 2, vxlanConfig)
	h1, h2 := l.Host(1), l.Host(2)
	startDaemon(t, h1, probeArgs...)
	env1 := waitEnv(t, h1)
	ctx := testCtx(t, 2*time.Minute)
	leases, err := readLeases(ctx, l)
	if err != nil {
		t.Fatal(err)
	}
	s1 := subnetOf(env1)
	mac1 := leases[s1].VtepMAC
	s2 := netip.MustParsePrefix("10.5.200.0/24")
	const mac2 = "82:4b:b6:2f:54:4e"
	for _, cmd := range []string{
		fmt.Sprintf("ip link add flannel.1 address %s type vxlan id 1 local %s dev eth0 dstport 8472 nolearning", mac2, h2.Addr),
		"ip link set flannel.1 up",
		fmt.Sprintf("ip addr add %s/32 dev flannel.1", s2.Addr()),
		fmt.Sprintf("ip neigh replace %s lladdr %s dev flannel.1 nud permanent", s1.Addr(), mac1),
		fmt.Sprintf("bridge fdb replace %s dev flannel.1 dst %s self permanent", mac1, h1.Addr),
		fmt.Sprintf("ip route replace %s via %s dev flannel.1 onlink", s1, s1.Addr()),
	} {
		if _, err := h2.Exec(ctx, strings.Fields(cmd)...); err != nil {
			t.Fatal(err)
		}
	}
	value := fmt.Sprintf(`{"PublicIP":"%s","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"%s"}}`, h2.Addr, mac2)
	if _, err := l.KeysAPI().Set(ctx, leaseKey(l, s2), value, nil); err != nil {
		t.Fatal(err)
	}
	waitState(t, h1, s2, "reachable", converge)
}

// holdUDP binds UDP port on addr inside h's namespace from this process
// (not flanneld) until the test ends.
func holdUDP(t *testing.T, h *lab.Host, addr string, port int) net.PacketConn {
	t.Helper()
	var c net.PacketConn
	err := etcdtest.InNetNS(nsPath(h), func() (err error) {
		c, err = net.ListenPacket("udp4", net.JoinHostPort(addr, fmt.Sprint(port)))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// runCheck runs flanneld --check on h with the lab's flags and returns its
// exit code and output.
func runCheck(t *testing.T, l *lab.Lab, h *lab.Host) (int, string) {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", h.NS, lab.BuildDaemon(t), "--check", "--etcd-endpoints", l.EtcdEndpoint(),
		"--iface", lab.ExternalIface, "--subnet-file", h.SubnetFile, "--etcd-prefix", l.EtcdPrefix())
	out, err := cmd.CombinedOutput()
	code := 0
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			t.Fatal(err)
		}
		code = ee.ExitCode()
	}
	return code, string(out)
}

// statusOf reads h's /status.
func statusOf(ctx context.Context, h *lab.Host) (map[string]probe.Check, error) {
	code, body, err := httpGet(ctx, h, probeHealthz+"/status")
	if err != nil {
		return nil, err
	}
	if code != 200 {
		return nil, fmt.Errorf("GET /status: %d %s", code, body)
	}
	var st struct{ HostChecks []probe.Check }
	if err := json.Unmarshal([]byte(body), &st); err != nil {
		return nil, err
	}
	out := map[string]probe.Check{}
	for _, c := range st.HostChecks {
		if prev, ok := out[c.Name]; !ok || prev.OK {
			out[c.Name] = c
		}
	}
	return out, nil
}

// TestCheckMode: flanneld --check on a healthy host passes (exit 0, every
// peer reachable) without taking a lease or changing anything; with
// ip_forward off, a route overlapping the network and the udp port held by
// another process it fails (exit 1), naming each; the running daemon
// reports the same in /status and logs each once.
func TestCheckMode(t *testing.T) {
	l := newLab(t, 3, `{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}`)
	h1, h3 := l.Host(1), l.Host(3)
	startDaemon(t, l.Host(1), probeArgs...)
	startDaemon(t, l.Host(2), probeArgs...)
	envs := []lab.SubnetEnv{waitEnv(t, l.Host(1)), waitEnv(t, l.Host(2))}
	waitState(t, h1, subnetOf(envs[1]), "reachable", converge)
	ctx := testCtx(t, 3*time.Minute)
	before, err := readLeases(ctx, l)
	if err != nil {
		t.Fatal(err)
	}

	code, out := runCheck(t, l, h1)
	t.Logf("flanneld --check on a healthy host:\n%s", out)
	if code != 0 || !strings.Contains(out, "Result: all checks pass") ||
		!strings.Contains(out, fmt.Sprintf("reachable      %-18s %-15s rtt", subnetOf(envs[1]), l.Host(2).Addr)) {
		t.Errorf("--check on a healthy host: exit %d", code)
	}
	// host3 runs no daemon: its checks run, its peers are not probed.
	if _, err := h3.Exec(ctx, "sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward && ip route add 10.5.255.0/25 dev docker0"); err != nil {
		t.Fatal(err)
	}
	holdUDP(t, h3, "0.0.0.0", probe.UDPPort)
	code, out = runCheck(t, l, h3)
	t.Logf("flanneld --check on a broken host:\n%s", out)
	for _, want := range []string{"FAIL  forwarding", "sysctl -w net.ipv4.ip_forward=1", "FAIL  overlap", "route 10.5.255.0/25 dev docker0",
		"FAIL  port", "UDP 8285, the udp backend's port, is held by e2e.test", "not probed: this host has no lease", "Result: 3 problems"} {
		if !strings.Contains(out, want) {
			t.Errorf("--check on a broken host does not say %q", want)
		}
	}
	if code != 1 {
		t.Errorf("--check on a broken host: exit %d, want 1", code)
	}
	after, err := readLeases(ctx, l)
	if err != nil || len(after) != len(before) {
		t.Errorf("leases after --check: %v (%v), before %v", after, err, before)
	}
	if _, err := h3.Exec(ctx, "test", "!", "-e", h3.SubnetFile); err != nil {
		t.Errorf("--check wrote a subnet file: %v", err)
	}

	// At runtime on host1: the same three, in /status and once each in
	// the log.
	if _, err := h1.Exec(ctx, "sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward && ip route add 10.5.255.0/25 dev docker0"); err != nil {
		t.Fatal(err)
	}
	held := holdUDP(t, h1, "127.0.0.1", probe.UDPPort)
	eventually(t, "host1 /status shows the three failing", func() error {
		st, err := statusOf(ctx, h1)
		if err != nil {
			return err
		}
		for _, name := range []string{"forwarding", "overlap", "port"} {
			if st[name].OK {
				return fmt.Errorf("%s passes: %+v", name, st[name])
			}
		}
		return nil
	})
	time.Sleep(3 * time.Second) // a few more resyncs: still one line each
	log := h1.Daemon().Log()
	if n := strings.Count(log, `"Host check failed: `); n != 3 {
		t.Errorf("host1's log has %d failed checks, want 3 (one each)", n)
	}
	for _, name := range []string{"forwarding", "overlap", "port"} {
		if n := strings.Count(log, `check="`+name+`"`); n != 1 {
			t.Errorf("host1's log has %d lines for %s, want one", n, name)
		}
	}
	if err := wantStatus(ctx, h1, probeHealthz+"/readyz", 200); err != nil {
		t.Errorf("/readyz with failing host checks: %v", err)
	}

	// Fixed: each passes again, logged once.
	if _, err := h1.Exec(ctx, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward && ip route del 10.5.255.0/25 dev docker0"); err != nil {
		t.Fatal(err)
	}
	held.Close()
	eventually(t, "host1 /status shows every check passing", func() error {
		st, err := statusOf(ctx, h1)
		if err != nil {
			return err
		}
		for name, c := range st {
			if !c.OK {
				return fmt.Errorf("%s fails: %+v", name, c)
			}
		}
		return nil
	})
	time.Sleep(3 * time.Second)
	if n := strings.Count(h1.Daemon().Log(), `"Host check passes again: `); n != 3 {
		t.Errorf("host1's log says %d checks pass again, want 3", n)
	}
}

// TestPeerProbesDualStack: on a dual-stack vxlan network each host probes
// both subnets of the other (IPv6 from flannel-v6.1's address), and
// dropping the IPv6 underlay's UDP 8472 at host2 makes only the IPv6 one
// unreachable.
func TestPeerProbesDualStack(t *testing.T) {
	cfg := `{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00:5::/48","Backend":{"Type":"vxlan"}}`
	l := newLabWith(t, lab.Options{Hosts: 2, LAN6: netip.MustParsePrefix("fd5e::/64")}, cfg)
	envs := startAll(t, l, probeArgs...)
	h1, h2 := l.Host(1), l.Host(2)
	s2, s62 := subnetOf(envs[1]), envs[1].IPv6Subnet.Masked()
	waitState(t, h1, s2, "reachable", converge)
	waitState(t, h1, s62, "reachable", converge)
	waitState(t, h2, envs[0].IPv6Subnet.Masked(), "reachable", converge)
	if _, err := h2.Exec(context.Background(), "ip6tables", "-w", "5", "-A", "INPUT", "-p", "udp", "--dport", "8472", "-j", "DROP"); err != nil {
		t.Fatal(err)
	}
	waitState(t, h1, s62, "unreachable", probe.MinRound+10*time.Second)
	if s, err := stateOf(testCtx(t, time.Minute), h1, s2); err != nil || s != "reachable" {
		t.Errorf("IPv4 subnet %s: %s (%v), want reachable", s2, s, err)
	}
	want := fmt.Sprintf("peer %s (%s) unreachable over vxlan for ", s62, h2.Addr6)
	if !strings.Contains(h1.Daemon().Log(), want) {
		t.Errorf("host1's log lacks %q", want)
	}
}

// TestPeerProbesWireGuard: wireguard peers answer at their subnets' first
// addresses (on flannel-wg); UDP 51820 dropped at host2 makes it
// unreachable, naming that port.
func TestPeerProbesWireGuard(t *testing.T) {
	needWG(t)
	l := newLab(t, 2, wgConfig)
	envs := startAll(t, l, probeArgs...)
	h1, h2 := l.Host(1), l.Host(2)
	s2 := subnetOf(envs[1])
	waitState(t, h1, s2, "reachable", converge)
	netfilter(t, h2, "-A", "INPUT", "-p", "udp", "--dport", "51820", "-j", "DROP")
	waitState(t, h1, s2, "unreachable", probe.MinRound+10*time.Second)
	want := fmt.Sprintf("peer %s (%s) unreachable over wireguard for ", s2, h2.Addr)
	if log := h1.Daemon().Log(); !strings.Contains(log, want) || !strings.Contains(log, "check that UDP 51820 passes between the hosts") {
		t.Errorf("host1's log lacks %q ... UDP 51820", want)
	}
}
