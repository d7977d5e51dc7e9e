package lab

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestMain(m *testing.M) { Main(m) }

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// rootLinks lists the link names of the test process's own namespace.
func rootLinks(t *testing.T) map[string]bool {
	t.Helper()
	out, err := exec.Command("ip", "-o", "link", "show").CombinedOutput()
	if err != nil {
		t.Fatalf("ip link: %v: %s", err, out)
	}
	names := map[string]bool{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
		names[name] = true
	}
	return names
}

func netnsList(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns list: %v: %s", err, out)
	}
	return string(out)
}

// checkNoLabLinksInRoot fails if a link named like the lab's appeared in
// the test process's namespace since before.
func checkNoLabLinksInRoot(t *testing.T, before map[string]bool, hosts int) {
	t.Helper()
	ours := map[string]bool{lanBridge: true, BridgeName: true, ExternalIface: true}
	for i := 1; i <= hosts; i++ {
		ours[fmt.Sprintf("h%d", i)] = true
	}
	for name := range rootLinks(t) {
		if ours[name] && !before[name] {
			t.Errorf("link %s appeared in the root namespace", name)
		}
	}
}

func TestLabNetwork(t *testing.T) {
	before := map[string]bool{}
	if os.Geteuid() == 0 {
		before = rootLinks(t)
	}
	begin := time.Now()
	l := Start(t, Options{Hosts: 3})
	t.Logf("lab %s built in %v", l.Name(), time.Since(begin))
	ctx := ctxFor(t, 2*time.Minute)

	list := netnsList(t)
	for _, ns := range l.Namespaces() {
		if !strings.Contains(list, ns) {
			t.Fatalf("namespace %s not in ip netns list:\n%s", ns, list)
		}
		if !strings.HasPrefix(ns, fmt.Sprintf("%s-%d-", DefaultNamePrefix, os.Getpid())) {
			t.Errorf("namespace %s does not carry the prefix and pid", ns)
		}
	}
	checkNoLabLinksInRoot(t, before, 3)
	out, err := exec.Command("ip", "-o", "addr", "show").CombinedOutput()
	if err != nil {
		t.Fatalf("ip addr: %v", err)
	}
	for _, a := range []netip.Addr{l.EtcdAddr(), l.Host(1).Addr} {
		if strings.Contains(string(out), " "+a.String()+"/") {
			t.Errorf("address %s is in the root namespace:\n%s", a, out)
		}
	}

	// Underlay: every host reaches every other host's eth0.
	for _, from := range l.Hosts() {
		for _, to := range l.Hosts() {
			if from == to {
				continue
			}
			if err := from.WaitPing(ctx, from.Addr, to.Addr); err != nil {
				t.Errorf("underlay ping %s -> %s: %v", from.Name, to.Name, err)
			}
		}
		v, err := from.Exec(ctx, "cat", "/proc/sys/net/ipv4/ip_forward")
		if err != nil || strings.TrimSpace(v) != "1" {
			t.Errorf("%s ip_forward = %q, %v; want 1", from.Name, v, err)
		}
	}

	// etcd listens inside the LAN namespace only, and host namespaces
	// reach its v2 API.
	lanSS, err := exec.Command("ip", "netns", "exec", l.LANNamespace(), "ss", "-Hltn").CombinedOutput()
	if err != nil {
		t.Fatalf("ss in LAN namespace: %v: %s", err, lanSS)
	}
	etcdSock := fmt.Sprintf("%s:%d", l.EtcdAddr(), EtcdClientPort)
	if !strings.Contains(string(lanSS), etcdSock) {
		t.Errorf("no etcd listener %s in the LAN namespace:\n%s", etcdSock, lanSS)
	}
	rootSS, err := exec.Command("ss", "-Hltn").CombinedOutput()
	if err != nil {
		t.Fatalf("ss: %v: %s", err, rootSS)
	}
	if strings.Contains(string(rootSS), etcdSock) {
		t.Errorf("etcd listener %s is in the root namespace", etcdSock)
	}
	if err := l.SetConfig(ctx, `{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}`); err != nil {
		t.Fatal(err)
	}
	get := fmt.Sprintf(`exec 3<>/dev/tcp/%s/%d && printf 'GET /v2/keys%s/config HTTP/1.0\r\n\r\n' >&3 && cat <&3`,
		l.EtcdAddr(), EtcdClientPort, l.EtcdPrefix())
	for _, h := range l.Hosts() {
		body, err := h.Exec(ctx, "bash", "-c", get)
		if err != nil {
			t.Errorf("%s cannot reach etcd: %v", h.Name, err)
			continue
		}
		if !strings.Contains(body, `10.5.0.0/16`) || !strings.Contains(body, "200 OK") {
			t.Errorf("%s got from etcd:\n%s", h.Name, body)
		}
	}

	// Overlay addresses on docker0 with host-gw style routes.
	h1, h2 := l.Host(1), l.Host(2)
	o1, o2 := netip.MustParsePrefix("10.99.1.1/24"), netip.MustParsePrefix("10.99.2.1/24")
	for _, step := range []struct {
		h   *Host
		p   netip.Prefix
		dst string
		via netip.Addr
	}{{h1, o1, "10.99.2.0/24", h2.Addr}, {h2, o2, "10.99.1.0/24", h1.Addr}} {
		if err := step.h.SetBridgeAddr(step.p); err != nil {
			t.Fatal(err)
		}
		if err := step.h.SetBridgeAddr(step.p); err != nil { // replaces, no duplicate error
			t.Fatalf("setting the bridge address again: %v", err)
		}
		if _, err := step.h.Exec(ctx, "ip", "route", "add", step.dst, "via", step.via.String(), "dev", ExternalIface); err != nil {
			t.Fatal(err)
		}
	}
	if err := h1.WaitPing(ctx, o1.Addr(), o2.Addr()); err != nil {
		t.Errorf("overlay ping host1 -> host2: %v", err)
	}
	if err := l.Host(3).Ping(ctx, netip.Addr{}, o1.Addr()); err == nil {
		t.Errorf("host3 reached 10.99.1.1 without a route")
	}

	// Close leaves nothing behind and is idempotent.
	if err := l.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	list = netnsList(t)
	if strings.Contains(list, l.Name()+"-") {
		t.Errorf("namespaces left after Close:\n%s", list)
	}
	checkNoLabLinksInRoot(t, before, 3)
	if l.Etcd().Running() {
		t.Error("etcd still running after Close")
	}
	if _, err := l.Host(1).StartDaemon(); !errors.Is(err, ErrClosed) {
		t.Errorf("StartDaemon after Close: err = %v, want ErrClosed", err)
	}
}

// fakeDaemon is a stand-in for flanneld used to test the lab's process
// handling: it reports its pid, arguments, environment and eth0 address,
// writes a subnet.env derived from that address, and exits 0 on SIGTERM.
// "--fake-exit N" makes it exit with N at once.
const fakeDaemon = `#!/bin/bash
trap 'echo "got TERM"; exit 0' TERM # before subnet.env: the test signals once it exists
echo "pid=$$"
echo "args=$*"
echo "env=${FLANNELD_IFACE:-unset}"
sf= masq=false
while [ $# -gt 0 ]; do
  case "$1" in
    --subnet-file) sf=$2; shift ;;
    --ip-masq) masq=true ;;
    --fake-exit) echo "exiting $2"; exit "$2" ;;
  esac
  shift
done
read -r _ _ _ a _ < <(ip -4 -o addr show dev eth0)
echo "eth0=$a"
ip=${a%/*}
printf 'FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.%s.1/24\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ=%s\n' "${ip##*.}" "$masq" > "$sf.tmp"
mv "$sf.tmp" "$sf"
while :; do sleep 0.1; done
`

func writeFake(t *testing.T) string {
	p := filepath.Join(t.TempDir(), "fake-flanneld")
	if err := os.WriteFile(p, []byte(fakeDaemon), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDaemonLifecycle(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the namespaced lab needs root (it creates network namespaces)")
	}
	t.Setenv("FLANNELD_IFACE", "must-not-reach-the-daemon")
	l := Start(t, Options{Hosts: 2, DaemonPath: writeFake(t)})
	ctx := ctxFor(t, time.Minute)
	h1 := l.Host(1)

	d, err := h1.StartDaemon("--ip-masq")
	if err != nil {
		t.Fatal(err)
	}
	env, err := h1.WaitSubnetEnv(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := SubnetEnv{
		Network: netip.MustParsePrefix("10.5.0.0/16"),
		Subnet:  netip.MustParsePrefix("10.5.11.1/24"),
		MTU:     1500,
		IPMasq:  true,
	}
	if env.Network != want.Network || env.Subnet != want.Subnet || env.MTU != want.MTU || env.IPMasq != want.IPMasq {
		t.Errorf("subnet.env = %+v, want %+v", env, want)
	}
	log := d.Log()
	wantArgs := fmt.Sprintf("args=--etcd-endpoints http://10.250.0.1:2379 --iface eth0 --subnet-file %s --etcd-prefix /coreos.com/network --ip-masq", h1.SubnetFile)
	for _, s := range []string{
		fmt.Sprintf("pid=%d\n", d.Pid()), // ip netns exec execs in place: signals reach the daemon
		wantArgs + "\n",
		"env=unset\n",
		"eth0=10.250.0.11/24\n", // runs inside host1's namespace
	} {
		if !strings.Contains(log, s) {
			t.Errorf("daemon log lacks %q:\n%s", s, log)
		}
	}
	if d.Exited() {
		t.Fatal("daemon exited early")
	}
	code, err := d.Stop(syscall.SIGTERM)
	if err != nil || code != 0 {
		t.Fatalf("Stop = %d, %v; want 0, nil", code, err)
	}
	if !strings.Contains(d.Log(), "got TERM") {
		t.Errorf("daemon did not see SIGTERM:\n%s", d.Log())
	}
	if code, err := d.Stop(syscall.SIGTERM); err != nil || code != 0 {
		t.Errorf("second Stop = %d, %v; want 0, nil", code, err)
	}

	// A daemon that dies before writing: the old subnet.env does not count.
	d2, err := h1.StartDaemon("--fake-exit", "3")
	if err != nil {
		t.Fatal(err)
	}
	if h1.Daemon() != d2 {
		t.Error("Daemon() is not the latest daemon")
	}
	if _, err := h1.WaitSubnetEnv(ctx); err == nil || !strings.Contains(err.Error(), "exiting 3") {
		t.Errorf("WaitSubnetEnv with a dead daemon: err = %v, want the exit and its log", err)
	}
	if code, err := d2.Wait(); err != nil || code != 3 {
		t.Errorf("Wait = %d, %v; want 3, nil", code, err)
	}
	if d2.LogPath == d.LogPath {
		t.Errorf("both starts share the log %s", d.LogPath)
	}

	// Close stops a running daemon.
	d3, err := l.Host(2).StartDaemon()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.Host(2).WaitSubnetEnv(ctx); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-d3.Done():
	default:
		t.Fatal("daemon still running after Close")
	}
	if err := syscall.Kill(d3.Pid(), 0); err != syscall.ESRCH {
		t.Errorf("daemon pid %d still exists after Close: %v", d3.Pid(), err)
	}
}

func TestTeardownRemovesLeftovers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the namespaced lab needs root (it creates network namespaces)")
	}
	prefix := fmt.Sprintf("flabtd%d", os.Getpid())
	// New, not Start: the lab makes its own directory, as the demo's does.
	l, err := New(Options{Hosts: 2, DaemonPath: writeFake(t), NamePrefix: prefix, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	if fi, err := os.Stat(l.Dir()); err != nil || !fi.IsDir() {
		t.Fatalf("lab directory %s: %v", l.Dir(), err)
	}
	ctx := ctxFor(t, time.Minute)
	d, err := l.Host(1).StartDaemon()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.Host(1).WaitSubnetEnv(ctx); err != nil {
		t.Fatal(err)
	}
	deleted, err := Teardown(prefix)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := strings.Join(deleted, " "), strings.Join(sortedCopy(l.Namespaces()), " "); got != want {
		t.Errorf("Teardown deleted %q, want %q", got, want)
	}
	select {
	case <-d.Done():
	case <-ctx.Done():
		t.Fatal("daemon survived Teardown")
	}
	if list := netnsList(t); strings.Contains(list, prefix+"-") {
		t.Errorf("namespaces left after Teardown:\n%s", list)
	}
	if _, err := os.Stat(l.Dir()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("lab directory %s left after Teardown: %v", l.Dir(), err)
	}
	if again, err := Teardown(prefix); err != nil || len(again) != 0 {
		t.Errorf("second Teardown = %v, %v; want nothing", again, err)
	}
	if err := l.Close(); err != nil {
		t.Errorf("Close after Teardown: %v", err)
	}
	if _, err := Teardown("a/b"); err == nil {
		t.Error("Teardown accepted a prefix with '/'")
	}
}

func sortedCopy(s []string) []string {
	c := append([]string(nil), s...)
	for i := range c {
		for j := i + 1; j < len(c); j++ {
			if c[j] < c[i] {
				c[i], c[j] = c[j], c[i]
			}
		}
	}
	return c
}

func TestParseSubnetEnv(t *testing.T) {
	good := "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.34.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
	env, err := ParseSubnetEnv([]byte(good))
	if err != nil {
		t.Fatal(err)
	}
	if env.Subnet.String() != "10.5.34.1/24" || env.Network.String() != "10.5.0.0/16" || env.MTU != 1450 || env.IPMasq {
		t.Errorf("parsed %+v", env)
	}
	for name, bad := range map[string]string{
		"missing masq": "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.34.1/24\nFLANNEL_MTU=1450\n",
		"bad mtu":      strings.Replace(good, "1450", "x", 1),
		"bad subnet":   strings.Replace(good, "10.5.34.1/24", "10.5.34.1", 1),
		"not kv":       good + "junk\n",
		"empty":        "",
	} {
		if _, err := ParseSubnetEnv([]byte(bad)); err == nil {
			t.Errorf("%s: parsed without error", name)
		}
	}
}

func TestNewRejectsBadOptions(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("New checks for root first")
	}
	for name, o := range map[string]Options{
		"too many hosts": {Hosts: 500},
		"ipv6 lan":       {LAN: netip.MustParsePrefix("fd00::/64")},
		"ipv4 lan6":      {LAN6: netip.MustParsePrefix("10.251.0.0/24")},
		"tiny lan6":      {LAN6: netip.MustParsePrefix("fd5e::/124")},
		"small lan":      {LAN: netip.MustParsePrefix("10.250.0.0/28")},
		"bad prefix":     {NamePrefix: "a/b"},
		"no daemon file": {DaemonPath: "/nonexistent/flanneld"},
	} {
		if l, err := New(o); err == nil {
			l.Close()
			t.Errorf("%s: New succeeded", name)
		}
	}
}

// TestEnsureInstallsMissing: with iptables-save and iptables-restore
// missing from PATH, the lab asks the installer for the iptables package
// (once) and goes on when the commands are there afterwards; when the
// installer fails, New's error is the installer's.
func TestEnsureInstallsMissing(t *testing.T) {
	dir := t.TempDir()
	for _, tool := range tools {
		if tool.pkg == "iptables" {
			continue
		}
		if err := os.WriteFile(filepath.Join(dir, tool.cmd), []byte("#!/bin/sh\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("PATH", dir)
	var asked [][]string
	install := func(pkgs []string) error {
		asked = append(asked, pkgs)
		for _, cmd := range []string{"iptables-save", "iptables-restore"} {
			if err := os.WriteFile(filepath.Join(dir, cmd), []byte("#!/bin/sh\n"), 0o755); err != nil {
				return err
			}
		}
		return nil
	}
	failing := func(pkgs []string) error { return fmt.Errorf("cannot install %v", pkgs) }
	if err := ensure(failing); err == nil || !strings.Contains(err.Error(), "cannot install [iptables]") {
		t.Fatalf("ensure with a failing installer: %v, want its error", err)
	}
	if err := ensure(install); err != nil {
		t.Fatalf("ensure: %v", err)
	}
	if fmt.Sprint(asked) != "[[iptables]]" {
		t.Fatalf("installer asked for %v, want [[iptables]]", asked)
	}
	if err := ensure(failing); err != nil {
		t.Fatalf("ensure with everything in place called the installer: %v", err)
	}
	if err := ensure(func([]string) error { return nil }); err != nil {
		t.Fatalf("ensure: %v", err)
	}
	if err := os.Remove(filepath.Join(dir, "iptables-save")); err != nil {
		t.Fatal(err)
	}
	if err := ensure(func([]string) error { return nil }); err == nil || !strings.Contains(err.Error(), "iptables, still missing") {
		t.Fatalf("ensure after an install that did not help: %v, want it to say iptables is still missing", err)
	}
}

// TestLabIPv6Underlay: with LAN6 every host has its IPv6 address on eth0
// (usable at once: no DAD), hosts reach each other and the LAN over IPv6,
// docker0 takes an address of each family, and nothing appears outside the
// lab's namespaces.
func TestLabIPv6Underlay(t *testing.T) {
	before := map[string]bool{}
	if os.Geteuid() == 0 {
		before = rootLinks(t)
	}
	l := Start(t, Options{Hosts: 2, LAN6: netip.MustParsePrefix("fd5e::/64")})
	ctx := ctxFor(t, time.Minute)
	if got := l.LAN6().String(); got != "fd5e::/64" {
		t.Errorf("LAN6() = %s", got)
	}
	for i, h := range l.Hosts() {
		if want := netip.MustParseAddr(fmt.Sprintf("fd5e::%x", 11+i)); h.Addr6 != want {
			t.Errorf("%s Addr6 = %s, want %s", h.Name, h.Addr6, want)
		}
		out, err := h.Exec(ctx, "ip", "-6", "-o", "addr", "show", "dev", ExternalIface, "scope", "global")
		if err != nil {
			t.Fatal(err)
		}
		if want := h.Addr6.String() + "/64"; !strings.Contains(out, want) || strings.Contains(out, "tentative") {
			t.Errorf("%s eth0 IPv6 addresses %q, want %s, not tentative", h.Name, out, want)
		}
		out, err = h.Exec(ctx, "cat", "/proc/sys/net/ipv6/conf/all/forwarding")
		if err != nil || strings.TrimSpace(out) != "1" {
			t.Errorf("%s IPv6 forwarding %q, %v; want 1", h.Name, out, err)
		}
	}
	h1, h2 := l.Host(1), l.Host(2)
	if err := h1.Ping(ctx, h1.Addr6, h2.Addr6); err != nil {
		t.Fatalf("ping -6 across the LAN: %v", err)
	}
	if err := h2.Ping(ctx, netip.Addr{}, l.LAN6().Addr().Next()); err != nil {
		t.Errorf("ping -6 the LAN bridge: %v", err)
	}
	if err := h1.Ping(ctx, netip.Addr{}, h2.Addr); err != nil {
		t.Errorf("IPv4 ping across a dual-stack LAN: %v", err)
	}

	// SetBridgeAddr replaces per family.
	for _, p := range []string{"10.5.1.1/24", "fc00:5:0:1::1/64", "fc00:5:0:9::1/64"} {
		if err := h1.SetBridgeAddr(netip.MustParsePrefix(p)); err != nil {
			t.Fatal(err)
		}
	}
	out, err := h1.Exec(ctx, "ip", "-o", "addr", "show", "dev", BridgeName, "scope", "global")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "10.5.1.1/24") || !strings.Contains(out, "fc00:5:0:9::1/64") || strings.Contains(out, "fc00:5:0:1::1") {
		t.Errorf("docker0 addresses:\n%s\nwant 10.5.1.1/24 and fc00:5:0:9::1/64 only", out)
	}

	// The caller's namespace has neither the links nor the addresses.
	checkNoLabLinksInRoot(t, before, 2)
	if out, err := exec.Command("ip", "-6", "-o", "addr", "show").CombinedOutput(); err != nil || strings.Contains(string(out), "fd5e::") {
		t.Errorf("fd5e:: appeared in the root namespace: %s %v", out, err)
	}
}
