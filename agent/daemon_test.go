package agent

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	client "go.etcd.io/etcd/client/v2"
	"k8s.io/klog/v2"
	"k8s.io/klog/v2/ktesting"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/internal/etcdtest"
	"github.com/flanneld-go/flanneld/internal/metrics"
	"github.com/flanneld-go/flanneld/subnet"
	"github.com/flanneld-go/flanneld/subnet/etcdv2"
)

// fakeBackend records what the daemon asks of a backend.
type fakeBackend struct {
	mu      sync.Mutex
	applies int
	own     subnet.Lease
	remote  []string // sorted subnets of the last Apply
	closed  int
}

func (f *fakeBackend) Init(context.Context) (backend.Publish, error) {
	return backend.Publish{BackendData: json.RawMessage(`{"Fake":1}`), MTU: 1400}, nil
}

func (f *fakeBackend) Apply(_ context.Context, own subnet.Lease, remote []subnet.Lease) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.applies++
	f.own = own
	f.remote = f.remote[:0]
	for _, l := range remote {
		f.remote = append(f.remote, l.Subnet.String())
	}
	sort.Strings(f.remote)
	return nil
}

func (f *fakeBackend) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed++
	return nil
}

func (f *fakeBackend) state() (subnet.Lease, string, int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.own, strings.Join(f.remote, " "), f.applies
}

var (
	fakesMu sync.Mutex
	fakes   = map[string][]*fakeBackend{} // by test name, in creation order
)

func init() {
	backend.Register("fake-test", func(o backend.Options) (backend.Backend, error) {
		fakesMu.Lock()
		defer fakesMu.Unlock()
		var name struct{ Test string }
		json.Unmarshal(o.Config.Backend, &name)
		f := &fakeBackend{}
		fakes[name.Test] = append(fakes[name.Test], f)
		return f, nil
	})
}

// fakeFor is the backend of the test's first daemon.
func fakeFor(t *testing.T) *fakeBackend { return fakeN(t, 0) }

// fakeN is the backend of the test's daemon i (in start order), once it
// has been created.
func fakeN(t *testing.T, i int) *fakeBackend {
	t.Helper()
	var f *fakeBackend
	eventually(t, "the fake backend", func() bool {
		fakesMu.Lock()
		defer fakesMu.Unlock()
		if fs := fakes[t.Name()]; len(fs) > i {
			f = fs[i]
		}
		return f != nil
	})
	return f
}

type lab struct {
	t    *testing.T
	etcd *etcdtest.Server
	keys client.KeysAPI
	mgr  *etcdv2.Manager
	dir  string
}

func newLab(t *testing.T) *lab {
	s := etcdtest.Start(t)
	mgr, err := etcdv2.New(etcdv2.Options{Endpoints: s.Endpoints(), Logger: ktesting.NewLogger(t, ktesting.NewConfig())})
	if err != nil {
		t.Fatal(err)
	}
	return &lab{t: t, etcd: s, keys: s.KeysAPI(), mgr: mgr, dir: t.TempDir()}
}

func (l *lab) set(key, value string, ttl time.Duration) {
	l.t.Helper()
	if _, err := l.keys.Set(context.Background(), "/coreos.com/network/"+key, value, &client.SetOptions{TTL: ttl}); err != nil {
		l.t.Fatal(err)
	}
}

// config writes the lab's network config. Its own lease comes from
// 10.5.100.0-10.5.199.0 (at random among the free ones), so the
// leases tests write outside that range while it runs never land on it.
func (l *lab) config(extra string) {
	l.set("config", `{"Network":"10.5.0.0/16","SubnetMin":"10.5.100.0","SubnetMax":"10.5.199.0","Backend":{"Type":"fake-test","Test":"`+l.t.Name()+`"}`+extra+`}`, 0)
}

type running struct {
	cancel context.CancelFunc
	done   chan error
	ready  chan struct{}
}

func (l *lab) start(o Options) *running {
	l.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{cancel: cancel, done: make(chan error, 1), ready: make(chan struct{})}
	if o.Manager == nil {
		o.Manager = l.mgr
	}
	iface := &net.Interface{Name: "eth0", Index: 2, MTU: 1500}
	if !o.Ext.PublicIP.IsValid() {
		o.Ext = backend.ExternalInterface{Iface: iface, IfaceAddr: netip.MustParseAddr("192.168.8.1"), PublicIP: netip.MustParseAddr("192.168.8.1")}
	}
	if o.SubnetFile == "" {
		o.SubnetFile = filepath.Join(l.dir, "subnet.env")
	}
	o.OnReady = func() { close(r.ready) }
	o.Coalesce = time.Millisecond
	log := ktesting.NewLogger(l.t, ktesting.NewConfig())
	o.Logger = &log
	go func() { r.done <- Run(ctx, o) }()
	l.t.Cleanup(func() {
		cancel()
		select {
		case <-r.done:
		case <-time.After(10 * time.Second):
			l.t.Error("daemon did not stop")
		}
	})
	return r
}

func (r *running) waitReady(t *testing.T) {
	t.Helper()
	select {
	case <-r.ready:
	case err := <-r.done:
		t.Fatalf("daemon ended before ready: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("daemon not ready after 20s")
	}
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestRunPublishesAndFollowsLeases(t *testing.T) {
	l := newLab(t)
	l.config("")
	l.set("subnets/10.5.7.0-24", `{"PublicIP":"192.168.8.7","BackendType":"fake-test"}`, time.Hour)
	l.set("subnets/10.9.0.0-24", `{"PublicIP":"192.168.8.9"}`, time.Hour) // outside Network: skipped
	l.set("subnets/10.5.8.0-24", `not json`, time.Hour)                   // garbage: skipped
	r := l.start(Options{IPMasq: true})
	r.waitReady(t)
	fb := fakeFor(t)

	own, remote, _ := fb.state()
	if remote != "10.5.7.0/24" {
		t.Errorf("first Apply remote = %q, want only 10.5.7.0/24", remote)
	}
	env, err := subnet.ReadEnv(filepath.Join(l.dir, "subnet.env"))
	if err != nil {
		t.Fatal(err)
	}
	if env.Subnet != own.Subnet || env.MTU != 1400 || !env.IPMasq || env.Network.String() != "10.5.0.0/16" {
		t.Errorf("subnet.env = %+v, own lease %v", env, own.Subnet)
	}
	resp, err := l.keys.Get(context.Background(), "/coreos.com/network/subnets/"+strings.Replace(own.Subnet.String(), "/", "-", 1), nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.Node.Value != `{"PublicIP":"192.168.8.1","BackendType":"fake-test","BackendData":{"Fake":1}}` {
		t.Errorf("own lease value = %s", resp.Node.Value)
	}

	if got := metrics.LeaseExpiration.Get(); got != float64(own.Expiration.Unix()) {
		t.Errorf("lease expiration metric = %v, want %v", got, own.Expiration.Unix())
	}
	if got := metrics.Leases.Get(); got != 2 {
		t.Errorf("leases metric = %v, want 2 (own and 10.5.7.0/24)", got)
	}

	l.set("subnets/10.5.9.0-24", `{"PublicIP":"192.168.8.19","BackendType":"fake-test"}`, time.Hour)
	eventually(t, "added lease applied", func() bool { _, r, _ := fb.state(); return r == "10.5.7.0/24 10.5.9.0/24" })
	if _, err := l.keys.Delete(context.Background(), "/coreos.com/network/subnets/10.5.7.0-24", nil); err != nil {
		t.Fatal(err)
	}
	eventually(t, "removed lease applied", func() bool { _, r, _ := fb.state(); return r == "10.5.9.0/24" })
}

func TestRunReacquiresDeletedLease(t *testing.T) {
	l := newLab(t)
	l.config("")
	r := l.start(Options{})
	r.waitReady(t)
	fb := fakeFor(t)
	own, _, _ := fb.state()
	key := "/coreos.com/network/subnets/" + strings.Replace(own.Subnet.String(), "/", "-", 1)
	if _, err := l.keys.Delete(context.Background(), key, nil); err != nil {
		t.Fatal(err)
	}
	eventually(t, "own lease re-created", func() bool {
		resp, err := l.keys.Get(context.Background(), key, nil)
		return err == nil && strings.Contains(resp.Node.Value, `"192.168.8.1"`)
	})
	if now, _, _ := fb.state(); now.Subnet != own.Subnet {
		t.Errorf("re-acquired %v, want the same subnet %v", now.Subnet, own.Subnet)
	}
}

func TestRunRenewsBeforeExpiry(t *testing.T) {
	l := newLab(t)
	l.config("")
	// A margin of 24h minus 2s renews two seconds after each acquire/renew.
	r := l.start(Options{RenewMargin: 24*time.Hour - 2*time.Second})
	r.waitReady(t)
	own, _, _ := fakeFor(t).state()
	key := "/coreos.com/network/subnets/" + strings.Replace(own.Subnet.String(), "/", "-", 1)
	first, err := l.keys.Get(context.Background(), key, nil)
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "renewal", func() bool {
		resp, err := l.keys.Get(context.Background(), key, nil)
		return err == nil && resp.Node.ModifiedIndex > first.Node.ModifiedIndex && resp.Node.TTL > 86390
	})
}

func TestRunRestartKeepsSubnetViaSubnetFile(t *testing.T) {
	l := newLab(t)
	l.config("")
	file := filepath.Join(l.dir, "subnet.env")
	prev := subnet.Env{Network: netip.MustParsePrefix("10.5.0.0/16"), Subnet: netip.MustParsePrefix("10.5.177.0/24"), MTU: 1400}
	if err := subnet.WriteEnv(file, prev); err != nil {
		t.Fatal(err)
	}
	r := l.start(Options{SubnetFile: file})
	r.waitReady(t)
	if own, _, _ := fakeFor(t).state(); own.Subnet != prev.Subnet {
		t.Errorf("got %v, want the previous subnet %v", own.Subnet, prev.Subnet)
	}
}

func TestRunStartupErrors(t *testing.T) {
	tests := []struct {
		name, config string
		want         error
		text         string
	}{
		{"invalid config", `{"Network":"10.5.0.0/16","SubnetLen":31}`, subnet.ErrInvalidConfig, "SubnetLen 31 is longer than 30"},
		{"unknown backend", `{"Network":"10.5.0.0/16","Backend":{"Type":"nope"}}`, backend.ErrUnknownType, `"nope": use one of`},
		{"full range", `{"Network":"10.5.0.0/16","SubnetMin":"10.5.3.0","SubnetMax":"10.5.3.0","Backend":{"Type":"fake-test"}}`, subnet.ErrNoFreeSubnets, "no free subnets"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := newLab(t)
			l.set("config", tt.config, 0)
			l.set("subnets/10.5.3.0-24", `{"PublicIP":"192.168.8.3"}`, time.Hour)
			r := l.start(Options{})
			select {
			case err := <-r.done:
				if !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.text) {
					t.Errorf("Run = %v, want %v containing %q", err, tt.want, tt.text)
				}
				r.done <- err // for the cleanup
			case <-time.After(20 * time.Second):
				t.Fatal("Run did not fail")
			}
		})
	}
}

func TestRunStopsCleanly(t *testing.T) {
	l := newLab(t)
	l.config("")
	r := l.start(Options{})
	r.waitReady(t)
	r.cancel()
	select {
	case err := <-r.done:
		if err != nil {
			t.Errorf("Run = %v, want nil after cancel", err)
		}
		r.done <- nil
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not stop")
	}
	if fb := fakeFor(t); fb.closed != 1 {
		t.Errorf("backend closed %d times", fb.closed)
	}
	if _, err := os.Stat(filepath.Join(l.dir, "subnet.env")); err != nil {
		t.Errorf("subnet.env removed on stop: %v", err)
	}
}

var _ = klog.Background
