package etcdv3

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/flanneld-go/flanneld/internal/etcdtest"
	"github.com/flanneld-go/flanneld/subnet"
)

func TestWatchAddRemove(t *testing.T) {
	srv := etcdtest.Start(t)
	c := v3(t, srv)
	put(t, c, "subnets/10.5.1.0-24", `{"PublicIP":"192.168.0.1","BackendType":"vxlan"}`, time.Hour)
	m, api := newTestManager(t, srv)
	col := startCollector(t, m)
	col.waitFor(t, map[netip.Prefix]string{pfx("10.5.1.0/24"): "192.168.0.1"})

	put(t, c, "subnets/10.5.2.0-24", `{"PublicIP":"192.168.0.2","BackendType":"vxlan"}`, time.Hour)
	// flannel v0.28's shape: PublicIPv6 null, VNI in BackendData; a dual-stack key.
	put(t, c, "subnets/10.5.3.0-24&fc00:0:0:3::-64", `{"PublicIP":"192.168.0.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"82:4b:b6:2f:54:4e"}}`, time.Hour)
	col.waitFor(t, map[netip.Prefix]string{pfx("10.5.1.0/24"): "192.168.0.1", pfx("10.5.2.0/24"): "192.168.0.2", pfx("10.5.3.0/24"): "192.168.0.3"})
	n := col.nBatches()
	// A renewal (same value, new etcd lease) is no event.
	put(t, c, "subnets/10.5.2.0-24", `{"PublicIP":"192.168.0.2","BackendType":"vxlan"}`, time.Hour)
	del(t, c, "subnets/10.5.1.0-24")
	col.waitFor(t, map[netip.Prefix]string{pfx("10.5.2.0/24"): "192.168.0.2", pfx("10.5.3.0/24"): "192.168.0.3"})
	if got := col.nBatches(); got != n+1 {
		t.Errorf("%d batches after a renewal and a delete, want 1 (the delete)", got-n)
	}
	if w := api.watches.Load(); w != 1 {
		t.Errorf("%d watches opened, want 1", w)
	}
}

func TestWatchEmptyFirstBatch(t *testing.T) {
	srv := etcdtest.Start(t)
	m, _ := newTestManager(t, srv)
	col := startCollector(t, m)
	eventually(t, "the first batch", func() bool { return col.nBatches() == 1 })
}

// TestWatchResyncAfterCompaction holds the watch from opening while leases
// change and the store is compacted past the listing: the watch must then
// re-list and send exactly the difference.
func TestWatchResyncAfterCompaction(t *testing.T) {
	srv := etcdtest.Start(t)
	c := v3(t, srv)
	for i := 1; i <= 5; i++ {
		put(t, c, fmt.Sprintf("subnets/10.5.%d.0-24", i), fmt.Sprintf(`{"PublicIP":"192.168.0.%d"}`, i), time.Hour)
	}
	m, api := newTestManager(t, srv)
	m.checkInterval = 0
	release := api.holdWatches()
	col := startCollector(t, m)
	eventually(t, "the first batch", func() bool { return col.nBatches() == 1 })
	eventually(t, "the watch to be held", func() bool { return api.watches.Load() == 1 })

	del(t, c, "subnets/10.5.1.0-24")
	put(t, c, "subnets/10.5.2.0-24", `{"PublicIP":"192.168.0.22"}`, time.Hour) // changed
	put(t, c, "subnets/10.5.3.0-24", `{"PublicIP":"192.168.0.3"}`, time.Hour)  // same value
	for i := 6; i <= 8; i++ {
		put(t, c, fmt.Sprintf("subnets/10.5.%d.0-24", i), fmt.Sprintf(`{"PublicIP":"192.168.0.%d"}`, i), time.Hour)
	}
	del(t, c, "subnets/10.5.7.0-24")
	last := put(t, c, "subnets/10.5.9.0-24", `{"PublicIP":"192.168.0.9"}`, time.Hour)
	if _, err := c.Compact(context.Background(), last.Header.Revision); err != nil {
		t.Fatal(err)
	}
	release()
	want := etcdSet(t, c)
	col.waitFor(t, want)
	// The resync batch holds exactly the difference.
	col.mu.Lock()
	batches := append([][]subnet.Event(nil), col.batches...)
	col.mu.Unlock()
	if len(batches) != 2 {
		t.Fatalf("%d batches, want 2 (the listing, the resync)", len(batches))
	}
	var got []string
	for _, e := range batches[1] {
		got = append(got, e.Type.String()+" "+e.Lease.Subnet.String())
	}
	wantEvs := "added 10.5.2.0/24,added 10.5.6.0/24,added 10.5.8.0/24,added 10.5.9.0/24,removed 10.5.1.0/24"
	if strings.Join(got, ",") != wantEvs {
		t.Errorf("resync = %s\nwant     %s", strings.Join(got, ","), wantEvs)
	}
}

func TestWatchSkipsGarbage(t *testing.T) {
	srv := etcdtest.Start(t)
	c := v3(t, srv)
	var logs []string
	m, _ := newTestManager(t, srv, func(o *Options) { o.Logger = captureLogger(&logs) })
	put(t, c, "subnets/10.5.1.0-24", `{"PublicIP":"192.168.0.1"}`, 0)
	put(t, c, "subnets/10.5.2.0-24", `{not json`, 0)
	put(t, c, "subnets/bogus", `{"PublicIP":"192.168.0.3"}`, 0)
	put(t, c, "subnets/sub/10.5.4.0-24", `{"PublicIP":"192.168.0.4"}`, 0)
	col := startCollector(t, m)
	col.waitFor(t, map[netip.Prefix]string{pfx("10.5.1.0/24"): "192.168.0.1"})
	// A lease that turns into garbage is removed; garbage that turns valid is added.
	put(t, c, "subnets/10.5.1.0-24", `{"PublicIP":"not an ip"}`, 0)
	put(t, c, "subnets/10.5.2.0-24", `{"PublicIP":"192.168.0.2"}`, 0)
	col.waitFor(t, map[netip.Prefix]string{pfx("10.5.2.0/24"): "192.168.0.2"})
	logMu.Lock()
	defer logMu.Unlock()
	skipped := 0
	for _, l := range logs {
		if strings.Contains(l, "Skipping a key") {
			skipped++
		}
	}
	if skipped != 4 {
		t.Errorf("%d skip lines, want 4 (three bad keys at listing, one bad update): %q", skipped, logs)
	}
}

// TestWatchBackoffWhileEtcdDown stops etcd for 3 s: the watch must not
// hammer it, and must resume (seeing what was written meanwhile) once it is
// back.
func TestWatchBackoffWhileEtcdDown(t *testing.T) {
	srv := etcdtest.Start(t)
	c := v3(t, srv)
	put(t, c, "config", testConfig, 0)
	put(t, c, "subnets/10.5.1.0-24", `{"PublicIP":"192.168.0.1"}`, 0)
	m, api := newTestManager(t, srv)
	col := startCollector(t, m)
	col.waitFor(t, map[netip.Prefix]string{pfx("10.5.1.0/24"): "192.168.0.1"})
	before := api.total()
	srv.Stop()
	time.Sleep(3 * time.Second)
	during := api.total() - before
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	put(t, c, "subnets/10.5.2.0-24", `{"PublicIP":"192.168.0.2"}`, 0)
	col.waitFor(t, map[netip.Prefix]string{pfx("10.5.1.0/24"): "192.168.0.1", pfx("10.5.2.0/24"): "192.168.0.2"})
	// The client's stream reconnects by itself; the manager makes no
	// request of its own while etcd is down.
	if during > 5 {
		t.Errorf("%d requests in 3 s of outage, want at most 5", during)
	}
	t.Logf("requests during the outage: %d; after: %d", during, api.total()-before-during)
}

// TestWatchNoticesWipe replaces the store with an empty one on the same
// endpoint: the watch must notice (the revision went back), re-list, and
// report every lease gone (our own too, so the daemon re-acquires) and the
// new ones.
func TestWatchNoticesWipe(t *testing.T) {
	srv := etcdtest.Start(t)
	c := v3(t, srv)
	put(t, c, "config", testConfig, 0)
	cfg := mustConfig(t, testConfig)
	for i := 1; i <= 5; i++ {
		put(t, c, fmt.Sprintf("subnets/10.5.%d.0-24", i), fmt.Sprintf(`{"PublicIP":"192.168.0.%d"}`, i), time.Hour)
	}
	m, _ := newTestManager(t, srv)
	own, err := m.AcquireLease(ctxT(t), cfg, attrsFor("192.168.0.100"), subnet.Lease{})
	if err != nil {
		t.Fatal(err)
	}
	col := startCollector(t, m)
	eventually(t, "the listing", func() bool { return len(col.snapshot()) == 6 })

	if err := srv.Wipe(); err != nil {
		t.Fatal(err)
	}
	put(t, c, "config", testConfig, 0)
	put(t, c, "subnets/10.5.20.0-24", `{"PublicIP":"192.168.0.20"}`, time.Hour)
	col.waitFor(t, map[netip.Prefix]string{pfx("10.5.20.0/24"): "192.168.0.20"})
	if col.removals(own.Subnet) != 1 {
		t.Errorf("own lease %v removed %d times, want once", own.Subnet, col.removals(own.Subnet))
	}
	if err := m.RenewLease(ctxT(t), own); !errors.Is(err, subnet.ErrLeaseLost) {
		t.Errorf("RenewLease on the wiped store = %v, want ErrLeaseLost", err)
	}
}

// TestWatchQuietCheck wipes the store under a watcher that does not check
// on reconnection: the quiet-watch check alone must find it.
func TestWatchQuietCheck(t *testing.T) {
	srv := etcdtest.Start(t)
	c := v3(t, srv)
	put(t, c, "config", testConfig, 0)
	for i := 1; i <= 3; i++ {
		put(t, c, fmt.Sprintf("subnets/10.5.%d.0-24", i), fmt.Sprintf(`{"PublicIP":"192.168.0.%d"}`, i), time.Hour)
	}
	m, api := newTestManager(t, srv)
	m.checkInterval, m.checkOnReconnect = 100*time.Millisecond, false
	col := startCollector(t, m)
	eventually(t, "the listing", func() bool { return len(col.snapshot()) == 3 })
	eventually(t, "quiet checks", func() bool { return api.gets.Load() >= 4 })
	if col.nBatches() != 1 {
		t.Fatalf("quiet checks of an unchanged store sent %d batches", col.nBatches()-1)
	}
	if err := srv.Wipe(); err != nil {
		t.Fatal(err)
	}
	col.waitFor(t, map[netip.Prefix]string{})
}

func TestWatchEndsOnCancel(t *testing.T) {
	srv := etcdtest.Start(t)
	m, _ := newTestManager(t, srv)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	events := make(chan []subnet.Event, 1)
	go func() { done <- m.WatchLeases(ctx, events) }()
	<-events
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("WatchLeases = %v, want context.Canceled", err)
	}
	m.Close()
	waitGoroutinesGone(t, "etcdv3.(*watcher)", "etcdv3.connectionReady")
}

func TestWatchStartsFromAcquireListing(t *testing.T) {
	srv := etcdtest.Start(t)
	c := v3(t, srv)
	put(t, c, "config", testConfig, 0)
	put(t, c, "subnets/10.5.1.0-24", `{"PublicIP":"192.168.0.1"}`, 0)
	m, api := newTestManager(t, srv)
	if _, err := m.AcquireLease(ctxT(t), mustConfig(t, testConfig), attrsFor("192.168.0.2"), subnet.Lease{}); err != nil {
		t.Fatal(err)
	}
	gets := api.gets.Load()
	// Written between the acquisition's listing and the watch: not missed.
	put(t, c, "subnets/10.5.3.0-24", `{"PublicIP":"192.168.0.3"}`, 0)
	col := startCollector(t, m)
	eventually(t, "three leases", func() bool { return len(col.snapshot()) == 3 })
	if api.gets.Load() != gets {
		t.Errorf("the first watch listed again (%d reads), want it to reuse the acquisition's listing", api.gets.Load()-gets)
	}
}

func TestWatchConfig(t *testing.T) {
	srv := etcdtest.Start(t)
	c := v3(t, srv)
	m, _ := newTestManager(t, srv)
	ctx, cancel := context.WithCancel(context.Background())
	updates := make(chan subnet.ConfigUpdate)
	done := make(chan error, 1)
	go func() { done <- m.WatchConfig(ctx, updates) }()
	next := func() subnet.ConfigUpdate {
		t.Helper()
		select {
		case u := <-updates:
			return u
		case <-time.After(30 * time.Second):
			t.Fatal("no config update")
		}
		return subnet.ConfigUpdate{}
	}
	if u := next(); !errors.Is(u.Err, subnet.ErrConfigMissing) {
		t.Fatalf("first update = %+v, want ErrConfigMissing", u)
	}
	put(t, c, "config", testConfig, 0)
	if u := next(); u.Err != nil || u.Config.Network != pfx("10.5.0.0/16") {
		t.Fatalf("after write: %+v", u)
	}
	put(t, c, "config", testConfig, 0) // same value: no update
	put(t, c, "config", `{"Network":"10.5.0.0/16","SubnetLen":31}`, 0)
	if u := next(); !errors.Is(u.Err, subnet.ErrInvalidConfig) {
		t.Fatalf("after invalid write: %+v", u)
	}
	put(t, c, "config", `{"Network":"10.6.0.0/16"}`, 0)
	if u := next(); u.Err != nil || u.Config.Network != pfx("10.6.0.0/16") {
		t.Fatalf("after change: %+v", u)
	}
	del(t, c, "config")
	if u := next(); !errors.Is(u.Err, subnet.ErrConfigMissing) {
		t.Fatalf("after delete: %+v", u)
	}
	put(t, c, "config", testConfig, 0)
	if u := next(); u.Err != nil {
		t.Fatalf("after writing it again: %+v", u)
	}
	// A wiped store (the client reconnects to it) has no config.
	if err := srv.Wipe(); err != nil {
		t.Fatal(err)
	}
	if u := next(); !errors.Is(u.Err, subnet.ErrConfigMissing) {
		t.Fatalf("after the wipe: %+v", u)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("WatchConfig = %v", err)
	}
}
