package e2e

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"go.etcd.io/etcd/client/v2"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/e2e/lab"
	"github.com/flanneld-go/flanneld/internal/etcdtest"
)

// The fault suite: etcd goes away and comes back, a member of an etcd
// cluster dies, etcd forgets the watch history, a dead node's lease
// expires, and the kernel state is edited by hand. Each runs the real
// daemon in the lab. Figures (CPU use, times to recover) are logged, never
// asserted against a clock; the only bound is a generous one on CPU use
// during an outage, which tells an idle daemon from a spinning one.

const (
	// envLong set to 1 makes the etcd outage last longOutage.
	envLong      = "FLANNEL_E2E_LONG"
	shortOutage  = 8 * time.Second
	longOutage   = 60 * time.Second
	maxOutageCPU = 0.25 // of one core, averaged over the outage
	// userHZ is the unit of the CPU times in /proc/<pid>/stat.
	userHZ = 100
)

// fakeHost is the PublicIP of fake nodes on the lab's LAN: nothing answers
// there, and the lab's own hosts are .11 upwards.
var fakeHost = netip.MustParseAddr("10.250.0.200")

// faultSubnet is 10.5.n.0/24. The daemons pick their own among the first
// 100 free subnets (10.5.1.0 to 10.5.100.0), so n > 100 is never theirs.
func faultSubnet(n int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 5, byte(n), 0}), 24)
}

// fakeMAC is the VtepMAC of the fake vxlan node with subnet sn and
// PublicIP pub.
func fakeMAC(sn netip.Prefix, pub netip.Addr) string {
	s, p := sn.Addr().As4(), pub.As4()
	return fmt.Sprintf("0e:fa:00:00:%02x:%02x", s[2], p[3])
}

// fakeLeaseOf is the etcd key and value of a lease of a fake node.
func fakeLeaseOf(l *lab.Lab, backendType string, sn netip.Prefix, pub netip.Addr) (key, value string) {
	key = leaseKey(l, sn)
	if backendType == "vxlan" {
		return key, fmt.Sprintf(`{"PublicIP":"%s","BackendType":"vxlan","BackendData":{"VtepMAC":"%s"}}`, pub, fakeMAC(sn, pub))
	}
	return key, fmt.Sprintf(`{"PublicIP":"%s","BackendType":%q}`, pub, backendType)
}

// lanNSPath is the path of the lab's LAN namespace, for etcdtest.WithNetNS.
func lanNSPath(l *lab.Lab) string { return filepath.Join("/run/netns", l.LANNamespace()) }

// kernelSnapshot lists what h's kernel holds that a daemon programs or
// relies on, one entry a string, sorted: links (type, MAC, admin state),
// IPv4 addresses, main-table IPv4 routes, IPv4 policy rules, permanent IPv4
// neighbours, the fdb entries of vxlan devices, and the iptables rules that
// mention FLANNEL.
func kernelSnapshot(ctx context.Context, h *lab.Host) ([]string, error) {
	var out []string
	err := withNetlink(h, func(nh *netlink.Handle) error {
		links, err := nh.LinkList()
		if err != nil {
			return fmt.Errorf("listing links of %s: %w", h.Name, err)
		}
		names := map[int]string{}
		for _, l := range links {
			a := l.Attrs()
			names[a.Index] = a.Name
			out = append(out, fmt.Sprintf("link %s %s %s up=%t", a.Name, l.Type(), a.HardwareAddr, a.Flags&unix.IFF_UP != 0))
		}
		addrs, err := nh.AddrList(nil, netlink.FAMILY_V4)
		if err != nil {
			return fmt.Errorf("listing addresses of %s: %w", h.Name, err)
		}
		for _, a := range addrs {
			out = append(out, fmt.Sprintf("addr %s dev %s", a.IPNet, names[a.LinkIndex]))
		}
		routes, err := nh.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return fmt.Errorf("listing routes of %s: %w", h.Name, err)
		}
		for _, r := range routes {
			s := "route " + r.Dst.String()
			if r.Gw != nil {
				s += " via " + r.Gw.String()
			}
			s += " dev " + names[r.LinkIndex]
			if r.Flags&int(netlink.FLAG_ONLINK) != 0 {
				s += " onlink"
			}
			out = append(out, fmt.Sprintf("%s proto %d scope %d", s, r.Protocol, r.Scope))
		}
		rules, err := nh.RuleList(netlink.FAMILY_V4)
		if err != nil {
			return fmt.Errorf("listing rules of %s: %w", h.Name, err)
		}
		for _, r := range rules {
			out = append(out, fmt.Sprintf("rule prio %d table %d src %v dst %v", r.Priority, r.Table, r.Src, r.Dst))
		}
		neighs, err := nh.NeighList(0, netlink.FAMILY_V4)
		if err != nil {
			return fmt.Errorf("listing neighbours of %s: %w", h.Name, err)
		}
		for _, n := range neighs {
			if n.State&unix.NUD_PERMANENT != 0 {
				out = append(out, fmt.Sprintf("neigh %s lladdr %s dev %s", n.IP, n.HardwareAddr, names[n.LinkIndex]))
			}
		}
		for _, l := range links {
			if l.Type() != "vxlan" {
				continue
			}
			fdbs, err := nh.NeighList(l.Attrs().Index, unix.AF_BRIDGE)
			if err != nil {
				return fmt.Errorf("listing fdb entries of %s: %w", h.Name, err)
			}
			for _, n := range fdbs {
				out = append(out, fmt.Sprintf("fdb %s dst %s dev %s state %s", n.HardwareAddr, n.IP, names[n.LinkIndex], nudString(n.State)))
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	for _, table := range []string{"filter", "nat"} {
		rules, err := h.Exec(ctx, "iptables", "-w", "5", "-t", table, "-S")
		if err != nil {
			return nil, err
		}
		for _, r := range strings.Split(rules, "\n") {
			if strings.Contains(r, "FLANNEL") {
				out = append(out, "iptables -t "+table+" "+r)
			}
		}
	}
	slices.Sort(out)
	return out, nil
}

// diffSnapshots returns the entries of before missing from after, and the
// entries of after that before lacks.
func diffSnapshots(before, after []string) (gone, added []string) {
	for _, s := range before {
		if !slices.Contains(after, s) {
			gone = append(gone, s)
		}
	}
	for _, s := range after {
		if !slices.Contains(before, s) {
			added = append(added, s)
		}
	}
	return gone, added
}

// pinger pings between the overlay addresses of every ordered pair of hosts,
// one ping at a time, until stopped.
type pinger struct {
	cancel context.CancelFunc
	done   chan struct{}

	mu       sync.Mutex
	ok       int
	failures []string
}

func startPinger(hosts []*lab.Host, envs []lab.SubnetEnv) *pinger {
	ctx, cancel := context.WithCancel(context.Background())
	p := &pinger{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		for ctx.Err() == nil {
			for i, from := range hosts {
				for j := range hosts {
					if i == j || ctx.Err() != nil {
						continue
					}
					at := time.Now()
					err := from.Ping(ctx, envs[i].Subnet.Addr(), envs[j].Subnet.Addr())
					if ctx.Err() != nil {
						return // a ping cut short by stop is no failure
					}
					p.mu.Lock()
					if err != nil {
						p.failures = append(p.failures, fmt.Sprintf("%s %s -> %s: %v", at.Format("15:04:05.000"), from.Name, hosts[j].Name, err))
					} else {
						p.ok++
					}
					p.mu.Unlock()
				}
			}
		}
	}()
	return p
}

// stop ends the pings and returns the count of replies and the failures.
// It may be called again.
func (p *pinger) stop() (ok int, failures []string) {
	p.cancel()
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.ok, p.failures
}

// cpuTime is the user plus system CPU time of process pid so far.
func cpuTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("reading CPU time of %d: %w", pid, err)
	}
	// The command name, in parentheses, may hold spaces: count fields
	// after its closing parenthesis. Field 3 (state) is rest[0], field 14
	// (utime) rest[11], field 15 (stime) rest[12].
	s := string(b)
	rest := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(rest) < 13 {
		return 0, fmt.Errorf("parsing /proc/%d/stat: %q has too few fields", pid, s)
	}
	var ticks int64
	for _, f := range rest[11:13] {
		n, err := strconv.ParseInt(f, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("parsing /proc/%d/stat: %w", pid, err)
		}
		ticks += n
	}
	return time.Duration(ticks) * time.Second / userHZ, nil
}

// logSummary counts klog lines by message: `"Watching leases failed" ×7, ...`.
func logSummary(log string) string {
	counts := map[string]int{}
	var order []string
	for _, ln := range strings.Split(strings.TrimSpace(log), "\n") {
		msg := ln
		if _, rest, ok := strings.Cut(ln, "] "); ok {
			msg = rest
			if q, err := strconv.QuotedPrefix(rest); err == nil {
				msg = q
			}
		}
		if msg == "" {
			continue
		}
		if counts[msg] == 0 {
			order = append(order, msg)
		}
		counts[msg]++
	}
	var parts []string
	for _, m := range order {
		parts = append(parts, fmt.Sprintf("%s ×%d", m, counts[m]))
	}
	return strings.Join(parts, ", ")
}

// hasRouteTo reports whether h has a main-table route to exactly dst.
func hasRouteTo(h *lab.Host, dst netip.Prefix) (bool, error) {
	rs, err := overlayRoutes(h)
	if err != nil {
		return false, err
	}
	for _, r := range rs {
		if r.Dst == dst {
			return true, nil
		}
	}
	return false, nil
}

// waitRouteEverywhere waits until every host has a route to dst and
// returns, per host, the time from since to the first poll that saw it.
func waitRouteEverywhere(tb testing.TB, hosts []*lab.Host, dst netip.Prefix, since time.Time, within time.Duration) []time.Duration {
	tb.Helper()
	took := make([]time.Duration, len(hosts))
	seen := make([]bool, len(hosts))
	waitFor(tb, "a route to "+dst.String()+" on every host", within, func() error {
		var missing []string
		for i, h := range hosts {
			if seen[i] {
				continue
			}
			ok, err := hasRouteTo(h, dst)
			if err != nil {
				return err
			}
			if ok {
				seen[i], took[i] = true, time.Since(since)
				continue
			}
			missing = append(missing, h.Name)
		}
		if len(missing) > 0 {
			return fmt.Errorf("no route to %s on %v", dst, missing)
		}
		return nil
	})
	return took
}

// TestEtcdOutage stops etcd under three converged daemons (host-gw and
// vxlan): while it is down the kernel state stays exactly as it was,
// overlay pings keep working and the daemons stay idle; when it is back, a
// new node's lease reaches every daemon. FLANNEL_E2E_LONG=1 makes the
// outage a minute long instead of a few seconds.
func TestEtcdOutage(t *testing.T) {
	t.Parallel()
	outage := shortOutage
	if os.Getenv(envLong) == "1" {
		outage = longOutage
	}
	for _, tc := range []struct{ backend, config string }{
		{"host-gw", hostGWConfig},
		{"vxlan", vxlanConfig},
	} {
		t.Run(tc.backend, func(t *testing.T) {
			t.Parallel()
			testOutage(t, tc.backend, tc.config, outage)
		})
	}
}

func testOutage(t *testing.T, backendType, config string, outage time.Duration) {
	l := newLab(t, 3, config)
	ctx := testCtx(t, 5*time.Minute)
	hosts := l.Hosts()
	envs := startAll(t, l, "--ip-masq")
	if backendType == "vxlan" {
		w := vxlanWorld{hosts: hosts, envs: envs, macs: make([]string, len(hosts))}
		for i, h := range hosts {
			var err error
			if w.macs[i], err = vtepMAC(h); err != nil {
				t.Fatal(err)
			}
		}
		w.wait(t)
	} else {
		waitRoutes(t, hosts, envs)
	}
	for i, h := range hosts {
		eventually(t, "rules on "+h.Name, func() error { return checkRules(ctx, h, network, envs[i].Subnet, true) })
	}
	setBridges(t, hosts, envs)
	pingAll(t, hosts, envs)
	if t.Failed() {
		t.FailNow()
	}

	before := make([][]string, len(hosts))
	for i, h := range hosts {
		var err error
		if before[i], err = kernelSnapshot(ctx, h); err != nil {
			t.Fatal(err)
		}
	}
	daemons := make([]*lab.Daemon, len(hosts))
	cpu0 := make([]time.Duration, len(hosts))
	logLen := make([]int, len(hosts))
	for i, h := range hosts {
		daemons[i] = h.Daemon()
		var err error
		if cpu0[i], err = cpuTime(daemons[i].Pid()); err != nil {
			t.Fatal(err)
		}
		logLen[i] = len(daemons[i].Log())
	}
	p := startPinger(hosts, envs)
	defer p.stop()

	srv := l.Etcd()
	down := time.Now()
	srv.Stop()
	t.Logf("etcd stopped (Stop took %v) for %v", time.Since(down).Round(time.Millisecond), outage)
	// While etcd is down nothing else happens: the state must not move.
	changed := make([]bool, len(hosts))
	checks := 0
	for time.Since(down) < outage {
		time.Sleep(min(time.Second, outage-time.Since(down)))
		for i, h := range hosts {
			if changed[i] {
				continue
			}
			now, err := kernelSnapshot(ctx, h)
			if err != nil {
				t.Error(err)
				continue
			}
			if gone, added := diffSnapshots(before[i], now); len(gone)+len(added) > 0 {
				changed[i] = true
				t.Errorf("%s: kernel state changed %v into the etcd outage: gone %q, added %q",
					h.Name, time.Since(down).Round(time.Millisecond), gone, added)
			}
		}
		checks++
	}
	downFor := time.Since(down)
	for i, d := range daemons {
		cpu, err := cpuTime(d.Pid())
		if err != nil {
			t.Fatal(err)
		}
		used := cpu - cpu0[i]
		share := used.Seconds() / downFor.Seconds()
		logged := d.Log()[logLen[i]:]
		t.Logf("%s %s: %v CPU in %v of outage (%.2f%% of a core); %d log lines, %d bytes: %s",
			backendType, hosts[i].Name, used, downFor.Round(time.Millisecond), 100*share, strings.Count(logged, "\n"), len(logged), logSummary(logged))
		if share > maxOutageCPU {
			t.Errorf("%s: flanneld used %.0f%% of a core while etcd was down, want under %.0f%% (is it spinning?); its log then:\n%s",
				hosts[i].Name, 100*share, 100*maxOutageCPU, tailLines(logged, 30))
		}
		if d.Exited() {
			t.Fatalf("flanneld on %s exited during the etcd outage; log:\n%s", hosts[i].Name, d.Log())
		}
	}
	t.Logf("kernel state checked %d times on each host during the outage", checks)

	restartBegin := time.Now()
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	t.Logf("etcd restarted in %v", back.Sub(restartBegin).Round(time.Millisecond))
	for i, h := range hosts {
		now, err := kernelSnapshot(ctx, h)
		if err != nil {
			t.Fatal(err)
		}
		if gone, added := diffSnapshots(before[i], now); len(gone)+len(added) > 0 {
			t.Errorf("%s: kernel state changed over the etcd outage: gone %q, added %q", h.Name, gone, added)
		}
	}

	// A node joins as etcd returns: every daemon's watch must resume.
	sn := faultSubnet(250)
	key, value := fakeLeaseOf(l, backendType, sn, fakeHost)
	if _, err := l.KeysAPI().Set(ctx, key, value, &client.SetOptions{TTL: 24 * time.Hour}); err != nil {
		t.Fatalf("writing a new lease after the restart: %v", err)
	}
	written := time.Since(back)
	took := waitRouteEverywhere(t, hosts, sn, back, converge)
	for i, h := range hosts {
		t.Logf("%s %s: route to the new lease %s %v after etcd was back, %v after the write returned",
			backendType, h.Name, sn, took[i].Round(time.Millisecond), (took[i] - written).Round(time.Millisecond))
	}
	ok, failures := p.stop()
	t.Logf("overlay pings from before the outage until the new lease was routed: %d replies, %d failures", ok, len(failures))
	if len(failures) > 0 {
		t.Errorf("overlay pings failed during the etcd outage:\n%s", strings.Join(failures, "\n"))
	}
	if ok == 0 {
		t.Errorf("no overlay ping was answered during the etcd outage")
	}
	// Nothing went away; what came is the new lease's.
	fakeMark := []string{sn.Addr().String(), fakeMAC(sn, fakeHost), fakeHost.String()}
	for i, h := range hosts {
		now, err := kernelSnapshot(ctx, h)
		if err != nil {
			t.Fatal(err)
		}
		gone, added := diffSnapshots(before[i], now)
		if len(gone) > 0 {
			t.Errorf("%s: entries gone after the etcd outage: %q", h.Name, gone)
		}
		for _, a := range added {
			if !slices.ContainsFunc(fakeMark, func(m string) bool { return strings.Contains(a, m) }) {
				t.Errorf("%s: entry %q appeared after the etcd outage; only the new lease's were expected", h.Name, a)
			}
		}
	}
}

// TestLeaseExpiry writes the lease of a dead node with a 3 s TTL: its
// neighbour, fdb entry and route appear on every vxlan host and, once etcd
// expires the key, go away everywhere.
func TestLeaseExpiry(t *testing.T) {
	t.Parallel()
	l := newLab(t, 3, vxlanConfig)
	ctx := testCtx(t, 2*time.Minute)
	w := vxlanStart(t, l)
	w.wait(t)
	const ttl = 3 * time.Second
	sn := faultSubnet(251)
	mac := fakeMAC(sn, fakeHost)
	key, value := fakeLeaseOf(l, "vxlan", sn, fakeHost)
	wantRoute := fmt.Sprintf("%s via %s dev %s onlink", sn, sn.Addr(), vxlanDev)
	wantNeigh := fmt.Sprintf("%s lladdr %s permanent", sn.Addr(), mac)
	wantFDB := fmt.Sprintf("%s self dst %s permanent", mac, fakeHost)

	written := time.Now()
	if _, err := l.KeysAPI().Set(ctx, key, value, &client.SetOptions{TTL: ttl}); err != nil {
		t.Fatalf("writing a lease with TTL %v: %v", ttl, err)
	}
	seen := make([]time.Duration, len(w.hosts))
	waitFor(t, "the dead node's entries on every host", ttl+converge, func() error {
		var missing []string
		for i, h := range w.hosts {
			if seen[i] != 0 {
				continue
			}
			k, err := readVXLANKernel(h)
			if err != nil {
				return err
			}
			if slices.Contains(k.Routes, wantRoute) && slices.Contains(k.Neighs, wantNeigh) && slices.Contains(k.FDB, wantFDB) {
				seen[i] = time.Since(written)
				continue
			}
			missing = append(missing, h.Name)
		}
		if len(missing) > 0 {
			return fmt.Errorf("%q, %q and %q not all on %v", wantRoute, wantNeigh, wantFDB, missing)
		}
		return nil
	})
	gone := make([]time.Duration, len(w.hosts))
	waitFor(t, "the dead node's entries gone from every host", ttl+converge, func() error {
		var left []error
		for i := range w.hosts {
			if gone[i] != 0 {
				continue
			}
			if err := w.check(i); err != nil {
				left = append(left, err)
				continue
			}
			gone[i] = time.Since(written)
		}
		return errors.Join(left...)
	})
	for i, h := range w.hosts {
		t.Logf("%s: entries of the %v lease in place %v after it was written, gone %v after (%v after the TTL)",
			h.Name, ttl, seen[i].Round(time.Millisecond), gone[i].Round(time.Millisecond), (gone[i] - ttl).Round(time.Millisecond))
	}
	if _, err := l.KeysAPI().Get(ctx, key, nil); !client.IsKeyNotFound(err) {
		t.Errorf("reading %s after its TTL: %v, want key not found (expired)", key, err)
	}
	for _, h := range w.hosts {
		if h.Daemon().Exited() {
			t.Errorf("flanneld on %s exited", h.Name)
		}
	}
}

// TestHistoryLoss freezes one daemon (SIGSTOP) while more than 1000 lease
// changes are written, so that etcd no longer holds the events after its
// watch cursor. Thawed, it re-lists: its routes are exactly the final lease
// set, as are those of the daemon that never stopped.
func TestHistoryLoss(t *testing.T) {
	t.Parallel()
	l := newLab(t, 2, hostGWConfig)
	ctx := testCtx(t, 3*time.Minute)
	hosts := l.Hosts()
	envs := startAll(t, l)
	waitRoutes(t, hosts, envs)
	kapi := l.KeysAPI()

	// 40 fake nodes, fake i on subnet 10.5.(200+i).0/24 with PublicIP
	// 10.250.0.(100+(i+r)%100) after its r-th change.
	const fakes, changes = 40, 1210
	pub := func(i, r int) netip.Addr { return netip.AddrFrom4([4]byte{10, 250, 0, byte(100 + (i+r)%100)}) }
	set := func(i, r int) error {
		key, value := fakeLeaseOf(l, "host-gw", faultSubnet(200+i), pub(i, r))
		_, err := kapi.Set(ctx, key, value, &client.SetOptions{TTL: 24 * time.Hour})
		return err
	}
	for i := range fakes {
		if err := set(i, 0); err != nil {
			t.Fatalf("writing fake lease %d: %v", i, err)
		}
	}
	// want is host hi's routes when the fakes in present are there.
	want := func(hi int, present map[int]int) []route {
		rs := wantRoutes(hosts, envs, hi)
		for i, r := range present {
			rs = append(rs, route{Dst: faultSubnet(200 + i), Gw: pub(i, r), Dev: lab.ExternalIface})
		}
		sortRoutes(rs)
		return rs
	}
	present := map[int]int{}
	for i := range fakes {
		present[i] = 0
	}
	for hi, h := range hosts {
		eventually(t, "routes to the fake nodes on "+h.Name, func() error { return routesAre(h, want(hi, present)) })
	}

	frozen := hosts[0].Daemon()
	if err := frozen.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { frozen.Signal(syscall.SIGCONT) })
	resp, err := kapi.Get(ctx, l.EtcdPrefix()+"/subnets", nil)
	if err != nil {
		t.Fatal(err)
	}
	cursor := resp.Index
	// Change c toggles fake c%40: delete it if present, else write it
	// with its next PublicIP. The writers go one per fake, in order.
	begin := time.Now()
	var wg sync.WaitGroup
	errs := make([]error, fakes)
	final := make([]int, fakes) // round of the last write; -1: deleted
	for i := range fakes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := 1; i+(r-1)*fakes < changes; r++ {
				if r%2 == 1 {
					key, _ := fakeLeaseOf(l, "host-gw", faultSubnet(200+i), fakeHost)
					if _, err := kapi.Delete(ctx, key, nil); err != nil {
						errs[i] = fmt.Errorf("deleting fake lease %d: %w", i, err)
						return
					}
					final[i] = -1
					continue
				}
				if err := set(i, r); err != nil {
					errs[i] = fmt.Errorf("writing fake lease %d: %w", i, err)
					return
				}
				final[i] = r
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d lease changes written in %v with host1's flanneld stopped", changes, time.Since(begin).Round(time.Millisecond))
	clear(present)
	for i, r := range final {
		if r >= 0 {
			present[i] = r
		}
	}
	// etcd must have dropped the events after the frozen daemon's cursor.
	_, err = kapi.Watcher(l.EtcdPrefix()+"/subnets", &client.WatcherOptions{AfterIndex: cursor, Recursive: true}).Next(ctx)
	var cerr client.Error
	if !errors.As(err, &cerr) || cerr.Code != client.ErrorCodeEventIndexCleared {
		t.Fatalf("watching from index %d after %d changes: %v, want etcd error %d (index cleared)", cursor, changes, err, client.ErrorCodeEventIndexCleared)
	}

	thawed := time.Now()
	if err := frozen.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	for hi, h := range hosts {
		eventually(t, "routes of the final lease set on "+h.Name, func() error { return routesAre(h, want(hi, present)) })
		t.Logf("%s: routes equal the final set (%d fake nodes of %d) %v after host1's flanneld was thawed",
			h.Name, len(present), fakes, time.Since(thawed).Round(time.Millisecond))
	}
	if frozen.Exited() {
		t.Fatalf("flanneld on host1 exited after SIGCONT; log:\n%s", frozen.Log())
	}
	// And nothing else comes back later (a stale event replayed).
	time.Sleep(2 * time.Second)
	for hi, h := range hosts {
		if err := routesAre(h, want(hi, present)); err != nil {
			t.Errorf("2 s later: %v", err)
		}
	}
}

// TestSelfHeal edits the kernel state under daemons running with
// --route-resync 1 --iptables-resync 1: each edit is undone and traffic
// flows again. vxlan: flannel.1 deleted (it comes back with the same MAC
// and all its entries), every neighbour and fdb entry deleted, eth0 taken
// down and up. host-gw: eth0 taken down and up (the kernel drops the
// routes through it).
func TestSelfHeal(t *testing.T) {
	t.Parallel()
	t.Run("vxlan", func(t *testing.T) {
		t.Parallel()
		l := newLab(t, 2, vxlanConfig)
		ctx := testCtx(t, 3*time.Minute)
		w := vxlanStart(t, l, "--route-resync", "1", "--iptables-resync", "1")
		w.wait(t)
		setBridges(t, w.hosts, w.envs)
		pingAll(t, w.hosts, w.envs)
		h1 := l.Host(1)

		// Deletions are repaired on the kernel's events, maybe before
		// heal looks: it cannot insist on seeing them.
		heal(t, w, "deleting "+vxlanDev, false, func(nh *netlink.Handle) error {
			dev, err := nh.LinkByName(vxlanDev)
			if err != nil {
				return err
			}
			return nh.LinkDel(dev)
		})
		heal(t, w, "deleting every neighbour and fdb entry of "+vxlanDev, false, func(nh *netlink.Handle) error {
			dev, err := nh.LinkByName(vxlanDev)
			if err != nil {
				return err
			}
			var errs []error
			for _, family := range []int{netlink.FAMILY_V4, unix.AF_BRIDGE} {
				ns, err := nh.NeighList(dev.Attrs().Index, family)
				if err != nil {
					return err
				}
				for _, n := range ns {
					if n.LinkIndex == dev.Attrs().Index {
						errs = append(errs, nh.NeighDel(&n))
					}
				}
			}
			return errors.Join(errs...)
		})
		// The kernel may keep everything of flannel.1 across the flap; if
		// it drops some of it, it must come back.
		heal(t, w, "taking eth0 down and up", false, flapEth0(t, h1))
		if err := checkRules(ctx, h1, network, w.envs[0].Subnet, false); err != nil {
			t.Errorf("after the edits: %v", err)
		}
	})
	t.Run("host-gw", func(t *testing.T) {
		t.Parallel()
		l := newLab(t, 2, hostGWConfig)
		ctx := testCtx(t, 3*time.Minute)
		hosts := l.Hosts()
		envs := startAll(t, l, "--route-resync", "1", "--iptables-resync", "1")
		waitRoutes(t, hosts, envs)
		setBridges(t, hosts, envs)
		pingAll(t, hosts, envs)
		h1 := l.Host(1)
		want := wantRoutes(hosts, envs, 0)
		if err := withNetlink(h1, flapEth0(t, h1)); err != nil {
			t.Fatal(err)
		}
		flapped := time.Now()
		eventually(t, "host1's routes back after the eth0 flap", func() error { return routesAre(h1, want) })
		t.Logf("host1: routes restored %v after eth0 came back up", time.Since(flapped).Round(time.Millisecond))
		pingAll(t, hosts, envs)
		if err := checkRules(ctx, h1, network, envs[0].Subnet, false); err != nil {
			t.Errorf("after the eth0 flap: %v", err)
		}
		if h1.Daemon().Exited() {
			t.Fatalf("flanneld on host1 exited")
		}
	})
}

// flapEth0 returns an edit that takes eth0 of h down, logs what the kernel
// dropped with it, and brings it up again.
func flapEth0(t *testing.T, h *lab.Host) func(nh *netlink.Handle) error {
	return func(nh *netlink.Handle) error {
		eth0, err := nh.LinkByName(lab.ExternalIface)
		if err != nil {
			return err
		}
		before, err := kernelSnapshot(context.Background(), h)
		if err != nil {
			return err
		}
		if err := nh.LinkSetDown(eth0); err != nil {
			return fmt.Errorf("taking eth0 down: %w", err)
		}
		down, err := kernelSnapshot(context.Background(), h)
		if err != nil {
			return err
		}
		gone, _ := diffSnapshots(before, down)
		t.Logf("%s: with eth0 down the kernel dropped %q", h.Name, gone)
		if err := nh.LinkSetUp(eth0); err != nil {
			return fmt.Errorf("bringing eth0 up: %w", err)
		}
		return nil
	}
}

// heal makes an edit on host 1 of w, checks that it changed the state (if
// mustChange), waits for the daemon to restore all of it and pings both
// ways.
func heal(t *testing.T, w vxlanWorld, what string, mustChange bool, edit func(nh *netlink.Handle) error) {
	t.Helper()
	h1 := w.hosts[0]
	if err := withNetlink(h1, edit); err != nil {
		t.Fatalf("%s on %s: %v", what, h1.Name, err)
	}
	edited := time.Now()
	if err := w.check(0); err != nil {
		t.Logf("%s on %s: %v", what, h1.Name, err)
	} else if mustChange {
		t.Fatalf("%s on %s changed nothing the test can see", what, h1.Name)
	} else {
		t.Logf("%s on %s left the vxlan state as it was", what, h1.Name)
	}
	eventually(t, h1.Name+" restored after "+what, func() error { return w.check(0) })
	t.Logf("%s: restored %v later", what, time.Since(edited).Round(time.Millisecond))
	ctx := testCtx(t, converge)
	for _, p := range [][2]int{{0, 1}, {1, 0}} {
		if err := w.hosts[p[0]].WaitPing(ctx, w.envs[p[0]].Subnet.Addr(), w.envs[p[1]].Subnet.Addr()); err != nil {
			t.Errorf("after %s: %v", what, err)
		}
	}
	if h1.Daemon().Exited() {
		t.Fatalf("flanneld on %s exited after %s", h1.Name, what)
	}
}

// TestEtcdCluster runs daemons against a three-member etcd cluster and
// stops, one at a time, the member host1's daemon is talking to: each time
// a new lease from another node still reaches host1's routes, and host1's
// lease renewal (due a minute after it was acquired, by
// --subnet-lease-renew-margin 1439) goes through with that member down. The
// lease is never lost.
func TestEtcdCluster(t *testing.T) {
	t.Parallel()
	l := newLab(t, 2, "")
	ctx := testCtx(t, 5*time.Minute)
	cl, err := etcdtest.NewCluster(3, etcdtest.WithNetNS(lanNSPath(l)), etcdtest.WithListen(l.EtcdAddr(), 0, 0), etcdtest.WithParentDir(l.Dir()))
	if err != nil {
		t.Fatalf("starting a 3-member etcd cluster: %v", err)
	}
	t.Cleanup(func() {
		if err := cl.Close(); err != nil {
			t.Errorf("closing the etcd cluster: %v", err)
		}
	})
	t.Cleanup(func() { stopAll(t, l) }) // before the cluster closes
	kapi := cl.KeysAPI()
	if _, err := kapi.Set(ctx, l.EtcdPrefix()+"/config", hostGWConfig, nil); err != nil {
		t.Fatal(err)
	}
	args := []string{"--etcd-endpoints", strings.Join(cl.Endpoints(), ","), "--subnet-lease-renew-margin", "1439", "-v=1"}
	h1, h2 := l.Host(1), l.Host(2)
	d1 := startDaemon(t, h1, args...)
	env1 := waitEnv(t, h1)
	key1 := leaseKey(l, env1.Subnet)
	getLease := func() (*client.Node, error) {
		resp, err := kapi.Get(ctx, key1, &client.GetOptions{Quorum: true})
		if err != nil {
			return nil, fmt.Errorf("reading host1's lease: %w", err)
		}
		return resp.Node, nil
	}
	first, err := getLease()
	if err != nil {
		t.Fatal(err)
	}
	if first.Expiration == nil {
		t.Fatalf("host1's lease %s has no TTL", key1)
	}
	renewDue := first.Expiration.Add(-1439 * time.Minute)
	t.Logf("host1 holds %s (createdIndex %d, modifiedIndex %d); renewal due in %v",
		env1.Subnet, first.CreatedIndex, first.ModifiedIndex, time.Until(renewDue).Round(time.Millisecond))

	for round := range 3 {
		m := memberTalkingTo(t, l, cl, h1)
		role := memberRole(cl.Member(m))
		stopped := time.Now()
		cl.Member(m).Stop()
		var sn netip.Prefix
		what := ""
		if round == 0 {
			startDaemon(t, h2, args...)
			sn = waitEnv(t, h2).Subnet.Masked()
			what = fmt.Sprintf("host2's daemon started and took %s (%v after the stop)", sn, time.Since(stopped).Round(time.Millisecond))
		} else {
			sn = faultSubnet(240 + round)
			pub := netip.AddrFrom4([4]byte{10, 250, 0, byte(200 + round)})
			key, value := fakeLeaseOf(l, "host-gw", sn, pub)
			if _, err := kapi.Set(ctx, key, value, &client.SetOptions{TTL: 24 * time.Hour}); err != nil {
				t.Fatalf("writing a lease with member m%d down: %v", m, err)
			}
			what = fmt.Sprintf("a fake node's lease %s written (%v after the stop)", sn, time.Since(stopped).Round(time.Millisecond))
		}
		took := waitRouteEverywhere(t, []*lab.Host{h1}, sn, stopped, converge)
		t.Logf("round %d: stopped member m%d (%s), the one host1 talked to; %s; host1 routed it %v after the stop",
			round+1, m, role, what, took[0].Round(time.Millisecond))
		if d1.Exited() {
			t.Fatalf("flanneld on host1 exited with member m%d down; log:\n%s", m, d1.Log())
		}
		if err := cl.Member(m).Restart(); err != nil {
			t.Fatal(err)
		}
	}

	// The renewal, with the member host1 talks to down.
	if wait := time.Until(renewDue) - 5*time.Second; wait > 0 {
		time.Sleep(wait)
	}
	m := memberTalkingTo(t, l, cl, h1)
	role := memberRole(cl.Member(m))
	cl.Member(m).Stop()
	t.Logf("stopped member m%d (%s), the one host1 talked to, %v before the renewal was due", m, role, time.Until(renewDue).Round(time.Millisecond))
	var renewed *client.Node
	waitFor(t, "host1's lease renewed", time.Until(renewDue)+90*time.Second, func() error {
		n, err := getLease()
		if err != nil {
			return err
		}
		if n.ModifiedIndex == first.ModifiedIndex {
			return fmt.Errorf("%s still at modifiedIndex %d", key1, n.ModifiedIndex)
		}
		renewed = n
		return nil
	})
	t.Logf("host1's lease renewed (modifiedIndex %d -> %d, TTL %d s) %v after it was due, with member m%d down",
		first.ModifiedIndex, renewed.ModifiedIndex, renewed.TTL, time.Since(renewDue).Round(time.Millisecond), m)
	if renewed.CreatedIndex != first.CreatedIndex {
		t.Errorf("host1's lease was created anew (createdIndex %d -> %d): it was lost on the way", first.CreatedIndex, renewed.CreatedIndex)
	}
	if renewed.Value != first.Value {
		t.Errorf("host1's lease value changed from %s to %s", first.Value, renewed.Value)
	}
	if renewed.TTL < int64((24*time.Hour-time.Minute)/time.Second) {
		t.Errorf("host1's renewed lease has TTL %d s, want about a day", renewed.TTL)
	}
	if err := cl.Member(m).Restart(); err != nil {
		t.Fatal(err)
	}
	if env, err := h1.ReadSubnetEnv(); err != nil || env.Subnet != env1.Subnet {
		t.Errorf("host1's subnet.env now says %v (%v), want subnet %s as at the start", env.Subnet, err, env1.Subnet)
	}
	if d1.Exited() {
		t.Fatalf("flanneld on host1 exited; log:\n%s", d1.Log())
	}
}

// memberRole says whether m leads its cluster, for the log.
func memberRole(m *etcdtest.Server) string {
	if m.IsLeader() {
		return "the leader"
	}
	return "a follower"
}

// memberTalkingTo returns the index of the cluster member that h's daemon
// has connections to (the first, if several), read from the sockets in the
// LAN namespace.
func memberTalkingTo(t *testing.T, l *lab.Lab, cl *etcdtest.Cluster, h *lab.Host) int {
	t.Helper()
	ports := map[string]int{}
	for i, ep := range cl.Endpoints() {
		ports[ep[strings.LastIndexByte(ep, ':')+1:]] = i
	}
	var found int
	waitFor(t, "a connection from "+h.Name+" to an etcd member", converge, func() error {
		out, err := exec.Command("ip", "netns", "exec", l.LANNamespace(), "ss", "-Htn", "state", "established").CombinedOutput()
		if err != nil {
			return fmt.Errorf("ss in the LAN namespace: %w: %s", err, out)
		}
		members := map[int]bool{}
		for _, line := range strings.Split(string(out), "\n") {
			f := strings.Fields(line)
			if len(f) < 4 {
				continue
			}
			local, err1 := netip.ParseAddrPort(f[2])
			peer, err2 := netip.ParseAddrPort(f[3])
			if err1 != nil || err2 != nil || peer.Addr() != h.Addr {
				continue
			}
			if i, ok := ports[strconv.Itoa(int(local.Port()))]; ok {
				members[i] = true
			}
		}
		if len(members) == 0 {
			return fmt.Errorf("no connection from %s to a member; sockets:\n%s", h.Addr, out)
		}
		found = slices.Min(slices.Collect(maps.Keys(members)))
		if len(members) > 1 {
			t.Logf("%s has connections to members %v; taking m%d", h.Name, members, found)
		}
		return nil
	})
	return found
}
