// Package e2e runs the flanneld binary end to end in the namespaced lab
// (e2e/lab): an embedded etcd and several host namespaces on one bridged
// LAN. The tests need root; as another user they skip.
package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.etcd.io/etcd/client/v2"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/e2e/lab"
	"github.com/flanneld-go/flanneld/internal/etcdtest"
)

func TestMain(m *testing.M) { lab.Main(m) }

const (
	// hostGWConfig is the network config of most tests.
	hostGWConfig = `{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}`
	// converge bounds every wait for the daemons to converge. It is a
	// deadline for polling, not a timing assertion.
	converge = 30 * time.Second
	// exitWait bounds the wait for a daemon that should exit by itself.
	exitWait = 30 * time.Second
)

// network is the Network of hostGWConfig.
var network = netip.MustParsePrefix("10.5.0.0/16")

// needRoot skips the test when not root, before anything is built.
func needRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("skipping: the e2e tests need root (they create network namespaces and run flanneld in them)")
	}
}

// newLab builds the daemon (once per test binary) and a lab of n hosts that
// the test's cleanup tears down. If config is not empty it is written to
// etcd before any daemon starts.
func newLab(tb testing.TB, hosts int, config string) *lab.Lab {
	tb.Helper()
	return newLabWith(tb, lab.Options{Hosts: hosts}, config)
}

// newLabWith is newLab with the lab's options (DaemonPath is filled in).
func newLabWith(tb testing.TB, opts lab.Options, config string) *lab.Lab {
	tb.Helper()
	needRoot(tb)
	bin := lab.BuildDaemon(tb)
	var l *lab.Lab
	// Registered first, so it runs last: after the lab's Close nothing of
	// it may be left.
	tb.Cleanup(func() {
		if l == nil {
			return
		}
		for _, ns := range l.Namespaces() {
			if _, err := os.Stat(filepath.Join("/run/netns", ns)); !errors.Is(err, os.ErrNotExist) {
				tb.Errorf("namespace %s left behind after the test (stat: %v)", ns, err)
			}
		}
	})
	opts.DaemonPath = bin
	l = lab.Start(tb, opts)
	// Runs before the lab's own cleanup, which would only kill a stuck
	// daemon: here a daemon that does not exit 0 fails the test.
	tb.Cleanup(func() { stopAll(tb, l) })
	if config != "" {
		ctx, cancel := context.WithTimeout(context.Background(), converge)
		defer cancel()
		if err := l.SetConfig(ctx, config); err != nil {
			tb.Fatal(err)
		}
	}
	return l
}

// startDaemon starts flanneld on h or fails the test.
func startDaemon(tb testing.TB, h *lab.Host, args ...string) *lab.Daemon {
	tb.Helper()
	d, err := h.StartDaemon(args...)
	if err != nil {
		tb.Fatal(err)
	}
	return d
}

// startAll starts flanneld on every host with args and waits for each
// subnet.env; envs[i] belongs to l.Hosts()[i].
func startAll(tb testing.TB, l *lab.Lab, args ...string) []lab.SubnetEnv {
	tb.Helper()
	for _, h := range l.Hosts() {
		startDaemon(tb, h, args...)
	}
	envs := make([]lab.SubnetEnv, len(l.Hosts()))
	for i, h := range l.Hosts() {
		envs[i] = waitEnv(tb, h)
	}
	return envs
}

// waitEnv waits for the current daemon of h to write subnet.env.
func waitEnv(tb testing.TB, h *lab.Host) lab.SubnetEnv {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), converge)
	defer cancel()
	env, err := h.WaitSubnetEnv(ctx)
	if err != nil {
		tb.Fatal(err)
	}
	return env
}

// stop sends SIGTERM to d and returns its exit code.
func stop(tb testing.TB, d *lab.Daemon) int {
	tb.Helper()
	code, err := d.Stop(syscall.SIGTERM)
	if err != nil {
		tb.Fatal(err)
	}
	return code
}

// stopAll sends SIGTERM to every running daemon of the lab and checks that
// each exits 0 within exitWait. A daemon still running then gets SIGQUIT, so
// that its log shows where its goroutines are stuck, and fails the test.
func stopAll(tb testing.TB, l *lab.Lab) {
	tb.Helper()
	var wg sync.WaitGroup
	for _, h := range l.Hosts() {
		d := h.Daemon()
		if d == nil || d.Exited() {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := d.Signal(syscall.SIGTERM); err != nil {
				tb.Error(err)
				return
			}
			select {
			case <-d.Done():
			case <-time.After(exitWait):
				d.Signal(syscall.SIGQUIT)
				select {
				case <-d.Done():
				case <-time.After(5 * time.Second):
				}
				tb.Errorf("flanneld on %s did not exit within %v of SIGTERM; sent SIGQUIT; log:\n%s", h.Name, exitWait, d.Log())
				return
			}
			if code, _ := d.Wait(); code != 0 {
				tb.Errorf("flanneld on %s exited with %d after SIGTERM, want 0; log:\n%s", h.Name, code, d.Log())
			}
		}()
	}
	wg.Wait()
}

// waitExit waits for d to exit by itself and returns its exit code.
func waitExit(tb testing.TB, d *lab.Daemon) int {
	tb.Helper()
	select {
	case <-d.Done():
	case <-time.After(exitWait):
		tb.Fatalf("flanneld on %s still running after %v; log:\n%s", d.Host.Name, exitWait, d.Log())
	}
	code, err := d.Wait()
	if err != nil {
		tb.Fatalf("waiting for flanneld on %s: %v", d.Host.Name, err)
	}
	return code
}

// waitFor polls check every 50 ms until it returns nil, failing the test
// with the last error after within (a deadline, not a timing assertion).
func waitFor(tb testing.TB, what string, within time.Duration, check func() error) {
	tb.Helper()
	deadline := time.Now().Add(within)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("%s: not reached within %v: %v", what, within, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// eventually polls check until it returns nil, failing the test with the
// last error if that does not happen within converge.
func eventually(tb testing.TB, what string, check func() error) {
	tb.Helper()
	waitFor(tb, what, converge, check)
}

// checkFailedStart checks a daemon that had to refuse to start: a non-zero
// exit, no panic, a last line "flanneld: ..." naming every word of want, and
// nothing left behind (no lease in etcd, no subnet.env).
func checkFailedStart(ctx context.Context, t *testing.T, l *lab.Lab, h *lab.Host, code int, log string, want []string) {
	t.Helper()
	if code == 0 {
		t.Errorf("flanneld exited 0, want non-zero; log:\n%s", log)
	}
	if strings.Contains(log, "panic:") || strings.Contains(log, "goroutine ") {
		t.Errorf("flanneld panicked:\n%s", log)
	}
	lines := strings.Split(strings.TrimSpace(log), "\n")
	last := lines[len(lines)-1]
	if !strings.HasPrefix(last, "flanneld: ") {
		t.Errorf("last line %q is not flanneld's error line; log:\n%s", last, log)
	}
	for _, w := range want {
		if !strings.Contains(last, w) {
			t.Errorf("error line %q does not mention %s", last, w)
		}
	}
	t.Logf("error line: %s", last)
	leases, err := readLeases(ctx, l)
	if err != nil {
		t.Fatal(err)
	}
	if len(leases) != 0 {
		t.Errorf("etcd holds leases after a failed start: %v", leases)
	}
	if _, err := os.Stat(h.SubnetFile); !os.IsNotExist(err) {
		t.Errorf("subnet.env exists after a failed start (stat: %v)", err)
	}
}

// testCtx is a context that ends with the test, or after d.
func testCtx(tb testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	tb.Cleanup(cancel)
	return ctx
}

// nsPath is where ip netns binds a named namespace (the lab's own helper
// for this is unexported).
func nsPath(h *lab.Host) string { return filepath.Join("/run/netns", h.NS) }

// withNetlink runs fn with a netlink handle inside the host's namespace.
func withNetlink(h *lab.Host, fn func(nh *netlink.Handle) error) error {
	ns, err := netns.GetFromPath(nsPath(h))
	if err != nil {
		return fmt.Errorf("opening namespace of %s: %w", h.Name, err)
	}
	defer ns.Close()
	nh, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("opening netlink in %s: %w", h.Name, err)
	}
	defer nh.Close()
	return fn(nh)
}

// route is one IPv4 route as the tests compare them.
type route struct {
	Dst netip.Prefix
	Gw  netip.Addr // invalid when the route has no gateway
	Dev string
}

func (r route) String() string {
	s := r.Dst.String()
	if r.Gw.IsValid() {
		s += " via " + r.Gw.String()
	}
	return s + " dev " + r.Dev
}

func sortRoutes(rs []route) {
	slices.SortFunc(rs, func(a, b route) int { return strings.Compare(a.String(), b.String()) })
}

// overlayRoutes lists the main-table routes of h whose destination lies in
// network, read with netlink inside the namespace. The connected route the
// kernel adds for docker0's own address is left out: it is not the daemon's.
func overlayRoutes(h *lab.Host) ([]route, error) {
	var out []route
	err := withNetlink(h, func(nh *netlink.Handle) error {
		links, err := nh.LinkList()
		if err != nil {
			return fmt.Errorf("listing links of %s: %w", h.Name, err)
		}
		names := map[int]string{}
		for _, l := range links {
			names[l.Attrs().Index] = l.Attrs().Name
		}
		rs, err := nh.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return fmt.Errorf("listing routes of %s: %w", h.Name, err)
		}
		for _, r := range rs {
			if r.Dst == nil {
				continue
			}
			dst, ok := prefixOf(r.Dst)
			if !ok || !network.Overlaps(dst) {
				continue
			}
			rt := route{Dst: dst, Dev: names[r.LinkIndex]}
			if r.Gw != nil {
				rt.Gw, _ = netip.AddrFromSlice(r.Gw.To4())
			}
			if rt.Dev == lab.BridgeName && !rt.Gw.IsValid() && r.Protocol == unix.RTPROT_KERNEL {
				continue
			}
			out = append(out, rt)
		}
		return nil
	})
	sortRoutes(out)
	return out, err
}

func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	a, ok := netip.AddrFromSlice(n.IP.To4())
	if !ok {
		return netip.Prefix{}, false
	}
	ones, bits := n.Mask.Size()
	if bits != 32 {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(a, ones), true
}

// wantRoutes is what host-gw should install on hosts[self]: a route to every
// other host's subnet via that host's eth0 address, on eth0.
func wantRoutes(hosts []*lab.Host, envs []lab.SubnetEnv, self int) []route {
	var want []route
	for j, h := range hosts {
		if j != self {
			want = append(want, route{Dst: envs[j].Subnet.Masked(), Gw: h.Addr, Dev: lab.ExternalIface})
		}
	}
	sortRoutes(want)
	return want
}

// routesAre reports whether h has exactly the overlay routes want.
func routesAre(h *lab.Host, want []route) error {
	got, err := overlayRoutes(h)
	if err != nil {
		return err
	}
	if !slices.Equal(got, want) {
		return fmt.Errorf("%s has routes %v, want %v", h.Name, got, want)
	}
	return nil
}

// waitRoutes waits until every host has exactly its wantRoutes.
func waitRoutes(tb testing.TB, hosts []*lab.Host, envs []lab.SubnetEnv) {
	tb.Helper()
	for i, h := range hosts {
		want := wantRoutes(hosts, envs, i)
		eventually(tb, "routes on "+h.Name, func() error { return routesAre(h, want) })
	}
}

// linkMTU reads the MTU of a link in the host's namespace.
func linkMTU(h *lab.Host, name string) (int, error) {
	var mtu int
	err := withNetlink(h, func(nh *netlink.Handle) error {
		l, err := nh.LinkByName(name)
		if err != nil {
			return fmt.Errorf("finding %s on %s: %w", name, h.Name, err)
		}
		mtu = l.Attrs().MTU
		return nil
	})
	return mtu, err
}

// lease is one lease as stored in etcd.
type lease struct {
	Subnet      netip.Prefix
	PublicIP    netip.Addr
	BackendType string
	VtepMAC     string // BackendData.VtepMAC, vxlan leases only
	TTL         int64
}

// leaseKey is the etcd key of the lease for subnet p.
func leaseKey(l *lab.Lab, p netip.Prefix) string {
	return fmt.Sprintf("%s/subnets/%s-%d", l.EtcdPrefix(), p.Masked().Addr(), p.Bits())
}

// readLeases lists the leases in etcd by subnet. It parses the keys and
// values itself, as another flannel node would, rather than through the
// daemon's own code.
func readLeases(ctx context.Context, l *lab.Lab) (map[netip.Prefix]lease, error) {
	dir := l.EtcdPrefix() + "/subnets"
	resp, err := l.KeysAPI().Get(ctx, dir, &client.GetOptions{Recursive: true, Quorum: true})
	if client.IsKeyNotFound(err) {
		return map[netip.Prefix]lease{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("listing %s: %w", dir, err)
	}
	out := map[netip.Prefix]lease{}
	for _, n := range resp.Node.Nodes {
		base := path.Base(n.Key)
		addr, bits, ok := strings.Cut(base, "-")
		if !ok {
			return nil, fmt.Errorf("lease key %s is not <A.B.C.D>-<len>", n.Key)
		}
		a, err := netip.ParseAddr(addr)
		if err != nil {
			return nil, fmt.Errorf("lease key %s: %w", n.Key, err)
		}
		b, err := strconv.Atoi(bits)
		if err != nil {
			return nil, fmt.Errorf("lease key %s: %w", n.Key, err)
		}
		var v struct {
			PublicIP    string
			BackendType string
			BackendData struct{ VtepMAC string }
		}
		if err := json.Unmarshal([]byte(n.Value), &v); err != nil {
			return nil, fmt.Errorf("lease %s value %q: %w", n.Key, n.Value, err)
		}
		pub, err := netip.ParseAddr(v.PublicIP)
		if err != nil {
			return nil, fmt.Errorf("lease %s PublicIP: %w", n.Key, err)
		}
		p := netip.PrefixFrom(a, b)
		out[p] = lease{Subnet: p, PublicIP: pub, BackendType: v.BackendType, VtepMAC: v.BackendData.VtepMAC, TTL: n.TTL}
	}
	return out, nil
}

// leasesOf returns the leases held by the host's address.
func leasesOf(all map[netip.Prefix]lease, h *lab.Host) []lease {
	var out []lease
	for _, l := range all {
		if l.PublicIP == h.Addr {
			out = append(out, l)
		}
	}
	return out
}

// iptablesRules lists the rules of one chain inside the host namespace with
// `iptables -S`, each with its "-A <chain> " and its comment match removed.
// Every rule must carry a comment naming flanneld unless anyComment is set.
func iptablesRules(ctx context.Context, h *lab.Host, table, chain string, anyComment bool) ([]string, error) {
	out, err := h.Exec(ctx, "iptables", "-w", "5", "-t", table, "-S", chain)
	if err != nil {
		return nil, err
	}
	var rules []string
	for _, line := range strings.Split(out, "\n") {
		rest, ok := strings.CutPrefix(strings.TrimSpace(line), "-A "+chain+" ")
		if !ok {
			continue
		}
		m := commentRE.FindStringSubmatch(rest)
		if m == nil {
			if !anyComment {
				return nil, fmt.Errorf("%s: rule %q in %s %s has no comment", h.Name, rest, table, chain)
			}
		} else {
			if !anyComment && !strings.Contains(m[1], "flanneld") {
				return nil, fmt.Errorf("%s: rule %q in %s %s has a comment that does not name flanneld", h.Name, rest, table, chain)
			}
			rest = commentRE.ReplaceAllString(rest, " ")
		}
		rules = append(rules, strings.Join(strings.Fields(rest), " "))
	}
	return rules, nil
}

var commentRE = regexp.MustCompile(`\s*-m comment --comment ("[^"]*"|\S+)\s*`)

// flannelRules is the expected content of FLANNEL-FWD and FLANNEL-POSTRTG
// (WIRE.md), in order, for network n and own lease s; the MASQUERADE rules
// carry --random-fully, flannel v0.28's default (the lab's iptables has it).
func flannelRules(n, s netip.Prefix) (fwd, masq []string) {
	N, S := n.Masked().String(), s.Masked().String()
	fwd = []string{
		"-s " + N + " -j ACCEPT",
		"-d " + N + " -j ACCEPT",
	}
	masq = []string{
		"-s " + N + " -d " + N + " -j RETURN",
		"-s " + N + " ! -d 224.0.0.0/4 -j MASQUERADE --random-fully",
		"! -s " + N + " -d " + S + " -j RETURN",
		"! -s " + N + " -d " + N + " -j MASQUERADE --random-fully",
	}
	return fwd, masq
}

// checkRules reports whether h has the whole rule set in order: the
// FLANNEL-FWD rules and the jump from FORWARD and, with ipMasq, the
// FLANNEL-POSTRTG rules and the jump from POSTROUTING (without it, no
// FLANNEL-POSTRTG chain).
func checkRules(ctx context.Context, h *lab.Host, n, s netip.Prefix, ipMasq bool) error {
	fwd, masq := flannelRules(n, s)
	got, err := iptablesRules(ctx, h, "filter", "FLANNEL-FWD", false)
	if err != nil {
		return err
	}
	if !slices.Equal(got, fwd) {
		return fmt.Errorf("%s: filter FLANNEL-FWD is %q, want %q", h.Name, got, fwd)
	}
	if err := hasJump(ctx, h, "filter", "FORWARD", "FLANNEL-FWD"); err != nil {
		return err
	}
	if !ipMasq {
		if out, err := h.Exec(ctx, "iptables", "-w", "5", "-t", "nat", "-S", "FLANNEL-POSTRTG"); err == nil {
			return fmt.Errorf("%s: nat FLANNEL-POSTRTG exists without --ip-masq:\n%s", h.Name, out)
		}
		return nil
	}
	got, err = iptablesRules(ctx, h, "nat", "FLANNEL-POSTRTG", false)
	if err != nil {
		return err
	}
	if !slices.Equal(got, masq) {
		return fmt.Errorf("%s: nat FLANNEL-POSTRTG is %q, want %q", h.Name, got, masq)
	}
	return hasJump(ctx, h, "nat", "POSTROUTING", "FLANNEL-POSTRTG")
}

// hasJump checks that parent holds exactly one jump to chain.
func hasJump(ctx context.Context, h *lab.Host, table, parent, chain string) error {
	rules, err := iptablesRules(ctx, h, table, parent, true)
	if err != nil {
		return err
	}
	n := 0
	for _, r := range rules {
		if r == "-j "+chain {
			n++
		}
	}
	if n != 1 {
		return fmt.Errorf("%s: %s %s has %d jumps to %s, want 1: %q", h.Name, table, parent, n, chain, rules)
	}
	return nil
}

// httpGet does a GET from inside the host's namespace: the socket is
// created there, so the request never leaves the lab.
func httpGet(ctx context.Context, h *lab.Host, url string) (int, string, error) {
	tr := &http.Transport{DialContext: etcdtest.DialContextIn(nsPath(h)), DisableKeepAlives: true, Proxy: nil}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), err
}

// errStatus is returned by wantStatus for an unexpected status.
var errStatus = errors.New("unexpected HTTP status")

// wantStatus GETs url from h and checks the status code.
func wantStatus(ctx context.Context, h *lab.Host, url string, want int) error {
	code, body, err := httpGet(ctx, h, url)
	if err != nil {
		return err
	}
	if code != want {
		return fmt.Errorf("%w: GET %s on %s: %d %q, want %d", errStatus, url, h.Name, code, strings.TrimSpace(body), want)
	}
	return nil
}
