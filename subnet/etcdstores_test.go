package subnet_test

// The stores every test of the etcd lease manager runs against: its two
// adapters on embedded etcd (v2 API on), and the v3 adapter on a real etcd
// 3.6 process (no v2 API at all).

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"
	client "go.etcd.io/etcd/client/v2"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/internal/etcdbin"
	"github.com/flanneld-go/flanneld/internal/etcdtest"
	"github.com/flanneld-go/flanneld/subnet"
	"github.com/flanneld-go/flanneld/subnet/etcdv2"
	"github.com/flanneld-go/flanneld/subnet/etcdv3"
)

const testPrefix = "/coreos.com/network"

// testConfig has exactly 50 leasable /24s: 10.5.1.0 .. 10.5.50.0.
const testConfig = `{"Network":"10.5.0.0/16","SubnetLen":24,"SubnetMin":"10.5.1.0","SubnetMax":"10.5.50.0","Backend":{"Type":"vxlan","VNI":1}}`

// store is one etcd under test, written and read directly (not through the
// adapter under test).
type store struct {
	v2   bool
	srv  *etcdtest.Server // embedded etcd; nil for the etcd 3.6 process
	proc *etcdProc        // etcd 3.6
	kapi client.KeysAPI   // v2
	c    *clientv3.Client // v3
}

// stores runs f once per store kind, each in its own subtest with a fresh
// etcd.
func stores(t *testing.T, f func(t *testing.T, s *store), opts ...etcdtest.Option) {
	for _, kind := range []string{"v2", "v3", "v3-etcd3.6"} {
		t.Run(kind, func(t *testing.T) {
			s := &store{v2: kind == "v2"}
			if kind == "v3-etcd3.6" {
				if len(opts) > 0 {
					t.Skip("the etcd 3.6 process runs without TLS")
				}
				s.proc = startEtcd36(t)
			} else {
				s.srv = etcdtest.Start(t, opts...)
			}
			if s.v2 {
				s.kapi = s.srv.KeysAPI()
			} else {
				s.c = s.v3Client(t)
			}
			f(t, s)
		})
	}
}

func (s *store) endpoints() []string {
	if s.proc != nil {
		return []string{s.proc.url}
	}
	return s.srv.Endpoints()
}

func (s *store) v3Client(t testing.TB) *clientv3.Client {
	cfg := clientv3.Config{Endpoints: s.endpoints(), DialTimeout: 10 * time.Second, Logger: zap.NewNop()}
	if s.srv != nil && s.srv.TLS() != nil {
		tc, err := s.srv.TLS().ClientConfig()
		if err != nil {
			t.Fatal(err)
		}
		cfg.TLS = tc
	}
	c, err := clientv3.New(cfg)
	if err != nil {
		t.Fatalf("v3 client: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// options are the adapter options for s.
func (s *store) options(t testing.TB) subnet.EtcdOptions {
	opts := subnet.EtcdOptions{Endpoints: s.endpoints(), Logger: testLogger(t)}
	if s.srv != nil {
		if f := s.srv.TLS(); f != nil {
			opts.CertFile, opts.KeyFile, opts.CAFile = f.ClientCert, f.ClientKey, f.CAFile
		}
	}
	return opts
}

// keyspace is the adapter under test for opts.
func (s *store) keyspace(t testing.TB, opts subnet.EtcdOptions) (subnet.Keyspace, error) {
	if s.v2 {
		return etcdv2.NewKeyspace(opts)
	}
	ks, closeFn, err := etcdv3.NewKeyspace(opts)
	if err == nil {
		t.Cleanup(func() { closeFn() })
	}
	return ks, err
}

// manager returns the lease manager of s with short back-offs, its
// requests counted.
func (s *store) manager(t testing.TB, edit ...func(*subnet.EtcdOptions)) (*subnet.EtcdManager, *counter) {
	t.Helper()
	opts := s.options(t)
	for _, e := range edit {
		e(&opts)
	}
	opts, err := opts.WithDefaults()
	if err != nil {
		t.Fatal(err)
	}
	ks, err := s.keyspace(t, opts)
	if err != nil {
		t.Fatal(err)
	}
	c := &counter{Keyspace: ks}
	m := subnet.NewEtcdManager(c, opts)
	subnet.SetTiming(m, 50*time.Millisecond, 0, 20*time.Millisecond, 200*time.Millisecond)
	return m, c
}

// put writes key (relative to testPrefix) directly; with ttl > 0 it
// expires (v3: attached to a new etcd lease of that TTL).
func (s *store) put(t testing.TB, key, value string, ttl time.Duration) {
	t.Helper()
	ctx := context.Background()
	if s.v2 {
		if _, err := s.kapi.Set(ctx, testPrefix+"/"+key, value, &client.SetOptions{TTL: ttl}); err != nil {
			t.Fatalf("writing %s: %v", key, err)
		}
		return
	}
	var opts []clientv3.OpOption
	if ttl > 0 {
		g, err := s.c.Grant(ctx, int64(ttl/time.Second))
		if err != nil {
			t.Fatalf("granting a lease for %s: %v", key, err)
		}
		opts = append(opts, clientv3.WithLease(g.ID))
	}
	if _, err := s.c.Put(ctx, testPrefix+"/"+key, value, opts...); err != nil {
		t.Fatalf("writing %s: %v", key, err)
	}
}

func (s *store) del(t testing.TB, key string) {
	t.Helper()
	var err error
	if s.v2 {
		_, err = s.kapi.Delete(context.Background(), testPrefix+"/"+key, nil)
	} else {
		_, err = s.c.Delete(context.Background(), testPrefix+"/"+key)
	}
	if err != nil {
		t.Fatalf("deleting %s: %v", key, err)
	}
}

// get reads key (relative to testPrefix): its value, and ttl > 0 when it
// expires (v3: the granted TTL of its etcd lease); ok false when missing.
func (s *store) get(t testing.TB, key string) (value string, ttl time.Duration, ok bool) {
	t.Helper()
	ctx := context.Background()
	if s.v2 {
		resp, err := s.kapi.Get(ctx, testPrefix+"/"+key, nil)
		if client.IsKeyNotFound(err) {
			return "", 0, false
		}
		if err != nil {
			t.Fatalf("reading %s: %v", key, err)
		}
		return resp.Node.Value, time.Duration(resp.Node.TTL) * time.Second, true
	}
	resp, err := s.c.Get(ctx, testPrefix+"/"+key)
	if err != nil {
		t.Fatalf("reading %s: %v", key, err)
	}
	if len(resp.Kvs) == 0 {
		return "", 0, false
	}
	kv := resp.Kvs[0]
	if kv.Lease == 0 {
		return string(kv.Value), 0, true
	}
	l, err := s.c.TimeToLive(ctx, clientv3.LeaseID(kv.Lease))
	if err != nil {
		t.Fatalf("reading the etcd lease of %s: %v", key, err)
	}
	return string(kv.Value), time.Duration(l.GrantedTTL) * time.Second, true
}

// keys lists the keys below dir (relative to testPrefix) with their values.
func (s *store) keys(t testing.TB, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	ctx := context.Background()
	if s.v2 {
		resp, err := s.kapi.Get(ctx, testPrefix+"/"+dir, &client.GetOptions{Recursive: true})
		if client.IsKeyNotFound(err) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		for nodes := (client.Nodes{resp.Node}); len(nodes) > 0; nodes = nodes[1:] {
			if n := nodes[0]; n.Dir {
				nodes = append(nodes, n.Nodes...)
			} else {
				out[n.Key[len(testPrefix)+1:]] = n.Value
			}
		}
		return out
	}
	resp, err := s.c.Get(ctx, testPrefix+"/"+dir+"/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range resp.Kvs {
		out[string(kv.Key)[len(testPrefix)+1:]] = string(kv.Value)
	}
	return out
}

// compact drops the store's history: v2 keeps the last 1000 events, so
// 1100 other writes push the rest out; v3 compacts at its revision.
func (s *store) compact(t testing.TB) {
	t.Helper()
	if s.v2 {
		for i := range 1100 {
			s.put(t, "noise", fmt.Sprint(i), 0)
		}
		return
	}
	resp, err := s.c.Get(context.Background(), "noise")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.c.Compact(context.Background(), resp.Header.Revision); err != nil {
		t.Fatal(err)
	}
}

func (s *store) stop(t testing.TB) {
	if s.proc != nil {
		s.proc.stop()
		return
	}
	s.srv.Stop()
}

func (s *store) start(t testing.TB) {
	t.Helper()
	var err error
	if s.proc != nil {
		err = s.proc.start()
	} else {
		err = s.srv.Restart()
	}
	if err != nil {
		t.Fatal(err)
	}
}

// wipe replaces the store with an empty one on the same endpoint.
func (s *store) wipe(t testing.TB) {
	t.Helper()
	if s.srv != nil {
		if err := s.srv.Wipe(); err != nil {
			t.Fatal(err)
		}
		return
	}
	s.proc.stop()
	if err := os.RemoveAll(s.proc.data); err != nil {
		t.Fatal(err)
	}
	s.start(t)
}

// backup copies the store's data (offline) to a new directory; restore
// puts it back, and the store goes back to that state and revision.
func (s *store) backup(t testing.TB) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "backup")
	if s.srv != nil {
		if err := s.srv.Backup(dir); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	s.proc.stop()
	if err := os.CopyFS(dir, os.DirFS(s.proc.data)); err != nil {
		t.Fatal(err)
	}
	s.start(t)
	return dir
}

func (s *store) restore(t testing.TB, dir string) {
	t.Helper()
	if s.srv != nil {
		if err := s.srv.RestoreBackup(dir); err != nil {
			t.Fatal(err)
		}
		return
	}
	s.proc.stop()
	if err := os.RemoveAll(s.proc.data); err != nil {
		t.Fatal(err)
	}
	if err := os.CopyFS(s.proc.data, os.DirFS(dir)); err != nil {
		t.Fatal(err)
	}
	s.start(t)
}

// etcdProc is a real etcd 3.6 server process on loopback.
type etcdProc struct {
	bin, data, url, peer string
	cmd                  *exec.Cmd
	exited               chan struct{}
}

func startEtcd36(t testing.TB) *etcdProc {
	t.Helper()
	bin, err := etcdbin.Path(etcdbin.Version)
	if err != nil {
		t.Fatal(err)
	}
	ports, err := etcdtest.FreePorts("", netip.MustParseAddr("127.0.0.1"), 2)
	if err != nil {
		t.Fatal(err)
	}
	p := &etcdProc{bin: bin, data: filepath.Join(t.TempDir(), "data"),
		url: fmt.Sprintf("http://127.0.0.1:%d", ports[0]), peer: fmt.Sprintf("http://127.0.0.1:%d", ports[1])}
	if err := p.start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.stop)
	return p
}

func (p *etcdProc) start() error {
	p.cmd = exec.Command(p.bin, "--name", "t", "--data-dir", p.data,
		"--listen-client-urls", p.url, "--advertise-client-urls", p.url,
		"--listen-peer-urls", p.peer, "--initial-advertise-peer-urls", p.peer,
		"--initial-cluster", "t="+p.peer, "--log-level", "error")
	if err := p.cmd.Start(); err != nil {
		return fmt.Errorf("starting etcd 3.6: %w", err)
	}
	p.exited = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { cmd.Wait(); close(done) }(p.cmd, p.exited)
	c, err := clientv3.New(clientv3.Config{Endpoints: []string{p.url}, DialTimeout: 10 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return err
	}
	defer c.Close()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := c.Get(ctx, "ready")
		cancel()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("etcd 3.6 did not answer: %w", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (p *etcdProc) stop() {
	if p.cmd != nil && p.cmd.Process != nil {
		p.cmd.Process.Kill()
		<-p.exited
		p.cmd = nil
	}
}

// counter counts the requests of a Keyspace, and can hold new watches
// until released.
type counter struct {
	subnet.Keyspace
	gets, lists, creates, updates, deletes, watches, nexts atomic.Int64

	mu   sync.Mutex
	gate chan struct{}
}

func (c *counter) Get(ctx context.Context, key string) (*subnet.KV, subnet.Rev, error) {
	c.gets.Add(1)
	return c.Keyspace.Get(ctx, key)
}

func (c *counter) List(ctx context.Context, prefix string) ([]subnet.KV, subnet.Rev, error) {
	c.lists.Add(1)
	return c.Keyspace.List(ctx, prefix)
}

func (c *counter) Create(ctx context.Context, key string, value []byte, ttl time.Duration) (subnet.KV, bool, error) {
	c.creates.Add(1)
	return c.Keyspace.Create(ctx, key, value, ttl)
}

func (c *counter) Update(ctx context.Context, kv subnet.KV, value []byte, ttl time.Duration) (subnet.KV, bool, error) {
	c.updates.Add(1)
	return c.Keyspace.Update(ctx, kv, value, ttl)
}

func (c *counter) Delete(ctx context.Context, kv subnet.KV) error {
	c.deletes.Add(1)
	return c.Keyspace.Delete(ctx, kv)
}

func (c *counter) Watch(ctx context.Context, prefix string, after int64) subnet.Watch {
	c.watches.Add(1)
	c.mu.Lock()
	gate := c.gate
	c.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
		}
	}
	return countedNext{c.Keyspace.Watch(ctx, prefix, after), &c.nexts}
}

type countedNext struct {
	subnet.Watch
	n *atomic.Int64
}

func (w countedNext) Next(ctx context.Context) ([]subnet.Change, subnet.Rev, error) {
	w.n.Add(1)
	return w.Watch.Next(ctx)
}

// hold makes new watches wait until the returned func is called.
func (c *counter) hold() (release func()) {
	gate := make(chan struct{})
	c.mu.Lock()
	c.gate = gate
	c.mu.Unlock()
	return func() {
		c.mu.Lock()
		c.gate = nil
		c.mu.Unlock()
		close(gate)
	}
}

func (c *counter) total() int64 {
	return c.gets.Load() + c.lists.Load() + c.creates.Load() + c.updates.Load() + c.deletes.Load() + c.nexts.Load()
}

var logMu sync.Mutex

// captureLogger appends each log line to *lines (guarded by logMu).
func captureLogger(lines *[]string) klog.Logger {
	return funcr.New(func(prefix, args string) {
		logMu.Lock()
		defer logMu.Unlock()
		*lines = append(*lines, args)
	}, funcr.Options{Verbosity: 4})
}

// countLogs counts the lines of *lines that hold s.
func countLogs(lines *[]string, s string) int {
	logMu.Lock()
	defer logMu.Unlock()
	n := 0
	for _, l := range *lines {
		if strings.Contains(l, s) {
			n++
		}
	}
	return n
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
