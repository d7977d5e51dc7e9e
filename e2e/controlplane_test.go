package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.etcd.io/etcd/client/v2"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/e2e/lab"
	"github.com/flanneld-go/flanneld/internal/etcdtest"
	"github.com/flanneld-go/flanneld/pkg/nlbatch"
)

// The control-plane benchmarks run one daemon against many leases of fake
// remote hosts written straight to etcd: nothing answers at the fake
// addresses, and no traffic is sent; only the kernel entries are counted.
//
// Sizes can be changed through the environment:
//
//	FLANNEL_BENCH_LEASES=1000,10000  leases for BenchmarkControlPlaneStart
//	FLANNEL_BENCH_NEW_LEASES=5000    leases written in BenchmarkControlPlaneRunning
//	FLANNEL_BENCH_IDLE=60s           the window of BenchmarkIdleEtcdLoad
const (
	envBenchLeases    = "FLANNEL_BENCH_LEASES"
	envBenchNewLeases = "FLANNEL_BENCH_NEW_LEASES"
	envBenchIdle      = "FLANNEL_BENCH_IDLE"
	// benchWriters is how many lease writes are in flight at once.
	benchWriters = 128
	// benchPoll is the pause between two counts of the kernel entries.
	benchPoll = 10 * time.Millisecond
	// benchMaxLeases is the number of /24 subnets of benchNetwork after the
	// first, less room for the daemon's own subnet.
	benchMaxLeases = 65000
	// runningOffset is the first fake lease index of the running
	// benchmark, past the first 100 free subnets the daemon picks from.
	runningOffset = 1000
)

var (
	// benchLAN is big enough for a distinct PublicIP per fake host, so that
	// every host-gw route has its own gateway, as on a real cluster.
	benchLAN = netip.MustParsePrefix("172.16.0.0/12")
	// benchNetwork holds 65,535 /24 subnets after the first.
	benchNetwork = netip.MustParsePrefix("10.0.0.0/8")
	// benchBackends are the backends the benchmarks compare.
	benchBackends = []string{"vxlan", "host-gw"}
	// benchRoutes are the route forms they compare: WIRE.md's plain routes
	// (--nexthop-objects=false), and routes through nexthop objects (the
	// default).
	benchRoutes = []struct{ name, flag string }{{"plain", "--nexthop-objects=false"}, {"nexthops", ""}}
)

// routeArgs is the daemon's command line for a route form.
func routeArgs(flag string, args ...string) []string {
	if flag != "" {
		args = append(args, flag)
	}
	return args
}

func benchConfig(backend string) string {
	return fmt.Sprintf(`{"Network":%q,"SubnetLen":24,"Backend":{"Type":%q}}`, benchNetwork, backend)
}

// fakeLease is the etcd key and value of fake host i (0-based): subnet
// 10.x.y.0/24 number i+1, PublicIP 172.17.0.0 + i + 1 (inside benchLAN,
// away from the lab's own hosts in 172.16.0.x) and, for vxlan, a distinct
// locally administered VtepMAC.
func fakeLease(l *lab.Lab, backend string, i int) (key, value string) {
	n := uint32(i + 1)
	sn := netip.AddrFrom4([4]byte{10, byte(n >> 8), byte(n), 0})
	pub := netip.AddrFrom4([4]byte{172, 17 + byte(n>>16), byte(n >> 8), byte(n)})
	key = fmt.Sprintf("%s/subnets/%s-24", l.EtcdPrefix(), sn)
	if backend == "vxlan" {
		value = fmt.Sprintf(`{"PublicIP":"%s","BackendType":"vxlan","BackendData":{"VtepMAC":"0e:00:00:%02x:%02x:%02x"}}`,
			pub, byte(n>>16), byte(n>>8), byte(n))
	} else {
		value = fmt.Sprintf(`{"PublicIP":"%s","BackendType":%q}`, pub, backend)
	}
	return key, value
}

// benchLab builds a one-host lab on benchLAN with the backend's config.
func benchLab(b *testing.B, backend string) *lab.Lab {
	b.Helper()
	needRoot(b)
	bin := lab.BuildDaemon(b)
	l := lab.Start(b, lab.Options{Hosts: 1, DaemonPath: bin, LAN: benchLAN, Logf: func(string, ...any) {}})
	b.Cleanup(func() { stopAll(b, l) })
	ctx, cancel := context.WithTimeout(context.Background(), converge)
	defer cancel()
	if err := l.SetConfig(ctx, benchConfig(backend)); err != nil {
		b.Fatal(err)
	}
	return l
}

// benchKeys is a v2 keys API with a connection per writer, so that the
// writers do not dial (into the LAN namespace) for every request.
func benchKeys(b *testing.B, l *lab.Lab) client.KeysAPI {
	tr := &http.Transport{Proxy: nil, DialContext: l.Etcd().DialContext, MaxIdleConnsPerHost: benchWriters}
	b.Cleanup(tr.CloseIdleConnections)
	c, err := client.New(client.Config{Endpoints: l.Etcd().Endpoints(), Transport: tr})
	if err != nil {
		b.Fatal(err)
	}
	return client.NewKeysAPI(c)
}

// forLeases runs op(0) .. op(n-1) on benchWriters goroutines and returns
// the first error; after an error no further op starts.
func forLeases(n int, op func(i int) error) error {
	next := make(chan int)
	var (
		wg    sync.WaitGroup
		once  sync.Once
		first error
	)
	stop := make(chan struct{})
	for range min(benchWriters, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				if err := op(i); err != nil {
					once.Do(func() { first = err; close(stop) })
				}
			}
		}()
	}
feed:
	for i := range n {
		select {
		case next <- i:
		case <-stop:
			break feed
		}
	}
	close(next)
	wg.Wait()
	return first
}

// writeLeases writes fake leases from..from+n-1 with the TTL a node gives
// its own.
func writeLeases(ctx context.Context, kapi client.KeysAPI, l *lab.Lab, backend string, from, n int) error {
	return forLeases(n, func(i int) error {
		key, value := fakeLease(l, backend, from+i)
		if _, err := kapi.Set(ctx, key, value, &client.SetOptions{TTL: 24 * time.Hour}); err != nil {
			return fmt.Errorf("writing %s: %w", key, err)
		}
		return nil
	})
}

// deleteLeases deletes fake leases from..from+n-1.
func deleteLeases(ctx context.Context, kapi client.KeysAPI, l *lab.Lab, backend string, from, n int) error {
	return forLeases(n, func(i int) error {
		key, _ := fakeLease(l, backend, from+i)
		if _, err := kapi.Delete(ctx, key, nil); err != nil {
			return fmt.Errorf("deleting %s: %w", key, err)
		}
		return nil
	})
}

// kernelCounter counts the entries the daemon programs in one host, with
// one netlink socket for the whole benchmark.
type kernelCounter struct {
	backend string
	nh      *nlbatch.Handle // its dumps decode without allocating: light polling
	ext     int             // eth0's index
}

func newKernelCounter(b *testing.B, h *lab.Host, backend string) *kernelCounter {
	ns, err := netns.GetFromPath(nsPath(h))
	if err != nil {
		b.Fatalf("opening namespace of %s: %v", h.Name, err)
	}
	defer ns.Close()
	nh, err := nlbatch.NewHandleAt(ns)
	if err != nil {
		b.Fatalf("opening netlink in %s: %v", h.Name, err)
	}
	b.Cleanup(nh.Close)
	eth0, err := nh.LinkByName(lab.ExternalIface)
	if err != nil {
		b.Fatalf("finding %s on %s: %v", lab.ExternalIface, h.Name, err)
	}
	return &kernelCounter{backend: backend, nh: nh, ext: eth0.Attrs().Index}
}

// entryCounts is what a host holds for the remote leases.
type entryCounts struct {
	Routes, Neighs, FDB int
}

// count counts the routes into benchNetwork with a gateway through the
// backend's device and, for vxlan, the permanent neighbours and the fdb
// entries of flannel.1. Routes come first and the rest only once all n
// routes are in: the vxlan backend adds a lease's route after its
// neighbour and fdb entry, and counting less keeps the polling light.
func (c *kernelCounter) count(n int) (entryCounts, error) {
	var ec entryCounts
	dev := c.ext
	if c.backend == "vxlan" {
		l, err := c.nh.LinkByName(vxlanDev)
		if errors.As(err, new(netlink.LinkNotFoundError)) {
			return ec, nil
		}
		if err != nil {
			return ec, err
		}
		dev = l.Attrs().Index
	}
	err := c.nh.ListRoutes(func(r *nlbatch.Route) bool {
		if r.Table == unix.RT_TABLE_MAIN && r.LinkIndex == dev && r.Gw.IsValid() && r.Dst.Bits() > benchNetwork.Bits() && benchNetwork.Contains(r.Dst.Addr()) {
			ec.Routes++
		}
		return true
	})
	if err != nil || c.backend != "vxlan" || ec.Routes != n {
		return ec, err
	}
	err = c.nh.ListNeighs(unix.AF_INET, dev, func(nb *nlbatch.Neigh) bool {
		if nb.State == unix.NUD_PERMANENT {
			ec.Neighs++
		}
		return true
	})
	if err != nil {
		return ec, err
	}
	err = c.nh.ListNeighs(unix.AF_BRIDGE, dev, func(f *nlbatch.Neigh) bool {
		if f.Flags&netlink.NTF_SELF != 0 {
			ec.FDB++
		}
		return true
	})
	return ec, err
}

// complete reports whether ec holds exactly the entries of n leases.
func (c *kernelCounter) complete(ec entryCounts, n int) bool {
	if c.backend == "vxlan" {
		return ec == entryCounts{Routes: n, Neighs: n, FDB: n}
	}
	return ec.Routes == n
}

// waitCount polls the kernel every benchPoll (longer when counting takes
// long) until it holds exactly the entries of n leases, and returns when it
// first saw them and when it first saw a route into benchNetwork (the zero
// time for n = 0). It fails the benchmark if d exits or nothing converges
// within a deadline that grows with n. When abort is closed it returns zero
// times at once.
func (c *kernelCounter) waitCount(b *testing.B, d *lab.Daemon, n int, abort <-chan struct{}) (done, firstRoute time.Time) {
	begin := time.Now()
	deadline := begin.Add(2*time.Minute + time.Duration(n)*10*time.Millisecond)
	var last entryCounts
	for {
		t := time.Now()
		ec, err := c.count(n)
		now := time.Now()
		// Counting competes with the daemon for the two CPUs: keep it
		// to a third of one.
		pause := max(benchPoll, 2*now.Sub(t))
		switch {
		case errors.Is(err, netlink.ErrDumpInterrupted):
		case err != nil:
			b.Fatalf("counting kernel entries: %v", err)
		case c.complete(ec, n):
			if firstRoute.IsZero() && n > 0 {
				firstRoute = now
			}
			return now, firstRoute
		default:
			last = ec
			if firstRoute.IsZero() && ec.Routes > 0 {
				firstRoute = now
			}
		}
		if d != nil && d.Exited() {
			b.Fatalf("flanneld exited; log:\n%s", tailLines(d.Log(), 30))
		}
		if now.After(deadline) {
			b.Fatalf("the kernel holds %+v after %v, want the entries of %d leases", last, time.Since(begin).Round(time.Second), n)
		}
		select {
		case <-abort:
			return time.Time{}, time.Time{}
		case <-time.After(pause):
		}
	}
}

func tailLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// clearKernel removes what the daemon programmed, so that the next start
// programs everything again: the vxlan device (with its neighbours, fdb
// entries and routes) or the host-gw routes.
func (c *kernelCounter) clearKernel(b *testing.B, h *lab.Host) {
	// Nexthop objects (the default route form), with their routes (ip
	// route flush cannot delete those).
	if out, err := h.Exec(context.Background(), "ip", "nexthop", "flush"); err != nil && !strings.Contains(out, "Nothing to flush") {
		b.Fatal(err)
	}
	if c.backend == "vxlan" {
		l, err := c.nh.LinkByName(vxlanDev)
		if err == nil {
			err = c.nh.LinkDel(l)
		}
		if err != nil && !errors.As(err, new(netlink.LinkNotFoundError)) {
			b.Fatalf("deleting %s: %v", vxlanDev, err)
		}
	} else if _, err := h.Exec(context.Background(), "ip", "route", "flush", "root", benchNetwork.String()); err != nil {
		b.Fatal(err)
	}

	for {
		ec, err := c.count(0)
		if err == nil && ec == (entryCounts{}) {
			return
		}
		if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
			b.Fatalf("counting kernel entries: %v", err)
		}
		time.Sleep(benchPoll)
	}
}

// memory is a daemon's memory use, in MiB, from /proc/PID/status: what it
// allocated (RssAnon) and its peak (VmHWM). VmRSS is left out: it also
// counts the binary's file pages, which the kernel shares and can drop.
type memory struct {
	Anon float64 // RssAnon: resident heap, stacks and runtime
	Peak float64 // VmHWM: the most ever resident (file pages included)
	// IdleCPU is the CPU time (user and system, in ms) the daemon used
	// per minute while it settled: resyncs, probes, garbage collection.
	IdleCPU float64
}

// report adds m as the metrics anon-MB, peak-MB and idle-cpu-ms/min.
func (m memory) report(b *testing.B) {
	b.ReportMetric(m.Anon, "anon-MB")
	b.ReportMetric(m.Peak, "peak-MB")
	b.ReportMetric(m.IdleCPU, "idle-cpu-ms/min")
}

// memorySettle is how long after subnet.env a daemon's memory is read: past
// two route resyncs (--route-resync, 10 s by default). Read a second after
// start, RssAnon was 5 to 6 MB lower at 10,000 leases than once the daemon
// had resynced: a resync's kernel dumps grow the heap, and the runtime keeps
// that memory for the next ones. The figure is the running daemon's, not a
// moment of start-up. The start benchmarks read it for the daemon of their
// first iteration only.
const memorySettle = 25 * time.Second

// settledMemory waits for d to be ready (subnet.env written) and
// memorySettle more, then reads its memory.
func settledMemory(b *testing.B, h *lab.Host, d *lab.Daemon) memory {
	waitEnv(b, h)
	cpu0, err := readCPU(d.Pid())
	if err != nil {
		b.Fatal(err)
	}
	time.Sleep(memorySettle)
	m, err := readMemory(d.Pid())
	if err != nil {
		b.Fatal(err)
	}
	cpu1, err := readCPU(d.Pid())
	if err != nil {
		b.Fatal(err)
	}
	m.IdleCPU = float64((cpu1 - cpu0).Milliseconds()) * float64(time.Minute) / float64(memorySettle)
	return m
}

// clockTicks is the kernel's USER_HZ, the unit of /proc/PID/stat's times
// (100 on every Linux architecture Go supports).
const clockTicks = 100

// readCPU returns the CPU time (user and system) process pid has used.
func readCPU(pid int) (time.Duration, error) {
	raw, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0, err
	}
	// The command is in parentheses and may hold spaces; the fields after
	// it start with the state (field 3); utime and stime are 14 and 15.
	_, rest, ok := strings.Cut(string(raw), ") ")
	f := strings.Fields(rest)
	if !ok || len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	var ticks int64
	for _, s := range f[11:13] {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
		}
		ticks += n
	}
	return time.Duration(ticks) * time.Second / clockTicks, nil
}

func readMemory(pid int) (memory, error) {
	var m memory
	raw, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		return m, err
	}
	found := 0
	for _, line := range strings.Split(string(raw), "\n") {
		name, rest, ok := strings.Cut(line, ":")
		var dst *float64
		switch name {
		case "VmHWM":
			dst = &m.Peak
		case "RssAnon":
			dst = &m.Anon
		}
		if !ok || dst == nil {
			continue
		}
		kb, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(rest), " kB"))
		if err != nil {
			return m, fmt.Errorf("parsing %s %q: %w", name, rest, err)
		}
		*dst = float64(kb) / 1024
		found++
	}
	if found != 2 {
		return m, fmt.Errorf("/proc/%d/status lacks VmHWM or RssAnon", pid)
	}
	return m, nil
}

// envInts reads a comma-separated list of lease counts, each at most
// limit, from the environment, or returns def.
func envInts(b *testing.B, name string, limit int, def ...int) []int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	var out []int
	for _, f := range strings.Split(v, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 || n > limit {
			b.Fatalf("%s=%q: want lease counts from 1 to %d, comma-separated", name, v, limit)
		}
		out = append(out, n)
	}
	return out
}

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// BenchmarkControlPlaneStart measures a daemon starting on a host with an
// empty kernel while etcd holds the leases of N remote hosts: the time from
// starting the process until all N routes (for vxlan also the neighbours
// and fdb entries) are in the kernel, and the daemon's memory then (anon-MB: RssAnon; peak-MB: VmHWM).
func BenchmarkControlPlaneStart(b *testing.B) {
	needRoot(b)
	sizes := envInts(b, envBenchLeases, benchMaxLeases, 1000, 10000)
	for _, backend := range benchBackends {
		for _, rf := range benchRoutes {
			for _, n := range sizes {
				b.Run(fmt.Sprintf("%s/%s/leases=%d", backend, rf.name, n), func(b *testing.B) {
					l := benchLab(b, backend)
					h := l.Host(1)
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
					defer cancel()
					began := time.Now()
					if err := writeLeases(ctx, benchKeys(b, l), l, backend, 0, n); err != nil {
						b.Fatal(err)
					}
					b.Logf("wrote %d leases in %v", n, time.Since(began).Round(time.Millisecond))
					kc := newKernelCounter(b, h, backend)

					var times, firsts []time.Duration
					var mem memory
					for b.Loop() {
						b.StopTimer()
						kc.clearKernel(b, h)
						b.StartTimer()
						begin := time.Now()
						d := startDaemon(b, h, routeArgs(rf.flag)...)
						done, first := kc.waitCount(b, d, n, nil)
						b.StopTimer()
						times = append(times, done.Sub(begin))
						firsts = append(firsts, first.Sub(begin))
						if mem == (memory{}) { // the first daemon: settling takes memorySettle
							mem = settledMemory(b, h, d)
						}
						if code := stop(b, d); code != 0 {
							b.Fatalf("flanneld exited with %d after SIGTERM; log:\n%s", code, tailLines(d.Log(), 30))
						}
						b.StartTimer()
					}
					b.ReportMetric(ms(median(times)), "converge-ms")
					b.ReportMetric(ms(median(firsts)), "first-route-ms")
					mem.report(b)
				})
			}
		}
	}
}

// BenchmarkControlPlaneRunning measures a running, converged daemon
// following N leases written at once (by many writers): the time from the
// last write returning until all N leases are in the kernel, and from the
// first write starting. The leases are deleted again between iterations.
func BenchmarkControlPlaneRunning(b *testing.B) {
	needRoot(b)
	n := envInts(b, envBenchNewLeases, benchMaxLeases-runningOffset, 5000)[0]
	for _, backend := range benchBackends {
		for _, rf := range benchRoutes {
			b.Run(fmt.Sprintf("%s/%s/leases=%d", backend, rf.name, n), func(b *testing.B) {
				l := benchLab(b, backend)
				kapi := benchKeys(b, l)
				benchRunning(b, l, backend, n, benchWriter{
					write: func(ctx context.Context, from, n int) error { return writeLeases(ctx, kapi, l, backend, from, n) },
					del:   func(ctx context.Context, from, n int) error { return deleteLeases(ctx, kapi, l, backend, from, n) },
				}, routeArgs(rf.flag)...)
			})
		}
	}
}

// benchWriter writes and deletes the fake leases from..from+n-1 in one
// keyspace.
type benchWriter struct {
	write, del func(ctx context.Context, from, n int) error
}

// benchRunning is the body of the running benchmarks: a converged daemon
// (args added to its command line) follows n leases written at once, then
// their removal, each iteration.
func benchRunning(b *testing.B, l *lab.Lab, backend string, n int, w benchWriter, args ...string) {
	h := l.Host(1)
	kc := newKernelCounter(b, h, backend)
	d := startDaemon(b, h, append(args, "--healthz-port", strconv.Itoa(benchMetricsPort))...)
	env := waitEnv(b, h)
	if a := env.Subnet.Addr().As4(); a[0] == 10 {
		if i := (int(a[1])<<8 | int(a[2])) - 1; i >= runningOffset && i < runningOffset+n {
			b.Fatalf("the daemon's lease %s is among the fake ones", env.Subnet)
		}
	}
	kc.waitCount(b, d, 0, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	var afterLast, afterFirst, writing []time.Duration
	var applies, applySeconds, resyncs float64
	for b.Loop() {
		m0 := scrapeMetrics(b, h)
		abort := make(chan struct{})
		var t0, t1 time.Time
		var werr error
		wrote := make(chan struct{})
		go func() {
			defer close(wrote)
			t0 = time.Now()
			werr = w.write(ctx, runningOffset, n)
			t1 = time.Now()
			if werr != nil {
				close(abort)
			}
		}()
		tDone, _ := kc.waitCount(b, d, n, abort)
		<-wrote
		b.StopTimer()
		if werr != nil {
			b.Fatal(werr)
		}
		afterLast = append(afterLast, max(tDone.Sub(t1), 0))
		afterFirst = append(afterFirst, tDone.Sub(t0))
		writing = append(writing, t1.Sub(t0))
		m1 := scrapeMetrics(b, h)
		applies += m1[metricApplies] - m0[metricApplies]
		applySeconds += m1[metricApplySeconds] - m0[metricApplySeconds]
		resyncs += m1[metricResyncs] - m0[metricResyncs]
		if err := w.del(ctx, runningOffset, n); err != nil {
			b.Fatal(err)
		}
		kc.waitCount(b, d, 0, nil)
		b.StartTimer()
	}
	b.ReportMetric(ms(median(afterLast)), "after-last-write-ms")
	b.ReportMetric(ms(median(afterFirst)), "after-first-write-ms")
	b.ReportMetric(ms(median(writing)), "writing-ms")
	iters := float64(len(afterLast))
	b.ReportMetric(applies/iters, "applies")
	b.ReportMetric(applySeconds*1000/iters, "apply-ms")
	b.ReportMetric(resyncs/iters, "watch-resyncs")
	m := settledMemory(b, h, d)
	m.report(b)
}

const (
	// benchMetricsPort is the daemon's --healthz-port in the benchmarks.
	benchMetricsPort = 18473
	// The daemon's metrics the running benchmark reports.
	metricApplies      = "flannel_reconcile_duration_seconds_count"
	metricApplySeconds = "flannel_reconcile_duration_seconds_sum"
	metricResyncs      = "flannel_watch_resyncs_total"
)

// scrapeMetrics reads the daemon's unlabelled metrics from /metrics.
func scrapeMetrics(b *testing.B, h *lab.Host) map[string]float64 {
	ctx, cancel := context.WithTimeout(context.Background(), converge)
	defer cancel()
	url := fmt.Sprintf("http://%s/metrics", netip.AddrPortFrom(h.Addr, benchMetricsPort))
	code, body, err := httpGet(ctx, h, url)
	if err == nil && code != http.StatusOK {
		err = fmt.Errorf("%w: GET %s: %d", errStatus, url, code)
	}
	if err != nil {
		b.Fatal(err)
	}
	m := map[string]float64{}
	for _, line := range strings.Split(body, "\n") {
		name, v, ok := strings.Cut(line, " ")
		if !ok || strings.HasPrefix(name, "#") || strings.Contains(name, "{") {
			continue
		}
		if f, err := strconv.ParseFloat(strings.TrimSpace(v), 64); err == nil {
			m[name] = f
		}
	}
	for _, k := range []string{metricApplies, metricApplySeconds, metricResyncs} {
		if _, ok := m[k]; !ok {
			b.Fatalf("the daemon's /metrics has no %s", k)
		}
	}
	return m
}

// etcdCounter is an HTTP proxy in front of the lab's etcd that counts the
// requests passing through it, by kind, and the connections.
type etcdCounter struct {
	watches, gets, writes, conns atomic.Int64
	url                          string
}

// counts returns the numbers so far.
func (c *etcdCounter) counts() (watches, gets, writes, conns int64) {
	return c.watches.Load(), c.gets.Load(), c.writes.Load(), c.conns.Load()
}

// startEtcdCounter starts the proxy on the etcd address in the LAN
// namespace, port 12379; daemons reach it as they reach etcd. It stops
// when the benchmark ends.
func startEtcdCounter(b *testing.B, l *lab.Lab) *etcdCounter {
	target, err := url.Parse(l.EtcdEndpoint())
	if err != nil {
		b.Fatal(err)
	}
	addr := netip.AddrPortFrom(l.EtcdAddr(), 12379)
	var ln net.Listener
	err = etcdtest.InNetNS(filepath.Join("/run/netns", l.LANNamespace()), func() error {
		var err error
		ln, err = net.Listen("tcp", addr.String())
		return err
	})
	if err != nil {
		b.Fatalf("listening on %s in %s: %v", addr, l.LANNamespace(), err)
	}
	c := &etcdCounter{url: "http://" + addr.String()}
	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.Transport = &http.Transport{Proxy: nil, DialContext: l.Etcd().DialContext}
	proxy.FlushInterval = -1 // a long poll's headers and event go out at once
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			switch {
			case r.Method == http.MethodGet && r.URL.Query().Get("wait") == "true":
				c.watches.Add(1)
			case r.Method == http.MethodGet:
				c.gets.Add(1)
			default:
				c.writes.Add(1)
			}
			proxy.ServeHTTP(w, r)
		}),
		ConnState: func(_ net.Conn, s http.ConnState) {
			if s == http.StateNew {
				c.conns.Add(1)
			}
		},
		ReadHeaderTimeout: 10 * time.Second,
	}
	go srv.Serve(ln)
	b.Cleanup(func() { srv.Close() })
	return c
}

// BenchmarkIdleEtcdLoad counts the etcd requests of one idle, converged
// vxlan daemon (a few peers, nothing changing) through a counting proxy,
// and reports them per minute. The window defaults to a minute, the
// daemon's longest watch long poll, so that each long poll ending shows
// (FLANNEL_BENCH_IDLE changes it).
func BenchmarkIdleEtcdLoad(b *testing.B) {
	needRoot(b)
	window := time.Minute
	if v := os.Getenv(envBenchIdle); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < time.Second {
			b.Fatalf("%s=%q: want a duration of at least 1s, like 20s", envBenchIdle, v)
		}
		window = d
	}
	l := benchLab(b, "vxlan")
	h := l.Host(1)
	ctx, cancel := context.WithTimeout(context.Background(), converge)
	defer cancel()
	if err := writeLeases(ctx, benchKeys(b, l), l, "vxlan", runningOffset, 10); err != nil {
		b.Fatal(err)
	}
	c := startEtcdCounter(b, l)
	d := startDaemon(b, h, "--etcd-endpoints", c.url, "--etcd-api", "v2") // the proxy speaks HTTP/1: no v3
	waitEnv(b, h)
	newKernelCounter(b, h, "vxlan").waitCount(b, d, 10, nil)
	time.Sleep(time.Second) // let the first Apply's follow-ups settle
	w0, g0, s0, _ := c.counts()
	if w0 == 0 || g0 == 0 || s0 == 0 {
		b.Fatalf("the proxy saw %d watches, %d gets, %d writes while the daemon started: is it in the path?", w0, g0, s0)
	}

	var watches, gets, writes, conns int64
	var total time.Duration
	for b.Loop() {
		w1, g1, s1, c1 := c.counts()
		time.Sleep(window)
		w2, g2, s2, c2 := c.counts()
		watches, gets, writes, conns = watches+w2-w1, gets+g2-g1, writes+s2-s1, conns+c2-c1
		total += window
		if d.Exited() {
			b.Fatalf("flanneld exited; log:\n%s", tailLines(d.Log(), 30))
		}
	}
	perMin := func(n int64) float64 { return float64(n) / total.Minutes() }
	b.ReportMetric(perMin(watches+gets+writes), "req/min")
	b.ReportMetric(perMin(watches), "watch-req/min")
	b.ReportMetric(perMin(gets), "get-req/min")
	b.ReportMetric(perMin(writes), "write-req/min")
	b.ReportMetric(perMin(conns), "conns/min")
}
