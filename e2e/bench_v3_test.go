package e2e

import (
	"context"
	"fmt"
	"testing"
	"time"

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

// BenchmarkControlPlaneStartV3 is BenchmarkControlPlaneStart on the etcd v3
// API (--etcd-api v3): a daemon starts on a host with an empty kernel while
// the v3 keyspace holds N leases (default 5,000). It reports the time from
// starting the process until all N routes (for vxlan also the neighbours
// and fdb entries) are in the kernel, until the first route, and the RSS.
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
				m := settledMemory(b, h, d)
				mem = memory{max(mem.RSS, m.RSS), max(mem.Peak, m.Peak), max(mem.Anon, m.Anon)}
				if code := stop(b, d); code != 0 {
					b.Fatalf("flanneld exited with %d after SIGTERM; log:\n%s", code, tailLines(d.Log(), 30))
				}
				b.StartTimer()
			}
			b.ReportMetric(ms(median(times)), "converge-ms")
			b.ReportMetric(ms(median(firsts)), "first-route-ms")
			b.ReportMetric(mem.RSS, "rss-MB")
			b.ReportMetric(mem.Peak, "peak-rss-MB")
			b.ReportMetric(mem.Anon, "anon-rss-MB")
		})
	}
}
