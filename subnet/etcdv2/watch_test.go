package etcdv2

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	client "go.etcd.io/etcd/client/v2"

	"github.com/flanneld-go/flanneld/internal/etcdtest"
	"github.com/flanneld-go/flanneld/subnet"
)

// collector runs WatchLeases and folds the batches into a set.
type collector struct {
	mu      sync.Mutex
	set     map[netip.Prefix]string // subnet → PublicIP
	batches [][]subnet.Event
	removed map[netip.Prefix]bool
}

// startCollector watches with m until the test ends, then checks that
// WatchLeases returned context.Canceled.
func startCollector(t *testing.T, ctx context.Context, m *Manager) *collector {
	t.Helper()
	c := &collector{set: map[netip.Prefix]string{}, removed: map[netip.Prefix]bool{}}
	ctx, cancel := context.WithCancel(ctx)
	events := make(chan []subnet.Event)
	done := make(chan error, 1)
	go func() { done <- m.WatchLeases(ctx, events) }()
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		for {
			select {
			case evs := <-events:
				c.fold(evs)
			case <-ctx.Done():
				return
			}
		}
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if !errors.Is(err, context.Canceled) {
				t.Errorf("WatchLeases returned %v, want context.Canceled", err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("WatchLeases did not return after cancel")
		}
		<-readerDone
	})
	return c
}

func (c *collector) fold(evs []subnet.Event) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.batches = append(c.batches, evs)
	for _, e := range evs {
		if e.Type == subnet.EventAdded {
			c.set[e.Lease.Subnet] = e.Lease.Attrs.PublicIP.String()
		} else {
			delete(c.set, e.Lease.Subnet)
			c.removed[e.Lease.Subnet] = true
		}
	}
}

func (c *collector) snapshot() map[netip.Prefix]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return maps.Clone(c.set)
}

func (c *collector) waitFor(t *testing.T, want map[netip.Prefix]string) {
	t.Helper()
	eventually(t, fmt.Sprintf("watched set %v", want), func() bool { return maps.Equal(c.snapshot(), want) })
}

func (c *collector) sawRemoved(p netip.Prefix) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.removed[p]
}

func (c *collector) firstBatch() ([]subnet.Event, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.batches) == 0 {
		return nil, false
	}
	return c.batches[0], true
}

// etcdSet reads the leases in etcd that parse, as the watcher should see them.
func etcdSet(t *testing.T, srv *etcdtest.Server) map[netip.Prefix]string {
	t.Helper()
	set := map[netip.Prefix]string{}
	resp, err := srv.KeysAPI().Get(context.Background(), testPrefix+"/subnets", &client.GetOptions{Recursive: true})
	if etcdCode(err) == client.ErrorCodeKeyNotFound {
		return set
	}
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range flatten(resp.Node) {
		if e, err := parseNode(testPrefix+"/subnets", n); err == nil {
			set[e.subnet] = e.attrs.PublicIP.String()
		}
	}
	return set
}

func TestWatchAddRemove(t *testing.T) {
	srv := etcdtest.Start(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	put(t, srv, "subnets/10.5.1.0-24", `{"PublicIP":"192.168.0.1"}`, time.Hour)
	put(t, srv, "subnets/10.5.2.0-24", `{"PublicIP":"192.168.0.2"}`, 0)
	m, _ := newTestManager(t, srv)
	c := startCollector(t, ctx, m)
	c.waitFor(t, map[netip.Prefix]string{pfx("10.5.1.0/24"): "192.168.0.1", pfx("10.5.2.0/24"): "192.168.0.2"})
	first, _ := c.firstBatch()
	if got := evString(first); got != "+10.5.1.0/24@192.168.0.1 +10.5.2.0/24@192.168.0.2" {
		t.Errorf("first batch %q, want both leases Added in one batch", got)
	}
	for _, e := range first {
		if want := e.Lease.Subnet == pfx("10.5.2.0/24"); e.Lease.Reservation() != want {
			t.Errorf("%v: reservation %v, want %v", e.Lease.Subnet, e.Lease.Reservation(), want)
		}
	}

	put(t, srv, "subnets/10.5.3.0-24", `{"PublicIP":"192.168.0.3"}`, time.Hour)
	c.waitFor(t, map[netip.Prefix]string{pfx("10.5.1.0/24"): "192.168.0.1", pfx("10.5.2.0/24"): "192.168.0.2", pfx("10.5.3.0/24"): "192.168.0.3"})
	del(t, srv, "subnets/10.5.1.0-24")
	put(t, srv, "subnets/10.5.2.0-24", `{"PublicIP":"192.168.0.22"}`, 0) // changed
	c.waitFor(t, map[netip.Prefix]string{pfx("10.5.2.0/24"): "192.168.0.22", pfx("10.5.3.0/24"): "192.168.0.3"})
	if !c.sawRemoved(pfx("10.5.1.0/24")) {
		t.Errorf("no Removed for the deleted lease")
	}
	// Expiry is a removal too.
	put(t, srv, "subnets/10.5.4.0-24", `{"PublicIP":"192.168.0.4"}`, time.Second)
	eventually(t, "the short lease to be seen", func() bool { return c.snapshot()[pfx("10.5.4.0/24")] != "" || c.sawRemoved(pfx("10.5.4.0/24")) })
	c.waitFor(t, map[netip.Prefix]string{pfx("10.5.2.0/24"): "192.168.0.22", pfx("10.5.3.0/24"): "192.168.0.3"})
	if !c.sawRemoved(pfx("10.5.4.0/24")) {
		t.Errorf("no Removed for the expired lease")
	}
}

func TestWatchEmptyFirstBatch(t *testing.T) {
	srv := etcdtest.Start(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	m, _ := newTestManager(t, srv)
	c := startCollector(t, ctx, m)
	eventually(t, "the first batch", func() bool { _, ok := c.firstBatch(); return ok })
	if first, _ := c.firstBatch(); len(first) != 0 {
		t.Errorf("first batch of a missing directory = %q, want empty", evString(first))
	}
	put(t, srv, "subnets/10.5.1.0-24", `{"PublicIP":"192.168.0.1"}`, time.Hour)
	c.waitFor(t, map[netip.Prefix]string{pfx("10.5.1.0/24"): "192.168.0.1"})
}

func countLogs(lines *[]string, substr string) int {
	logMu.Lock()
	defer logMu.Unlock()
	n := 0
	for _, l := range *lines {
		if strings.Contains(l, substr) {
			n++
		}
	}
	return n
}

func TestWatchResyncAfterIndexCleared(t *testing.T) {
	srv := etcdtest.Start(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	put(t, srv, "subnets/10.5.1.0-24", `{"PublicIP":"192.168.0.1"}`, time.Hour)
	put(t, srv, "subnets/10.5.2.0-24", `{"PublicIP":"192.168.0.2"}`, time.Hour)
	put(t, srv, "subnets/10.5.9.0-24", `garbage`, 0)
	var logs []string
	m, api := newTestManager(t, srv, func(o *Options) { o.Logger = captureLogger(&logs) })

	events := make(chan []subnet.Event) // read by hand: not reading stalls the watcher
	done := make(chan error, 1)
	go func() { done <- m.WatchLeases(ctx, events) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("WatchLeases returned %v, want context.Canceled", err)
		}
	})
	known := map[netip.Prefix]string{}
	var removed []netip.Prefix
	read := func() {
		t.Helper()
		select {
		case evs := <-events:
			for _, e := range evs {
				if e.Type == subnet.EventAdded {
					known[e.Lease.Subnet] = e.Lease.Attrs.PublicIP.String()
				} else {
					delete(known, e.Lease.Subnet)
					removed = append(removed, e.Lease.Subnet)
				}
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("no batch; known %v", known)
		}
	}
	read()
	if len(known) != 2 {
		t.Fatalf("first batch gave %v, want 2 leases", known)
	}

	// While the watcher is stalled: changes, then more than 1000 other writes.
	put(t, srv, "subnets/10.5.3.0-24", `{"PublicIP":"192.168.0.3"}`, time.Hour)
	del(t, srv, "subnets/10.5.1.0-24")
	put(t, srv, "subnets/10.5.2.0-24", `{"PublicIP":"192.168.0.22"}`, time.Hour)
	put(t, srv, "subnets/10.5.4.0-24", `{"PublicIP":"192.168.0.4"}`, time.Hour)
	put(t, srv, "subnets/not-a-key", `{"PublicIP":"192.168.0.5"}`, 0)
	for i := range 1100 {
		put(t, srv, "noise", fmt.Sprint(i), 0)
	}
	want := etcdSet(t, srv)
	if len(want) != 3 {
		t.Fatalf("etcd holds %v, want 3 valid leases", want)
	}
	for !maps.Equal(known, want) {
		read()
	}
	if api.gets.Load() < 2 {
		t.Errorf("%d listings, want a re-list after the index was cleared", api.gets.Load())
	}
	if !strings.Contains(fmt.Sprint(removed), "10.5.1.0/24") {
		t.Errorf("removed %v, want 10.5.1.0/24 among them", removed)
	}
	// Each bad key was logged once, although it was listed twice.
	if n := countLogs(&logs, "10.5.9.0-24"); n != 1 {
		t.Errorf("garbage value logged %d times, want 1", n)
	}
	if n := countLogs(&logs, "not-a-key"); n != 1 {
		t.Errorf("garbage key logged %d times, want 1", n)
	}

	// At rest, the watcher waits: one more change costs a handful of calls.
	before := api.total()
	put(t, srv, "subnets/10.5.5.0-24", `{"PublicIP":"192.168.0.55"}`, time.Hour)
	for known[pfx("10.5.5.0/24")] == "" {
		read()
	}
	if n := api.total() - before; n > 3 {
		t.Errorf("one change cost %d requests, want at most 3", n)
	}
}

func TestWatchSkipsGarbage(t *testing.T) {
	srv := etcdtest.Start(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	put(t, srv, "subnets/10.5.1.0-24", `garbage`, 0)
	var logs []string
	m, api := newTestManager(t, srv, func(o *Options) { o.Logger = captureLogger(&logs) })
	c := startCollector(t, ctx, m)
	eventually(t, "the first batch", func() bool { _, ok := c.firstBatch(); return ok })

	writes := 0
	for _, kv := range [][2]string{
		{"subnets/10.5.2.0-24", `{"PublicIP":"192.168.0.2"}`},
		{"subnets/10.5.2.0-24", `{"PublicIP":"not an ip"}`}, // no longer a lease
		{"subnets/garbage-key", `{"PublicIP":"192.168.0.3"}`},
		{"subnets/sub/10.5.3.0-24", `{"PublicIP":"192.168.0.3"}`},
		{"subnets/10.5.4.0-24", `{}`},
		{"subnets/10.5.5.0-24", `{"PublicIP":"192.168.0.5"}`},
	} {
		put(t, srv, kv[0], kv[1], time.Hour)
		writes++
	}
	c.waitFor(t, map[netip.Prefix]string{pfx("10.5.5.0/24"): "192.168.0.5"})
	if !c.sawRemoved(pfx("10.5.2.0/24")) {
		t.Errorf("a lease overwritten with garbage was not reported Removed")
	}
	// One poll per write (the subdirectory's creation is an event too), one
	// listing, nothing more: bad values are not retried.
	if polls, gets := api.polls.Load(), api.gets.Load(); polls > int64(writes)+3 || gets != 1 {
		t.Errorf("%d polls and %d listings for %d writes: the watcher retries", polls, gets, writes)
	}
	for _, k := range []string{"10.5.1.0-24", "10.5.2.0-24", "garbage-key", "sub/10.5.3.0-24", "10.5.4.0-24"} {
		if n := countLogs(&logs, k+`"`); n != 1 {
			t.Errorf("%s logged %d times, want 1", k, n)
		}
	}
}

func TestWatchBackoffWhileEtcdDown(t *testing.T) {
	srv := etcdtest.Start(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	put(t, srv, "subnets/10.5.1.0-24", `{"PublicIP":"192.168.0.1"}`, time.Hour)
	var logs []string
	m, api := newTestManager(t, srv, func(o *Options) { o.Logger = captureLogger(&logs) })
	// The embedded server's Stop leaves an open long poll hanging instead of
	// closing it as a dying process would; the poll timeout is what ends
	// such a poll.
	m.pollTimeout = 500 * time.Millisecond
	c := startCollector(t, ctx, m)
	c.waitFor(t, map[netip.Prefix]string{pfx("10.5.1.0/24"): "192.168.0.1"})

	srv.Stop()
	eventually(t, "a failed request to be logged", func() bool { return countLogs(&logs, "failed") > 0 })
	start, calls := time.Now(), api.total()
	time.Sleep(3 * time.Second)
	n, elapsed := api.total()-calls, time.Since(start)
	// The back-off doubles from 100 ms: about 6 requests in 3 s. A spinning
	// watcher would make thousands.
	if perSec := float64(n) / elapsed.Seconds(); perSec > 5 {
		t.Errorf("%d requests in %v while etcd was down (%.1f/s), want at most 5/s", n, elapsed, perSec)
	}
	t.Logf("%d requests in %v while etcd was down", n, elapsed)

	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	put(t, srv, "subnets/10.5.2.0-24", `{"PublicIP":"192.168.0.2"}`, time.Hour)
	del(t, srv, "subnets/10.5.1.0-24")
	c.waitFor(t, map[netip.Prefix]string{pfx("10.5.2.0/24"): "192.168.0.2"})
}

func TestWatchEndsOnCancel(t *testing.T) {
	srv := etcdtest.Start(t)
	put(t, srv, "subnets/10.5.1.0-24", `{"PublicIP":"192.168.0.1"}`, time.Hour)
	m, _ := newTestManager(t, srv)
	for _, stall := range []bool{false, true} {
		t.Run(fmt.Sprintf("blocked in send %v", stall), func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			events := make(chan []subnet.Event)
			done := make(chan error, 1)
			go func() { done <- m.WatchLeases(ctx, events) }()
			if !stall {
				<-events // now it waits in a long poll
			}
			cancel()
			select {
			case err := <-done:
				if !errors.Is(err, context.Canceled) {
					t.Errorf("WatchLeases = %v, want context.Canceled", err)
				}
			case <-time.After(30 * time.Second):
				t.Fatal("WatchLeases did not return after cancel")
			}
			waitGoroutinesGone(t, "etcdv2.(*watcher)", "etcdv2.(*Manager).WatchLeases", "client/v2.(*simpleHTTPClient).Do")
		})
	}
}

// TestWatchStartsFromAcquireListing: the first watch after an acquisition
// starts from the listing the acquisition read, so start-up reads the
// subnets directory once, and a lease written between the two is still
// reported. A later watch lists for itself.
func TestWatchStartsFromAcquireListing(t *testing.T) {
	srv := etcdtest.Start(t)
	cfg := mustConfig(t, testConfig)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	other := netip.MustParsePrefix("10.5.77.0/24")
	put(t, srv, leaseKeyOf(netip.MustParsePrefix("10.5.78.0/24")), `{"PublicIP":"192.168.0.78"}`, time.Hour)
	m, api := newTestManager(t, srv)
	l, err := m.AcquireLease(ctx, cfg, attrsFor("192.168.0.1"), subnet.Lease{})
	if err != nil {
		t.Fatal(err)
	}
	getsAfterAcquire := api.gets.Load()
	put(t, srv, leaseKeyOf(other), `{"PublicIP":"192.168.0.77"}`, time.Hour)

	col := startCollector(t, ctx, m)
	col.waitFor(t, map[netip.Prefix]string{
		l.Subnet: "192.168.0.1", other: "192.168.0.77", netip.MustParsePrefix("10.5.78.0/24"): "192.168.0.78",
	})
	if got := api.gets.Load() - getsAfterAcquire; got != 0 {
		t.Errorf("the first watch made %d GETs, want 0 (it starts from the acquisition's listing)", got)
	}

	wctx, wcancel := context.WithCancel(ctx)
	defer wcancel()
	before := api.gets.Load()
	col2 := startCollector(t, wctx, m)
	col2.waitFor(t, map[netip.Prefix]string{
		l.Subnet: "192.168.0.1", other: "192.168.0.77", netip.MustParsePrefix("10.5.78.0/24"): "192.168.0.78",
	})
	if got := api.gets.Load() - before; got != 1 {
		t.Errorf("a second watch made %d GETs, want 1 (its own listing)", got)
	}
}
