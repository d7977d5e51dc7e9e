package etcdv2

import (
	"context"
	"errors"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/flanneld-go/flanneld/internal/etcdtest"
	"github.com/flanneld-go/flanneld/internal/metrics"
	"github.com/flanneld-go/flanneld/subnet"
)

// TestWatchFollowsWipedStore: etcd loses its data and starts empty on the
// same endpoint, with an index far below the watch's cursor. The watch
// notices at its first request after the outage, reports every lease gone,
// and follows leases written afterwards (which an index-based long poll
// would wait for until the new store reached the old cursor).
func TestWatchFollowsWipedStore(t *testing.T) {
	srv := etcdtest.Start(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	for range 30 { // an index well above a fresh store's
		put(t, srv, "subnets/10.5.1.0-24", `{"PublicIP":"192.168.0.1"}`, time.Hour)
	}
	put(t, srv, "subnets/10.5.2.0-24", `{"PublicIP":"192.168.0.2"}`, time.Hour)
	m, _ := newTestManager(t, srv)
	c := startCollector(t, ctx, m)
	c.waitFor(t, map[netip.Prefix]string{pfx("10.5.1.0/24"): "192.168.0.1", pfx("10.5.2.0/24"): "192.168.0.2"})

	resets := metrics.StoreResets.Get()
	if err := srv.Wipe(); err != nil {
		t.Fatal(err)
	}
	c.waitFor(t, map[netip.Prefix]string{})
	put(t, srv, "subnets/10.5.3.0-24", `{"PublicIP":"192.168.0.3"}`, time.Hour)
	c.waitFor(t, map[netip.Prefix]string{pfx("10.5.3.0/24"): "192.168.0.3"})
	if !c.sawRemoved(pfx("10.5.1.0/24")) || !c.sawRemoved(pfx("10.5.2.0/24")) {
		t.Error("the leases the wipe lost were not reported Removed")
	}
	if metrics.StoreResets.Get() <= resets {
		t.Error("flannel_store_resets_total did not count the wipe")
	}
}

// TestWatchFollowsRestoredBackup: etcd goes back to an older backup. What
// was written after it is reported removed, what it holds stays, and later
// writes are followed.
func TestWatchFollowsRestoredBackup(t *testing.T) {
	srv := etcdtest.Start(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	put(t, srv, "subnets/10.5.1.0-24", `{"PublicIP":"192.168.0.1"}`, time.Hour)
	backup := filepath.Join(t.TempDir(), "backup")
	if err := srv.Backup(backup); err != nil {
		t.Fatal(err)
	}
	for range 20 {
		put(t, srv, "subnets/10.5.2.0-24", `{"PublicIP":"192.168.0.2"}`, time.Hour)
	}
	m, _ := newTestManager(t, srv)
	c := startCollector(t, ctx, m)
	c.waitFor(t, map[netip.Prefix]string{pfx("10.5.1.0/24"): "192.168.0.1", pfx("10.5.2.0/24"): "192.168.0.2"})

	if err := srv.RestoreBackup(backup); err != nil {
		t.Fatal(err)
	}
	c.waitFor(t, map[netip.Prefix]string{pfx("10.5.1.0/24"): "192.168.0.1"})
	put(t, srv, "subnets/10.5.4.0-24", `{"PublicIP":"192.168.0.4"}`, time.Hour)
	c.waitFor(t, map[netip.Prefix]string{pfx("10.5.1.0/24"): "192.168.0.1", pfx("10.5.4.0/24"): "192.168.0.4"})
}

// TestWatchConfig: the config as written, changed, made invalid, deleted
// and written again, each state sent once.
func TestWatchConfig(t *testing.T) {
	srv := etcdtest.Start(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	put(t, srv, "config", testConfig, 0)
	m, _ := newTestManager(t, srv)
	updates := make(chan subnet.ConfigUpdate, 10)
	done := make(chan error, 1)
	go func() { done <- m.WatchConfig(ctx, updates) }()
	next := func(what string) subnet.ConfigUpdate {
		t.Helper()
		select {
		case u := <-updates:
			return u
		case <-time.After(20 * time.Second):
			t.Fatalf("no update for %s", what)
			return subnet.ConfigUpdate{}
		}
	}
	if u := next("the first state"); u.Err != nil || u.Config.Network.String() != "10.5.0.0/16" {
		t.Fatalf("first update %+v", u)
	}
	put(t, srv, "config", `{"Network":"10.6.0.0/16","Backend":{"Type":"vxlan"}}`, 0)
	if u := next("a change"); u.Err != nil || u.Config.Network.String() != "10.6.0.0/16" {
		t.Fatalf("update after a change %+v", u)
	}
	put(t, srv, "config", `{"Network":"10.6.0.0/16","Backend":{"Type":"vxlan"}}`, 0) // same value: nothing
	put(t, srv, "config", `{"Network":`, 0)
	if u := next("an invalid value"); !errors.Is(u.Err, subnet.ErrInvalidConfig) {
		t.Fatalf("update after an invalid value %+v", u)
	}
	del(t, srv, "config")
	if u := next("a deletion"); !errors.Is(u.Err, subnet.ErrConfigMissing) {
		t.Fatalf("update after a deletion %+v", u)
	}
	put(t, srv, "config", testConfig, 0)
	if u := next("the config back"); u.Err != nil || u.Config.Network.String() != "10.5.0.0/16" {
		t.Fatalf("update after the config came back %+v", u)
	}
	select {
	case u := <-updates:
		t.Errorf("unexpected update %+v", u)
	default:
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("WatchConfig = %v, want context.Canceled", err)
	}
}

// TestWatchFirstBatchHasOwnLease: the first batch after AcquireLease holds
// the lease it wrote, so a store wiped before the watch saw that write still
// reports the own lease removed (the daemon then writes it again).
func TestWatchFirstBatchHasOwnLease(t *testing.T) {
	srv := etcdtest.Start(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	put(t, srv, "subnets/10.5.1.0-24", `{"PublicIP":"192.168.0.1"}`, time.Hour)
	m, _ := newTestManager(t, srv)
	l, err := m.AcquireLease(ctx, mustConfig(t, testConfig), attrsFor("192.168.0.2"), subnet.Lease{})
	if err != nil {
		t.Fatal(err)
	}
	c := startCollector(t, ctx, m)
	var first []subnet.Event
	eventually(t, "the first batch", func() bool { var ok bool; first, ok = c.firstBatch(); return ok })
	if got := evString(first); !strings.Contains(got, l.Subnet.String()) {
		t.Fatalf("first batch %q lacks the own lease %v", got, l.Subnet)
	}
	if err := srv.Wipe(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the own lease reported removed", func() bool { return c.sawRemoved(l.Subnet) })
}
