package e2e

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flanneld-go/flanneld/e2e/lab"
)

// envBenchV3Leases sets the lease count of BenchmarkControlPlaneStartV3.
const envBenchV3Leases = "FLANNEL_BENCH_V3_LEASES"

// writeLeasesV3 writes fake leases from..from+n-1 in the v3 keyspace, each
// attached to its own etcd lease of a day, as nodes write theirs.
func writeLeasesV3(ctx context.Context, c *clientv3.Client, l *lab.Lab, backend string, from, n int) error {
	return forLeases(n, func(i int) error {
		key, value := fakeLease(l, backend, from+i)
		g, err := c.Grant(ctx, int64((24 * time.Hour).Seconds()))
		if err == nil {
			_, err = c.Put(ctx, key, value, clientv3.WithLease(g.ID))
		}
		if err != nil {
			return fmt.Errorf("writing %s: %w", key, err)
		}
		return nil
	})
}

// BenchmarkControlPlaneRunningV3 is BenchmarkControlPlaneRunning on
// --etcd-api v3 (nexthop objects, the default route form): N leases written
// in the v3 keyspace while the daemon runs, until all are in the kernel.
func BenchmarkControlPlaneRunningV3(b *testing.B) {
	needRoot(b)
	n := envInts(b, envBenchNewLeases, benchMaxLeases-runningOffset, 5000)[0]
	for _, backend := range benchBackends {
		b.Run(fmt.Sprintf("%s/leases=%d", backend, n), func(b *testing.B) {
			l := benchLab(b, backend)
			c, err := l.V3Client()
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			if _, err := c.Put(ctx, l.EtcdPrefix()+"/config", benchConfig(backend)); err != nil {
				b.Fatal(err)
			}
			benchRunning(b, l, backend, n, benchWriter{
				write: func(ctx context.Context, from, n int) error { return writeLeasesV3(ctx, c, l, backend, from, n) },
				del: func(ctx context.Context, from, n int) error {
					return forLeases(n, func(i int) error {
						key, _ := fakeLease(l, backend, from+i)
						_, err := c.Delete(ctx, key)
						return err
					})
				},
			}, "--etcd-api", "v3")
		})
	}
}

// BenchmarkControlPlaneStartV3 is BenchmarkControlPlaneStart on the etcd v3
// API (--etcd-api v3): a daemon starts on a host with an empty kernel while
// the v3 keyspace holds N leases (default 5,000). It reports the time from
// starting the process until all N routes (for vxlan also the neighbours
// and fdb entries) are in the kernel, until the first route, and its memory (anon-MB: RssAnon; peak-MB: VmHWM).
func BenchmarkControlPlaneStartV3(b *testing.B) {
	needRoot(b)
	n := envInts(b, envBenchV3Leases, benchMaxLeases, 5000)[0]
	for _, backend := range benchBackends {
		b.Run(fmt.Sprintf("%s/leases=%d", backend, n), func(b *testing.B) {
			l := benchLab(b, backend)
			h := l.Host(1)
			c, err := l.V3Client()
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
			defer cancel()
			if _, err := c.Put(ctx, l.EtcdPrefix()+"/config", benchConfig(backend)); err != nil {
				b.Fatal(err)
			}
			began := time.Now()
			if err := writeLeasesV3(ctx, c, l, backend, 0, n); err != nil {
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
				d := startDaemon(b, h, "--etcd-api", "v3")
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

// grpcCounts reads, from the metrics of the lab's embedded etcd (it runs in
// this process), the gRPC calls started by method and the watch streams
// open now.
func grpcCounts(b *testing.B) (started map[string]float64, streams float64) {
	mfs, err := prometheus.DefaultGatherer.Gather()
	if err != nil {
		b.Fatal(err)
	}
	started = map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			switch mf.GetName() {
			case "grpc_server_started_total":
				for _, l := range m.GetLabel() {
					if l.GetName() == "grpc_method" {
						started[l.GetValue()] += m.GetCounter().GetValue()
					}
				}
			case "etcd_debugging_mvcc_watch_stream_total":
				streams += m.GetGauge().GetValue()
			}
		}
	}
	return started, streams
}

// BenchmarkIdleEtcdLoadV3 is BenchmarkIdleEtcdLoad on --etcd-api v3: a
// converged daemon with nothing changing, for FLANNEL_BENCH_IDLE (default
// 60 s). It reports the gRPC calls etcd saw per minute (by kind) and the
// watch streams the daemon keeps open, counted by the server.
func BenchmarkIdleEtcdLoadV3(b *testing.B) {
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
	c, err := l.V3Client()
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), converge)
	defer cancel()
	if _, err := c.Put(ctx, l.EtcdPrefix()+"/config", benchConfig("vxlan")); err != nil {
		b.Fatal(err)
	}
	if err := writeLeasesV3(ctx, c, l, "vxlan", runningOffset, 10); err != nil {
		b.Fatal(err)
	}
	c.Close() // only the daemon's streams count
	_, streams0 := grpcCounts(b)
	d := startDaemon(b, h, "--etcd-api", "v3")
	waitEnv(b, h)
	newKernelCounter(b, h, "vxlan").waitCount(b, d, 10, nil)
	time.Sleep(time.Second)

	calls := map[string]float64{}
	var streams float64
	var total time.Duration
	for b.Loop() {
		s1, _ := grpcCounts(b)
		time.Sleep(window)
		s2, st := grpcCounts(b)
		for m, n := range s2 {
			calls[m] += n - s1[m]
		}
		streams = st - streams0
		total += window
		if d.Exited() {
			b.Fatalf("flanneld exited; log:\n%s", tailLines(d.Log(), 30))
		}
	}
	perMin := func(n float64) float64 { return n / total.Minutes() }
	var all float64
	for _, n := range calls {
		all += n
	}
	b.ReportMetric(perMin(all), "req/min")
	b.ReportMetric(perMin(calls["Range"]), "range-req/min")
	b.ReportMetric(perMin(calls["LeaseKeepAlive"]+calls["Txn"]+calls["Put"]+calls["LeaseGrant"]), "write-req/min")
	b.ReportMetric(perMin(calls["Watch"]), "new-watch-streams/min")
	b.ReportMetric(streams, "watch-streams")
}
