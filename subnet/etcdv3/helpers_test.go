package etcdv3

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/internal/etcdtest"
	"github.com/flanneld-go/flanneld/subnet"
)

var logMu sync.Mutex

// captureLogger appends each log line to *lines (guarded by logMu).
func captureLogger(lines *[]string) klog.Logger {
	return funcr.New(func(prefix, args string) {
		logMu.Lock()
		defer logMu.Unlock()
		*lines = append(*lines, args)
	}, funcr.Options{Verbosity: 4})
}

// testLogger logs to t until the test ends.
func testLogger(t testing.TB) klog.Logger {
	var done atomic.Bool
	t.Cleanup(func() { done.Store(true) })
	return funcr.New(func(prefix, args string) {
		if !done.Load() {
			t.Log(prefix, args)
		}
	}, funcr.Options{Verbosity: 4})
}

const testPrefix = "/coreos.com/network"

// testConfig has exactly 50 leasable /24s: 10.5.1.0 .. 10.5.50.0.
const testConfig = `{"Network":"10.5.0.0/16","SubnetLen":24,"SubnetMin":"10.5.1.0","SubnetMax":"10.5.50.0","Backend":{"Type":"vxlan","VNI":1}}`

func mustConfig(t testing.TB, js string) *subnet.Config {
	t.Helper()
	cfg, err := subnet.ParseConfig([]byte(js))
	if err != nil {
		t.Fatalf("ParseConfig(%s): %v", js, err)
	}
	return cfg
}

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }

func attrsFor(publicIP string) subnet.LeaseAttrs {
	return subnet.LeaseAttrs{PublicIP: netip.MustParseAddr(publicIP), BackendType: "vxlan", BackendData: []byte(`{"VtepMAC":"82:4b:b6:2f:54:4e"}`)}
}

// countingStore counts the requests a Manager makes, and can hold new
// watches until released.
type countingStore struct {
	store
	gets, txns, grants, keepalives, revokes, watches atomic.Int64

	mu        sync.Mutex
	watchGate chan struct{} // non-nil: Watch waits until it is closed
}

func (c *countingStore) Get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	c.gets.Add(1)
	return c.store.Get(ctx, key, opts...)
}

func (c *countingStore) Txn(ctx context.Context) clientv3.Txn {
	c.txns.Add(1)
	return c.store.Txn(ctx)
}

func (c *countingStore) Grant(ctx context.Context, ttl int64) (*clientv3.LeaseGrantResponse, error) {
	c.grants.Add(1)
	return c.store.Grant(ctx, ttl)
}

func (c *countingStore) KeepAliveOnce(ctx context.Context, id clientv3.LeaseID) (*clientv3.LeaseKeepAliveResponse, error) {
	c.keepalives.Add(1)
	return c.store.KeepAliveOnce(ctx, id)
}

func (c *countingStore) Revoke(ctx context.Context, id clientv3.LeaseID) (*clientv3.LeaseRevokeResponse, error) {
	c.revokes.Add(1)
	return c.store.Revoke(ctx, id)
}

func (c *countingStore) Watch(ctx context.Context, key string, opts ...clientv3.OpOption) clientv3.WatchChan {
	c.watches.Add(1)
	c.mu.Lock()
	gate := c.watchGate
	c.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
		}
	}
	return c.store.Watch(ctx, key, opts...)
}

// holdWatches makes new watches wait until the returned func is called.
func (c *countingStore) holdWatches() (release func()) {
	gate := make(chan struct{})
	c.mu.Lock()
	c.watchGate = gate
	c.mu.Unlock()
	return func() {
		c.mu.Lock()
		c.watchGate = nil
		c.mu.Unlock()
		close(gate)
	}
}

func (c *countingStore) total() int64 {
	return c.gets.Load() + c.txns.Load() + c.grants.Load() + c.keepalives.Load() + c.revokes.Load() + c.watches.Load()
}

// newTestManager returns a Manager for srv with its requests counted. It
// is closed when the test ends.
func newTestManager(t testing.TB, srv *etcdtest.Server, edit ...func(*Options)) (*Manager, *countingStore) {
	t.Helper()
	opts := Options{Endpoints: srv.Endpoints(), Logger: testLogger(t)}
	if f := srv.TLS(); f != nil {
		opts.CertFile, opts.KeyFile, opts.CAFile = f.ClientCert, f.ClientKey, f.CAFile
	}
	for _, e := range edit {
		e(&opts)
	}
	opts, err := opts.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	conn, err := newConnector(&opts)
	if err != nil {
		t.Fatal(err)
	}
	c := &countingStore{}
	dial := conn.dial
	conn.dial = func(ctx context.Context) (store, func() error, error) {
		st, closeFn, err := dial(ctx)
		if err != nil {
			return nil, nil, err
		}
		c.store = st
		return c, closeFn, nil
	}
	m := newManager(conn, opts)
	m.minBackoff, m.maxBackoff = 20*time.Millisecond, 200*time.Millisecond
	t.Cleanup(func() { m.Close() })
	return m, c
}

// v3 returns a plain v3 client of srv, closed when the test ends.
func v3(t testing.TB, srv *etcdtest.Server, edit ...func(*clientv3.Config)) *clientv3.Client {
	t.Helper()
	cfg := clientv3.Config{Endpoints: srv.Endpoints(), DialTimeout: 10 * time.Second, Logger: zap.NewNop()}
	if f := srv.TLS(); f != nil {
		tc, err := f.ClientConfig()
		if err != nil {
			t.Fatal(err)
		}
		cfg.TLS = tc
	}
	for _, e := range edit {
		e(&cfg)
	}
	c, err := clientv3.New(cfg)
	if err != nil {
		t.Fatalf("v3 client: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// put writes key (relative to testPrefix) directly; with ttl > 0 attached
// to a new etcd lease of that TTL.
func put(t testing.TB, c *clientv3.Client, key, value string, ttl time.Duration) *clientv3.PutResponse {
	t.Helper()
	var opts []clientv3.OpOption
	if ttl > 0 {
		g, err := c.Grant(context.Background(), int64(ttl/time.Second))
		if err != nil {
			t.Fatalf("granting a lease for %s: %v", key, err)
		}
		opts = append(opts, clientv3.WithLease(g.ID))
	}
	resp, err := c.Put(context.Background(), testPrefix+"/"+key, value, opts...)
	if err != nil {
		t.Fatalf("writing %s: %v", key, err)
	}
	return resp
}

func del(t testing.TB, c *clientv3.Client, key string) {
	t.Helper()
	if _, err := c.Delete(context.Background(), testPrefix+"/"+key); err != nil {
		t.Fatalf("deleting %s: %v", key, err)
	}
}

// getKV reads key (relative to testPrefix); nil when missing.
func getKV(t testing.TB, c *clientv3.Client, key string) *clientv3.GetResponse {
	t.Helper()
	resp, err := c.Get(context.Background(), testPrefix+"/"+key)
	if err != nil {
		t.Fatalf("reading %s: %v", key, err)
	}
	if len(resp.Kvs) == 0 {
		return nil
	}
	return resp
}

func leaseKeyOf(p netip.Prefix) string {
	return "subnets/" + strings.ReplaceAll(p.String(), "/", "-")
}

// eventually polls cond every 20 ms until it holds, failing the test after
// a generous deadline.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitGoroutinesGone waits until no goroutine stack mentions any of substrs.
func waitGoroutinesGone(t testing.TB, substrs ...string) {
	t.Helper()
	eventually(t, "goroutines to end", func() bool {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		for _, g := range strings.Split(string(buf), "\n\n") {
			for _, s := range substrs {
				if strings.Contains(g, s) {
					return false
				}
			}
		}
		return true
	})
}

// collector runs WatchLeases and folds the batches into a set.
type collector struct {
	mu      sync.Mutex
	set     map[netip.Prefix]string // subnet → PublicIP
	batches [][]subnet.Event
	removed map[netip.Prefix]int
}

// startCollector watches with m until the test ends, then checks that
// WatchLeases returned context.Canceled.
func startCollector(t testing.TB, m *Manager) *collector {
	t.Helper()
	c := &collector{set: map[netip.Prefix]string{}, removed: map[netip.Prefix]int{}}
	ctx, cancel := context.WithCancel(context.Background())
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
			c.removed[e.Lease.Subnet]++
		}
	}
}

func (c *collector) snapshot() map[netip.Prefix]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return maps.Clone(c.set)
}

func (c *collector) waitFor(t testing.TB, want map[netip.Prefix]string) {
	t.Helper()
	eventually(t, fmt.Sprintf("watched set %v", want), func() bool { return maps.Equal(c.snapshot(), want) })
}

func (c *collector) removals(p netip.Prefix) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.removed[p]
}

func (c *collector) nBatches() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.batches)
}

// etcdSet reads the leases in etcd that parse, as the watcher should see them.
func etcdSet(t testing.TB, c *clientv3.Client) map[netip.Prefix]string {
	t.Helper()
	set := map[netip.Prefix]string{}
	resp, err := c.Get(context.Background(), testPrefix+"/subnets/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range resp.Kvs {
		if e, err := parseKV(testPrefix+"/subnets/", kv); err == nil {
			set[e.subnet] = e.attrs.PublicIP.String()
		}
	}
	return set
}
