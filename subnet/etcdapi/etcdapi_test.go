package etcdapi

import (
	"context"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"
	client "go.etcd.io/etcd/client/v2"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/internal/etcdtest"
	"github.com/flanneld-go/flanneld/internal/metrics"
	"github.com/flanneld-go/flanneld/subnet"
)

const (
	config3 = `{"Network":"10.3.0.0/16","Backend":{"Type":"vxlan"}}`
	config2 = `{"Network":"10.2.0.0/16","Backend":{"Type":"vxlan"}}`
)

type logs struct {
	mu    sync.Mutex
	lines []string
}

func (l *logs) logger() klog.Logger {
	return funcr.New(func(prefix, args string) {
		l.mu.Lock()
		defer l.mu.Unlock()
		l.lines = append(l.lines, args)
	}, funcr.Options{})
}

func (l *logs) count(s string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, x := range l.lines {
		if strings.Contains(x, s) {
			n++
		}
	}
	return n
}

func putV3(t *testing.T, srv *etcdtest.Server, key, value string) {
	t.Helper()
	c, err := clientv3.New(clientv3.Config{Endpoints: srv.Endpoints(), DialTimeout: 10 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Put(context.Background(), key, value); err != nil {
		t.Fatal(err)
	}
}

func putV2(t *testing.T, srv *etcdtest.Server, key, value string) {
	t.Helper()
	if _, err := srv.KeysAPI().Set(context.Background(), key, value, &client.SetOptions{}); err != nil {
		t.Fatal(err)
	}
}

func newAuto(t *testing.T, srv *etcdtest.Server, api string) (*Manager, *logs) {
	t.Helper()
	l := &logs{}
	m, err := New(Options{API: api, Endpoints: srv.Endpoints(), Logger: l.logger()})
	if err != nil {
		t.Fatal(err)
	}
	m.retry = 50 * time.Millisecond
	t.Cleanup(func() { m.Close() })
	return m, l
}

func getConfig(t *testing.T, m *Manager) *subnet.Config {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cfg, err := m.GetNetworkConfig(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func TestAuto(t *testing.T) {
	for _, tc := range []struct {
		name     string
		noV2     bool
		v3, v2   bool
		wantAPI  string
		wantNet  string
		wantWarn bool
	}{
		{name: "config in v3 only", v3: true, wantAPI: V3, wantNet: "10.3.0.0/16"},
		{name: "config in v3, server without v2", noV2: true, v3: true, wantAPI: V3, wantNet: "10.3.0.0/16"},
		{name: "config in v2 only", v2: true, wantAPI: V2, wantNet: "10.2.0.0/16"},
		{name: "config in both", v3: true, v2: true, wantAPI: V3, wantNet: "10.3.0.0/16", wantWarn: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var opts []etcdtest.Option
			if tc.noV2 {
				opts = append(opts, etcdtest.WithoutV2())
			}
			srv := etcdtest.Start(t, opts...)
			if tc.v3 {
				putV3(t, srv, "/coreos.com/network/config", config3)
			}
			if tc.v2 {
				putV2(t, srv, "/coreos.com/network/config", config2)
			}
			m, l := newAuto(t, srv, Auto)
			v3 := m.v3
			cfg := getConfig(t, m)
			if m.API() != tc.wantAPI || cfg.Network != netip.MustParsePrefix(tc.wantNet) {
				t.Fatalf("chose %s with Network %v; want %s and %s", m.API(), cfg.Network, tc.wantAPI, tc.wantNet)
			}
			if got := l.count("both the etcd v3 and v2"); (got == 1) != tc.wantWarn {
				t.Errorf("%d warnings about both keyspaces, want warning=%v", got, tc.wantWarn)
			}
			if l.count("Using the etcd") != 1 {
				t.Errorf("the choice was logged %d times, want once", l.count("Using the etcd"))
			}
			// Later calls use the same manager without choosing again.
			getConfig(t, m)
			if l.count("Using the etcd") != 1 {
				t.Errorf("a second call chose again")
			}
			if metrics.EtcdAPI.WithLabelValues(tc.wantAPI).Get() != 1 {
				t.Errorf("etcd_api{api=%q} is not 1", tc.wantAPI)
			}
			// Having chosen v2, the node closed its v3 client (and its
			// connection to etcd); having chosen v3, it uses it.
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if _, err := v3.ConfigExists(ctx); (err != nil) != (tc.wantAPI == V2) {
				t.Errorf("chose %s, then a read through the v3 client: %v", tc.wantAPI, err)
			}
		})
	}
}

// TestAutoWaits starts with no config anywhere: auto waits (logging once)
// and takes the keyspace the config then appears in.
func TestAutoWaits(t *testing.T) {
	for _, api := range []string{V3, V2} {
		t.Run("config appears in "+api, func(t *testing.T) {
			srv := etcdtest.Start(t)
			m, l := newAuto(t, srv, Auto)
			done := make(chan *subnet.Config, 1)
			go func() { done <- getConfig(t, m) }()
			// The first probe round logs the wait; several more follow.
			for deadline := time.Now().Add(20 * time.Second); l.count("Waiting for the network config") == 0 && time.Now().Before(deadline); {
				time.Sleep(20 * time.Millisecond)
			}
			time.Sleep(300 * time.Millisecond)
			if m.API() != "" {
				t.Fatalf("chose %s with no config anywhere", m.API())
			}
			if n := l.count("Waiting for the network config"); n != 1 {
				t.Errorf("waiting logged %d times, want once", n)
			}
			if api == V3 {
				putV3(t, srv, "/coreos.com/network/config", config3)
			} else {
				putV2(t, srv, "/coreos.com/network/config", config2)
			}
			select {
			case <-done:
			case <-time.After(30 * time.Second):
				t.Fatal("auto did not notice the config")
			}
			if m.API() != api {
				t.Errorf("chose %s, want %s", m.API(), api)
			}
		})
	}
}

func TestFixedAPI(t *testing.T) {
	srv := etcdtest.Start(t)
	putV3(t, srv, "/coreos.com/network/config", config3)
	putV2(t, srv, "/coreos.com/network/config", config2)
	for api, want := range map[string]string{V2: "10.2.0.0/16", V3: "10.3.0.0/16"} {
		m, _ := newAuto(t, srv, api)
		if cfg := getConfig(t, m); cfg.Network != netip.MustParsePrefix(want) || m.API() != api {
			t.Errorf("--etcd-api=%s: %s %v, want %s", api, m.API(), cfg.Network, want)
		}
	}
	if _, err := ParseAPI("v4"); err == nil || !strings.Contains(err.Error(), "auto, v2 or v3") {
		t.Errorf("ParseAPI(v4) = %v", err)
	}
}

// TestAutoAccessDenied: with a wrong password auto stops at once with the
// remedy instead of waiting for a config it may not read.
func TestAutoAccessDenied(t *testing.T) {
	srv := etcdtest.Start(t)
	putV3(t, srv, "/coreos.com/network/config", config3)
	c, err := clientv3.New(clientv3.Config{Endpoints: srv.Endpoints(), DialTimeout: 10 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	for _, step := range []func() error{
		func() error { _, err := c.UserAdd(ctx, "root", "rootpw"); return err },
		func() error { _, err := c.UserGrantRole(ctx, "root", "root"); return err },
		func() error { _, err := c.AuthEnable(ctx); return err },
	} {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}
	l := &logs{}
	m, err := New(Options{Endpoints: srv.Endpoints(), Username: "root", Password: "wrong", Logger: l.logger()})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	_, err = m.GetNetworkConfig(ctx)
	if err == nil || ctx.Err() != nil || !strings.Contains(err.Error(), "check the etcd username, password") {
		t.Fatalf("GetNetworkConfig with a wrong password = %v, want a refusal at once", err)
	}
	if l.count("wrong") != 0 || strings.Contains(err.Error(), "wrong") {
		t.Errorf("the password appears in a log line or the error")
	}
}
