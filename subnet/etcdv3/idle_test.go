package etcdv3

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/flanneld-go/flanneld/internal/etcdtest"
	"github.com/flanneld-go/flanneld/subnet"
)

// serverGauges reads, from the embedded etcd's metrics (registered in this
// process), the watch streams and watchers it serves and the gRPC calls it
// has started by method.
func serverGauges(t *testing.T) (streams, watchers float64, started map[string]float64) {
	t.Helper()
	mfs, err := prometheus.DefaultGatherer.Gather()
	if err != nil {
		t.Fatal(err)
	}
	started = map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			switch mf.GetName() {
			case "etcd_debugging_mvcc_watch_stream_total":
				streams += m.GetGauge().GetValue()
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
	return streams, watchers, started
}

// TestIdleLoad runs a manager's WatchLeases and WatchConfig against an
// unchanging store, as a daemon does, and checks the load it puts on etcd:
// one watch stream carrying both watches, and no request at all while
// nothing changes (the quiet-watch check is once a minute; this window is
// shorter).
func TestIdleLoad(t *testing.T) {
	srv := etcdtest.Start(t)
	c := v3(t, srv)
	put(t, c, "config", testConfig, 0)
	put(t, c, "subnets/10.5.1.0-24", `{"PublicIP":"192.168.0.1"}`, time.Hour)
	streams0, watchers0, _ := serverGauges(t)

	m, api := newTestManager(t, srv)
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
	eventually(t, "two watchers on the server", func() bool {
		_, w, _ := serverGauges(t)
		return w-watchers0 == 2
	})
	before := api.total()
	_, _, started1 := serverGauges(t)
	time.Sleep(3 * time.Second)
	streams, watchers, started2 := serverGauges(t)
	if d := api.total() - before; d != 0 {
		t.Errorf("%d requests in 3 idle seconds, want none", d)
	}
	if streams-streams0 != 1 || watchers-watchers0 != 2 {
		t.Errorf("etcd serves %v watch streams with %v watchers for the manager, want 1 stream carrying 2", streams-streams0, watchers-watchers0)
	}
	for method, n := range started2 {
		if n != started1[method] {
			t.Errorf("etcd saw %v %s calls in 3 idle seconds, want none", n-started1[method], method)
		}
	}
}
