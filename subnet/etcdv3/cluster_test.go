package etcdv3

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/flanneld-go/flanneld/internal/etcdtest"
	"github.com/flanneld-go/flanneld/subnet"
)

func TestDeadEndpointIsSkipped(t *testing.T) {
	srv := etcdtest.Start(t)
	put(t, v3(t, srv), "config", testConfig, 0)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "http://" + l.Addr().String()
	l.Close() // nothing listens there now
	ctx := ctxT(t)
	// Only the dead one: the wait says why.
	var logs []string
	m, _ := newTestManager(t, srv, func(o *Options) {
		o.Endpoints, o.RequestTimeout, o.Logger = []string{dead}, 500*time.Millisecond, captureLogger(&logs)
	})
	short, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if _, err := m.GetNetworkConfig(short); err == nil {
		t.Fatal("GetNetworkConfig through a dead endpoint succeeded")
	}
	logMu.Lock()
	if !strings.Contains(strings.Join(logs, "\n"), "connection refused") {
		t.Errorf("the wait does not say the endpoint refused connections: %q", logs)
	}
	logMu.Unlock()
	for i := range 3 {
		m, _ := newTestManager(t, srv, func(o *Options) { o.Endpoints = []string{dead, srv.Endpoints()[0]} })
		cfg, err := m.GetNetworkConfig(ctx)
		if err != nil {
			t.Fatal(err)
		}
		lease, err := m.AcquireLease(ctx, cfg, attrsFor(fmt.Sprintf("192.168.0.%d", i+1)), subnet.Lease{})
		if err != nil {
			t.Fatalf("AcquireLease with one dead endpoint: %v", err)
		}
		if err := m.RenewLease(ctx, lease); err != nil {
			t.Fatalf("RenewLease with one dead endpoint: %v", err)
		}
	}
}

// TestClusterMemberDies watches through a three-member cluster and stops
// members one after the other (keeping a quorum): the watch carries on
// through the others, without a spurious re-list (the cluster did not go
// back), and sees what is written meanwhile.
func TestClusterMemberDies(t *testing.T) {
	cl := etcdtest.StartCluster(t, 3)
	c, err := clientv3.New(clientv3.Config{Endpoints: cl.Endpoints(), DialTimeout: 10 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	put(t, c, "config", testConfig, 0)
	put(t, c, "subnets/10.5.1.0-24", `{"PublicIP":"192.168.0.1"}`, time.Hour)
	m, _ := newTestManager(t, cl.Member(0), func(o *Options) { o.Endpoints = cl.Endpoints() })
	col := startCollector(t, m)
	want := map[netip.Prefix]string{pfx("10.5.1.0/24"): "192.168.0.1"}
	col.waitFor(t, want)
	for i := range 2 {
		cl.Member(i).Stop()
		sn := fmt.Sprintf("10.5.%d.0", i+2)
		// The first write after the leader died may time out while the
		// others elect a new one: the test's own client retries.
		var err error
		eventually(t, "a write with a member down", func() bool {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_, err = c.Put(ctx, testPrefix+"/subnets/"+sn+"-24", fmt.Sprintf(`{"PublicIP":"192.168.0.%d"}`, i+2))
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
}
