package subnet_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/flanneld-go/flanneld/internal/etcdtest"
	"github.com/flanneld-go/flanneld/subnet"
)

// TestEtcdClusterMemberDies watches through a three-member cluster and
// stops members one after the other (keeping a quorum): the watch carries
// on through the others, without a spurious re-list (the cluster did not go
// back), and sees what is written meanwhile.
func TestEtcdClusterMemberDies(t *testing.T) {
	for _, kind := range []string{"v2", "v3"} {
		t.Run(kind, func(t *testing.T) {
			cl := etcdtest.StartCluster(t, 3)
			s := &store{v2: kind == "v2", srv: cl.Member(0)}
			c, err := clientv3.New(clientv3.Config{Endpoints: cl.Endpoints(), DialTimeout: 10 * time.Second, Logger: zap.NewNop()})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			s.c, s.kapi = c, cl.KeysAPI()
			s.put(t, "config", testConfig, 0)
			s.put(t, "subnets/10.5.1.0-24", `{"PublicIP":"192.168.0.1"}`, time.Hour)
			m, _ := s.manager(t, func(o *subnet.EtcdOptions) { o.Endpoints = cl.Endpoints() })
			col := startCollector(t, m)
			want := map[netip.Prefix]string{pfx("10.5.1.0/24"): "192.168.0.1"}
			col.waitFor(t, want)
			for i := range 2 {
				cl.Member(i).Stop()
				sn := fmt.Sprintf("10.5.%d.0", i+2)
				// The first write after the leader died may time out while
				// the others elect a new one: retry it.
				eventually(t, "a write with a member down", func() bool {
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					defer cancel()
					key, value := testPrefix+"/subnets/"+sn+"-24", fmt.Sprintf(`{"PublicIP":"192.168.0.%d"}`, i+2)
					if s.v2 {
						_, err = s.kapi.Set(ctx, key, value, nil)
					} else {
						_, err = c.Put(ctx, key, value)
					}
					return err == nil
				})
				want[pfx(sn+"/24")] = fmt.Sprintf("192.168.0.%d", i+2)
				col.waitFor(t, want)
				if i == 0 {
					if err := cl.Member(0).Restart(); err != nil {
						t.Fatal(err)
					}
				}
			}
			if n := col.nBatches(); n != 3 {
				t.Errorf("%d batches, want 3 (the listing and one per write; no re-list)", n)
			}
		})
	}
}

// serverGauges reads, from the embedded etcd's metrics (registered in this
// process), the v3 watchers it serves and the gRPC calls it has started.
func serverGauges(t *testing.T) (watchers float64, started map[string]float64) {
	t.Helper()
	mfs, err := prometheus.DefaultGatherer.Gather()
	if err != nil {
		t.Fatal(err)
	}
	started = map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			switch mf.GetName() {
			case "etcd_debugging_mvcc_watcher_total":
				watchers += m.GetGauge().GetValue()
			case "grpc_server_started_total":
				for _, l := range m.GetLabel() {
					if l.GetName() == "grpc_method" {
						started[l.GetValue()] += m.GetCounter().GetValue()
					}
				}
			}
		}
	}
	return watchers, started
}

// TestEtcdIdleLoad runs a manager's WatchLeases and WatchConfig against an
// unchanging store, as a daemon does: no request at all while nothing
// changes (the quiet-watch check is once a minute; this window is
// shorter), and on embedded v3 two watchers on the server and no call.
func TestEtcdIdleLoad(t *testing.T) {
	stores(t, func(t *testing.T, s *store) {
		s.put(t, "config", testConfig, 0)
		s.put(t, "subnets/10.5.1.0-24", `{"PublicIP":"192.168.0.1"}`, time.Hour)
		serverSide := !s.v2 && s.srv != nil
		var watchers0 float64
		if serverSide {
			watchers0, _ = serverGauges(t)
		}
		m, api := s.manager(t)
		subnet.SetTiming(m, 0, time.Minute, 0, 0)
		col := startCollector(t, m)
		ctx, cancel := context.WithCancel(context.Background())
		updates := make(chan subnet.ConfigUpdate, 1)
		done := make(chan error, 1)
		go func() { done <- m.WatchConfig(ctx, updates) }()
		t.Cleanup(func() {
			cancel()
			if err := <-done; !errors.Is(err, context.Canceled) {
				t.Errorf("WatchConfig = %v", err)
			}
		})
		<-updates
		eventually(t, "the first batch", func() bool { return col.nBatches() == 1 })
		var started1 map[string]float64
		if serverSide {
			eventually(t, "two watchers on the server", func() bool { w, _ := serverGauges(t); return w-watchers0 == 2 })
			_, started1 = serverGauges(t)
		}
		// The watches' first calls and answers (v3: created): wait until
		// two half-second windows in a row see no request.
		for quiet, prev, deadline := 0, api.total(), time.Now().Add(10*time.Second); quiet < 2 && time.Now().Before(deadline); {
			time.Sleep(500 * time.Millisecond)
			if n := api.total(); n == prev {
				quiet++
			} else {
				quiet, prev = 0, n
			}
		}
		before := api.total()
		time.Sleep(3 * time.Second)
		if d := api.total() - before; d != 0 {
			t.Errorf("%d requests in 3 idle seconds, want none", d)
		}
		if serverSide {
			_, started2 := serverGauges(t)
			for method, n := range started2 {
				if n != started1[method] {
					t.Errorf("etcd saw %v %s calls in 3 idle seconds, want none", n-started1[method], method)
				}
			}
		}
	})
}

// benchLeases is how many leases BenchmarkEtcdWatchFirstBatch starts from.
const benchLeases = 5000

// BenchmarkEtcdWatchFirstBatch measures a new manager's WatchLeases from
// the call to its first batch (the whole set, parsed) with benchLeases
// leases in the store, each with a TTL as a node writes it: the part of a
// daemon's start that grows with the cluster.
func BenchmarkEtcdWatchFirstBatch(b *testing.B) {
	for _, kind := range []string{"v2", "v3"} {
		b.Run(kind, func(b *testing.B) {
			s := &store{v2: kind == "v2", srv: etcdtest.Start(b)}
			if s.v2 {
				s.kapi = s.srv.KeysAPI()
			} else {
				s.c = s.v3Client(b)
			}
			var wg sync.WaitGroup
			next := make(chan int)
			for range 64 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range next {
						s.put(b, fmt.Sprintf("subnets/10.%d.%d.0-24", (i+1)>>8, (i+1)&0xff),
							fmt.Sprintf(`{"PublicIP":"172.17.%d.%d","BackendType":"vxlan","BackendData":{"VtepMAC":"0e:00:00:00:%02x:%02x"}}`, (i+1)>>8, (i+1)&0xff, (i+1)>>8, (i+1)&0xff), subnet.EtcdLeaseTTL)
					}
				}()
			}
			for i := range benchLeases {
				next <- i
			}
			close(next)
			wg.Wait()
			b.ResetTimer()
			for b.Loop() {
				b.StopTimer()
				m, _ := s.manager(b)
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
				b.StartTimer()
			}
			b.ReportMetric(benchLeases, "leases")
		})
	}
}
