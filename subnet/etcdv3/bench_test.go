package etcdv3

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flanneld-go/flanneld/internal/etcdtest"
	"github.com/flanneld-go/flanneld/subnet"
)

// benchLeases is how many leases BenchmarkWatchFirstBatch starts from.
const benchLeases = 5000

// writeBenchLeases writes n vxlan leases under testPrefix, each attached to
// its own etcd lease as a node writes it, with 64 writers.
func writeBenchLeases(b testing.TB, c *clientv3.Client, n int) {
	b.Helper()
	var wg sync.WaitGroup
	next := make(chan int)
	errs := make(chan error, 64)
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				g, err := c.Grant(context.Background(), int64(LeaseTTL/time.Second))
				if err == nil {
					key := fmt.Sprintf("%s/subnets/10.%d.%d.0-24", testPrefix, (i+1)>>8, (i+1)&0xff)
					val := fmt.Sprintf(`{"PublicIP":"172.17.%d.%d","BackendType":"vxlan","BackendData":{"VtepMAC":"0e:00:00:00:%02x:%02x"}}`, (i+1)>>8, (i+1)&0xff, (i+1)>>8, (i+1)&0xff)
					_, err = c.Put(context.Background(), key, val, clientv3.WithLease(g.ID))
				}
				if err != nil {
					select {
					case errs <- err:
					default:
					}
				}
			}
		}()
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	select {
	case err := <-errs:
		b.Fatalf("writing leases: %v", err)
	default:
	}
}

// BenchmarkWatchFirstBatch measures a new manager's WatchLeases from the
// call to its first batch (the whole set, parsed) with benchLeases leases in
// the v3 keyspace: the part of a daemon's start that grows with the cluster.
func BenchmarkWatchFirstBatch(b *testing.B) {
	srv := etcdtest.Start(b)
	c := v3(b, srv)
	writeBenchLeases(b, c, benchLeases)
	b.ResetTimer()
	for b.Loop() {
		b.StopTimer()
		m, _ := newTestManager(b, srv)
		ctx, cancel := context.WithCancel(context.Background())
		events := make(chan []subnet.Event)
		done := make(chan error, 1)
		b.StartTimer()
		go func() { done <- m.WatchLeases(ctx, events) }()
		evs := <-events
		b.StopTimer()
		if len(evs) != benchLeases {
			b.Fatalf("first batch has %d leases, want %d", len(evs), benchLeases)
		}
		cancel()
		<-done
		m.Close()
		b.StartTimer()
	}
	b.ReportMetric(benchLeases, "leases")
}
