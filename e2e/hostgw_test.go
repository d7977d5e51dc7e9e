package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/flanneld-go/flanneld/e2e/lab"
)

// TestHostGW runs three daemons with --ip-masq and checks everything a
// node publishes and programs: subnet.env, the leases in etcd, the routes,
// the iptables rules, and traffic between every pair of overlay addresses.
func TestHostGW(t *testing.T) {
	t.Parallel()
	l := newLab(t, 3, hostGWConfig)
	ctx := testCtx(t, 2*time.Minute)
	hosts := l.Hosts()
	envs := startAll(t, l, "--ip-masq")

	leases, err := readLeases(ctx, l)
	if err != nil {
		t.Fatal(err)
	}
	if len(leases) != len(hosts) {
		t.Errorf("etcd holds %d leases, want one per host (%d): %v", len(leases), len(hosts), leases)
	}
	seen := map[netip.Prefix]string{}
	for i, h := range hosts {
		env := envs[i]
		raw, err := os.ReadFile(h.SubnetFile)
		if err != nil {
			t.Fatal(err)
		}
		if len(env.Vars) != 4 {
			t.Errorf("%s subnet.env has %d variables, want the 4 FLANNEL_ ones:\n%s", h.Name, len(env.Vars), raw)
		}
		if env.Network != network {
			t.Errorf("%s FLANNEL_NETWORK = %s, want %s", h.Name, env.Network, network)
		}
		sub := env.Subnet.Masked()
		if env.Subnet.Bits() != 24 || env.Subnet.Addr() != sub.Addr().Next() {
			t.Errorf("%s FLANNEL_SUBNET = %s, want the first host address of a /24 (x.x.x.1/24)", h.Name, env.Subnet)
		}
		if !network.Contains(sub.Addr()) || sub.Addr() == network.Addr() {
			t.Errorf("%s FLANNEL_SUBNET %s is not a subnet of %s after the first", h.Name, env.Subnet, network)
		}
		if other, dup := seen[sub]; dup {
			t.Errorf("%s and %s both have subnet %s", other, h.Name, sub)
		}
		seen[sub] = h.Name
		mtu, err := linkMTU(h, lab.ExternalIface)
		if err != nil {
			t.Fatal(err)
		}
		if env.MTU != mtu {
			t.Errorf("%s FLANNEL_MTU = %d, want eth0's MTU %d", h.Name, env.MTU, mtu)
		}
		if !env.IPMasq {
			t.Errorf("%s FLANNEL_IPMASQ = false, want true (started with --ip-masq)", h.Name)
		}
		mine := leasesOf(leases, h)
		if len(mine) != 1 {
			t.Errorf("%s (%s) holds %d leases in etcd, want 1: %v", h.Name, h.Addr, len(mine), mine)
			continue
		}
		if mine[0].Subnet != sub {
			t.Errorf("%s lease in etcd is %s, subnet.env says %s", h.Name, mine[0].Subnet, env.Subnet)
		}
		if mine[0].BackendType != "host-gw" {
			t.Errorf("%s lease BackendType = %q, want host-gw", h.Name, mine[0].BackendType)
		}
		if mine[0].TTL <= 0 {
			t.Errorf("%s lease has TTL %d, want a lease that expires", h.Name, mine[0].TTL)
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	waitRoutes(t, hosts, envs)
	// subnet.env is written just before the rules are installed: wait.
	for i, h := range hosts {
		eventually(t, "rules on "+h.Name, func() error { return checkRules(ctx, h, network, envs[i].Subnet, true) })
	}

	for i, h := range hosts {
		if err := h.SetBridgeAddr(envs[i].Subnet); err != nil {
			t.Fatal(err)
		}
	}
	pingAll(t, hosts, envs)
}

// pingAll pings every other host's overlay address from every host's
// overlay address.
func pingAll(t *testing.T, hosts []*lab.Host, envs []lab.SubnetEnv) {
	t.Helper()
	ctx := testCtx(t, converge)
	pairs := 0
	for i, from := range hosts {
		for j := range hosts {
			if i == j {
				continue
			}
			if err := from.WaitPing(ctx, envs[i].Subnet.Addr(), envs[j].Subnet.Addr()); err != nil {
				t.Errorf("overlay ping %s -> %s: %v", from.Name, hosts[j].Name, err)
				continue
			}
			pairs++
		}
	}
	t.Logf("overlay pings: %d/%d pairs", pairs, len(hosts)*(len(hosts)-1))
}

// TestRouteRestored deletes a route by hand, then points one at a wrong
// gateway: the next route resync puts the right one back.
func TestRouteRestored(t *testing.T) {
	t.Parallel()
	l := newLab(t, 2, hostGWConfig)
	hosts := l.Hosts()
	envs := startAll(t, l, "--route-resync", "1")
	waitRoutes(t, hosts, envs)
	h1 := l.Host(1)
	want := wantRoutes(hosts, envs, 0)
	dst := envs[1].Subnet.Masked()

	err := withNetlink(h1, func(nh *netlink.Handle) error {
		// By destination only: a route through a nexthop object (the
		// default) matches no delete that names a gateway or device.
		return nh.RouteDel(&netlink.Route{Dst: ipNet(dst)})
	})
	if err != nil {
		t.Fatalf("deleting the route to %s on host1: %v", dst, err)
	}
	eventually(t, "route to "+dst.String()+" restored on host1", func() error { return routesAre(h1, want) })

	wrongGw := netip.MustParseAddr("10.250.0.99")
	if _, err := h1.Exec(testCtx(t, converge), "ip", "route", "replace", dst.String(), "via", wrongGw.String(), "dev", lab.ExternalIface); err != nil {
		t.Fatal(err)
	}
	eventually(t, "route to "+dst.String()+" corrected on host1", func() error { return routesAre(h1, want) })
	if d := h1.Daemon(); d.Exited() {
		t.Fatalf("flanneld on host1 exited")
	}
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), 32)}
}

// TestIPTablesRestored deletes rules and a jump by hand: the next iptables
// resync puts the whole set back in order.
func TestIPTablesRestored(t *testing.T) {
	t.Parallel()
	l := newLab(t, 1, hostGWConfig)
	ctx := testCtx(t, 2*time.Minute)
	h := l.Host(1)
	env := startAll(t, l, "--ip-masq", "--iptables-resync", "1")[0]
	eventually(t, "rules in place", func() error { return checkRules(ctx, h, network, env.Subnet, true) })

	for _, edit := range [][]string{
		{"-t", "nat", "-D", "FLANNEL-POSTRTG", "2"},                 // a rule in the middle
		{"-t", "filter", "-D", "FLANNEL-FWD", "1"},                  // the first forward rule
		{"-t", "filter", "-D", "FORWARD", "1"},                      // the jump
		{"-t", "nat", "-F", "FLANNEL-POSTRTG"},                      // the whole chain's rules
		{"-t", "nat", "-I", "FLANNEL-POSTRTG", "1", "-j", "ACCEPT"}, // a stranger in our chain
	} {
		what := "iptables " + strings.Join(edit, " ")
		if _, err := h.Exec(ctx, append([]string{"iptables", "-w", "5"}, edit...)...); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		eventually(t, "rules restored after "+what, func() error { return checkRules(ctx, h, network, env.Subnet, true) })
	}
}

// TestRestart stops a daemon with SIGTERM: it exits 0, leaves its routes
// and rules in place, traffic keeps flowing, and when started again it
// keeps its subnet.
func TestRestart(t *testing.T) {
	t.Parallel()
	l := newLab(t, 3, hostGWConfig)
	ctx := testCtx(t, 2*time.Minute)
	hosts := l.Hosts()
	envs := startAll(t, l)
	waitRoutes(t, hosts, envs)
	for i, h := range hosts {
		if err := h.SetBridgeAddr(envs[i].Subnet); err != nil {
			t.Fatal(err)
		}
	}
	h1 := l.Host(1)
	eventually(t, "rules on host1", func() error { return checkRules(ctx, h1, network, envs[0].Subnet, false) })

	if code := stop(t, h1.Daemon()); code != 0 {
		t.Fatalf("flanneld on host1 exited with %d after SIGTERM, want 0; log:\n%s", code, h1.Daemon().Log())
	}
	if err := routesAre(h1, wantRoutes(hosts, envs, 0)); err != nil {
		t.Errorf("right after flanneld exited: %v", err)
	}
	if err := checkRules(ctx, h1, network, envs[0].Subnet, false); err != nil {
		t.Errorf("right after flanneld exited: %v", err)
	}
	// Traffic between the others, and to and from the stopped node.
	for _, p := range [][2]int{{1, 2}, {2, 1}, {1, 0}, {0, 2}} {
		from, to := hosts[p[0]], hosts[p[1]]
		if err := from.WaitPing(testCtx(t, converge), envs[p[0]].Subnet.Addr(), envs[p[1]].Subnet.Addr()); err != nil {
			t.Errorf("with host1's flanneld stopped, overlay ping %s -> %s: %v", from.Name, to.Name, err)
		}
	}

	startDaemon(t, h1)
	env := waitEnv(t, h1)
	if env.Subnet != envs[0].Subnet {
		t.Errorf("after restart host1 has subnet %s, want %s as before", env.Subnet, envs[0].Subnet)
	}
	leases, err := readLeases(ctx, l)
	if err != nil {
		t.Fatal(err)
	}
	if mine := leasesOf(leases, h1); len(mine) != 1 || mine[0].Subnet != envs[0].Subnet.Masked() {
		t.Errorf("after restart host1's leases in etcd are %v, want just %s", mine, envs[0].Subnet.Masked())
	}
	if len(leases) != len(hosts) {
		t.Errorf("etcd holds %d leases after the restart, want %d: %v", len(leases), len(hosts), leases)
	}
	waitRoutes(t, hosts, envs)
	pingAll(t, hosts, envs)
}

// TestLeaseDeleted deletes leases from etcd: a stopped node's route goes
// away on the others; a running node takes its own lease back, with the
// same subnet, and the others route to it again. The stopped node, started
// again, gets its subnet back from its subnet.env.
func TestLeaseDeleted(t *testing.T) {
	t.Parallel()
	l := newLab(t, 3, hostGWConfig)
	ctx := testCtx(t, 2*time.Minute)
	hosts := l.Hosts()
	envs := startAll(t, l)
	waitRoutes(t, hosts, envs)
	h1, h3 := l.Host(1), l.Host(3)
	for i, h := range hosts {
		if err := h.SetBridgeAddr(envs[i].Subnet); err != nil {
			t.Fatal(err)
		}
	}

	if code := stop(t, h3.Daemon()); code != 0 {
		t.Fatalf("flanneld on host3 exited with %d after SIGTERM, want 0", code)
	}
	if _, err := l.KeysAPI().Delete(ctx, leaseKey(l, envs[2].Subnet), nil); err != nil {
		t.Fatalf("deleting host3's lease: %v", err)
	}
	two, twoEnvs := hosts[:2], envs[:2]
	waitRoutes(t, two, twoEnvs)

	if _, err := l.KeysAPI().Delete(ctx, leaseKey(l, envs[0].Subnet), nil); err != nil {
		t.Fatalf("deleting host1's lease: %v", err)
	}
	eventually(t, "host1 re-acquires its lease", func() error {
		leases, err := readLeases(ctx, l)
		if err != nil {
			return err
		}
		mine := leasesOf(leases, h1)
		if len(mine) != 1 || mine[0].Subnet != envs[0].Subnet.Masked() || mine[0].TTL <= 0 {
			return fmt.Errorf("host1's leases are %v, want %s with a TTL", mine, envs[0].Subnet.Masked())
		}
		return nil
	})
	waitRoutes(t, two, twoEnvs)
	if env, err := h1.ReadSubnetEnv(); err != nil || env.Subnet != envs[0].Subnet {
		t.Errorf("host1 subnet.env after re-acquiring: %v, %v; want subnet %s", env.Subnet, err, envs[0].Subnet)
	}
	if h1.Daemon().Exited() {
		t.Fatalf("flanneld on host1 exited")
	}
	for _, p := range [][2]int{{1, 0}, {0, 1}} {
		if err := hosts[p[0]].WaitPing(testCtx(t, converge), envs[p[0]].Subnet.Addr(), envs[p[1]].Subnet.Addr()); err != nil {
			t.Errorf("after host1 re-acquired its lease: %v", err)
		}
	}

	// host3's subnet is free and its subnet.env names it.
	startDaemon(t, h3)
	env := waitEnv(t, h3)
	if env.Subnet != envs[2].Subnet {
		t.Errorf("host3 restarted with subnet %s, want %s from its subnet.env", env.Subnet, envs[2].Subnet)
	}
	envs[2] = env
	waitRoutes(t, hosts, envs)
}

// TestBadInput starts the daemon with mistakes: each makes it exit non-zero
// with one line that names the problem, and takes no lease.
func TestBadInput(t *testing.T) {
	t.Parallel()
	l := newLab(t, 1, "")
	ctx := testCtx(t, 2*time.Minute)
	h := l.Host(1)
	for _, tc := range []struct {
		name   string
		config string
		args   []string
		want   []string // all in the daemon's last line
	}{
		{
			name:   "SubnetLen31",
			config: `{"Network":"10.5.0.0/16","SubnetLen":31,"Backend":{"Type":"host-gw"}}`,
			args:   []string{"--iface", lab.ExternalIface},
			want:   []string{"SubnetLen", "31", l.EtcdPrefix() + "/config"},
		},
		{
			name:   "UnknownBackend",
			config: `{"Network":"10.5.0.0/16","Backend":{"Type":"nosuch"}}`,
			args:   []string{"--iface", lab.ExternalIface},
			want:   []string{`"nosuch"`, "host-gw"},
		},
		{
			name:   "NoSuchIface",
			config: hostGWConfig,
			args:   []string{"--iface", "nosuch"},
			want:   []string{"--iface nosuch", "no such interface"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := l.SetConfig(ctx, tc.config); err != nil {
				t.Fatal(err)
			}
			code, log := runDaemon(t, l, h, tc.args...)
			checkFailedStart(ctx, t, l, h, code, log, tc.want)
		})
	}
}

// runDaemon runs flanneld on h in the foreground with the lab's etcd and
// subnet file and args, and returns its exit code and output. Unlike
// Host.StartDaemon it passes no --iface, so that args can name a missing
// one (--iface is repeatable and tried in order: the lab's eth0 would win);
// the lab has no helper for that.
func runDaemon(t *testing.T, l *lab.Lab, h *lab.Host, args ...string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), exitWait)
	defer cancel()
	argv := append([]string{"ip", "netns", "exec", h.NS, lab.BuildDaemon(t),
		"--etcd-endpoints", l.EtcdEndpoint(), "--etcd-prefix", l.EtcdPrefix(),
		"--subnet-file", h.SubnetFile}, args...)
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")} // no FLANNELD_* from the caller
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("flanneld on %s still running after %v; output:\n%s", h.Name, exitWait, out)
	}
	var exitErr *exec.ExitError
	if err != nil && !errors.As(err, &exitErr) {
		t.Fatalf("running flanneld on %s: %v", h.Name, err)
	}
	return cmd.ProcessState.ExitCode(), string(out)
}

// TestHealthz checks /healthz and /readyz: /readyz says 503 while the
// daemon waits for the network config and 200 once subnet.env is written.
func TestHealthz(t *testing.T) {
	t.Parallel()
	l := newLab(t, 1, "") // no config yet
	ctx := testCtx(t, 2*time.Minute)
	h := l.Host(1)
	const port = 18471
	d := startDaemon(t, h, "--healthz-port", fmt.Sprint(port))
	base := fmt.Sprintf("http://%s", netip.AddrPortFrom(h.Addr, port))

	eventually(t, "/healthz answers 200", func() error {
		if d.Exited() {
			return fmt.Errorf("flanneld exited:\n%s", d.Log())
		}
		return wantStatus(ctx, h, base+"/healthz", 200)
	})
	if err := wantStatus(ctx, h, base+"/readyz", 503); err != nil {
		t.Errorf("before the network config exists: %v", err)
	}
	if _, err := os.Stat(h.SubnetFile); !os.IsNotExist(err) {
		t.Errorf("subnet.env exists before the network config (stat: %v)", err)
	}

	if err := l.SetConfig(ctx, hostGWConfig); err != nil {
		t.Fatal(err)
	}
	eventually(t, "/readyz answers 200", func() error { return wantStatus(ctx, h, base+"/readyz", 200) })
	if _, err := h.ReadSubnetEnv(); err != nil {
		t.Errorf("ready, but subnet.env: %v", err)
	}
	if err := wantStatus(ctx, h, base+"/healthz", 200); err != nil {
		t.Error(err)
	}
	if err := checkRules(ctx, h, network, mustEnv(t, h).Subnet, false); err != nil {
		t.Errorf("ready, but: %v", err)
	}
}

func mustEnv(t *testing.T, h *lab.Host) lab.SubnetEnv {
	t.Helper()
	env, err := h.ReadSubnetEnv()
	if err != nil {
		t.Fatal(err)
	}
	return env
}
