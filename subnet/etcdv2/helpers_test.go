package etcdv2

import (
	"context"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"
	client "go.etcd.io/etcd/client/v2"
	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/internal/etcdtest"
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
func testLogger(t *testing.T) klog.Logger {
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

// countingAPI counts the requests a Manager makes.
type countingAPI struct {
	keysAPI
	gets, sets, polls atomic.Int64
}

func (c *countingAPI) Get(ctx context.Context, key string, opts *client.GetOptions) (*client.Response, error) {
	c.gets.Add(1)
	return c.keysAPI.Get(ctx, key, opts)
}

func (c *countingAPI) Set(ctx context.Context, key, value string, opts *client.SetOptions) (*client.Response, error) {
	c.sets.Add(1)
	return c.keysAPI.Set(ctx, key, value, opts)
}

func (c *countingAPI) Watcher(key string, opts *client.WatcherOptions) client.Watcher {
	return countingWatcher{c.keysAPI.Watcher(key, opts), &c.polls}
}

func (c *countingAPI) total() int64 { return c.gets.Load() + c.sets.Load() + c.polls.Load() }

type countingWatcher struct {
	client.Watcher
	n *atomic.Int64
}

func (w countingWatcher) Next(ctx context.Context) (*client.Response, error) {
	w.n.Add(1)
	return w.Watcher.Next(ctx)
}

// newTestManager returns a Manager for srv with its requests counted.
func newTestManager(t *testing.T, srv *etcdtest.Server, edit ...func(*Options)) (*Manager, *countingAPI) {
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
	api, err := newKeysAPI(&opts)
	if err != nil {
		t.Fatal(err)
	}
	c := &countingAPI{keysAPI: api}
	return newManager(c, opts), c
}

// put writes key (relative to testPrefix) directly; ttl 0 means none.
func put(t *testing.T, srv *etcdtest.Server, key, value string, ttl time.Duration) *client.Response {
	t.Helper()
	resp, err := srv.KeysAPI().Set(context.Background(), testPrefix+"/"+key, value, &client.SetOptions{TTL: ttl})
	if err != nil {
		t.Fatalf("writing %s: %v", key, err)
	}
	return resp
}

func del(t *testing.T, srv *etcdtest.Server, key string) {
	t.Helper()
	if _, err := srv.KeysAPI().Delete(context.Background(), testPrefix+"/"+key, nil); err != nil {
		t.Fatalf("deleting %s: %v", key, err)
	}
}

// getNode reads key (relative to testPrefix); nil when missing.
func getNode(t *testing.T, srv *etcdtest.Server, key string) *client.Node {
	t.Helper()
	resp, err := srv.KeysAPI().Get(context.Background(), testPrefix+"/"+key, nil)
	if etcdCode(err) == client.ErrorCodeKeyNotFound {
		return nil
	}
	if err != nil {
		t.Fatalf("reading %s: %v", key, err)
	}
	return resp.Node
}

// eventually polls cond every 20 ms until it holds, failing the test after
// a generous deadline.
func eventually(t *testing.T, what string, cond func() bool) {
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
func waitGoroutinesGone(t *testing.T, substrs ...string) {
	t.Helper()
	var last string
	eventually(t, "goroutines to end", func() bool {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		for _, g := range strings.Split(string(buf), "\n\n") {
			for _, s := range substrs {
				if strings.Contains(g, s) {
					last = g
					return false
				}
			}
		}
		return true
	})
	_ = last
}
