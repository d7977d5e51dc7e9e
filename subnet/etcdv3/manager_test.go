package etcdv3

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flanneld-go/flanneld/internal/etcdtest"
	"github.com/flanneld-go/flanneld/subnet"
)

func TestGetNetworkConfigWaitsForKey(t *testing.T) {
	srv := etcdtest.Start(t)
	c := v3(t, srv)
	m, api := newTestManager(t, srv)
	m.configRetry = 50 * time.Millisecond
	got := make(chan error, 1)
	var cfg *subnet.Config
	go func() {
		var err error
		cfg, err = m.GetNetworkConfig(ctxT(t))
		got <- err
	}()
	eventually(t, "a few reads of the missing key", func() bool { return api.gets.Load() >= 3 })
	put(t, c, "config", testConfig, 0)
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	if cfg.Network != pfx("10.5.0.0/16") || cfg.BackendType != "vxlan" {
		t.Errorf("config = %+v", cfg)
	}
}

func TestGetNetworkConfigInvalid(t *testing.T) {
	srv := etcdtest.Start(t)
	put(t, v3(t, srv), "config", `{"Network":"10.5.0.0/16","SubnetLen":31}`, 0)
	m, _ := newTestManager(t, srv)
	_, err := m.GetNetworkConfig(ctxT(t))
	if !errors.Is(err, subnet.ErrInvalidConfig) || !strings.Contains(err.Error(), testPrefix+"/config") {
		t.Fatalf("GetNetworkConfig = %v, want an ErrInvalidConfig naming the key", err)
	}
}

func TestAcquireConcurrent(t *testing.T) {
	srv := etcdtest.Start(t)
	c := v3(t, srv)
	put(t, c, "config", testConfig, 0)
	cfg := mustConfig(t, testConfig)
	const n = 50
	leases := make([]*subnet.Lease, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		m, _ := newTestManager(t, srv)
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			leases[i], errs[i] = m.AcquireLease(ctxT(t), cfg, attrsFor(fmt.Sprintf("192.168.1.%d", i+1)), subnet.Lease{})
		}()
	}
	close(start)
	wg.Wait()
	seen := map[netip.Prefix]int{}
	for i, l := range leases {
		if errs[i] != nil {
			t.Fatalf("manager %d: %v", i, errs[i])
		}
		if !cfg.InRange(l.Subnet) {
			t.Errorf("manager %d got %v, outside the range", i, l.Subnet)
		}
		if j, dup := seen[l.Subnet]; dup {
			t.Errorf("managers %d and %d both got %v", j, i, l.Subnet)
		}
		seen[l.Subnet] = i
		if l.Reservation() || time.Until(l.Expiration) < LeaseTTL-time.Hour {
			t.Errorf("manager %d: expiration %v, want about 24h ahead", i, l.Expiration)
		}
		resp := getKV(t, c, leaseKeyOf(l.Subnet))
		if resp == nil {
			t.Fatalf("no key for %v", l.Subnet)
		}
		kv := resp.Kvs[0]
		if !holds(kv, l.Attrs) || kv.Lease == 0 {
			t.Errorf("key of %v = %q lease %d, want PublicIP %v attached to an etcd lease", l.Subnet, kv.Value, kv.Lease, l.Attrs.PublicIP)
		}
		ttl, err := c.TimeToLive(context.Background(), clientv3.LeaseID(kv.Lease))
		if err != nil || ttl.GrantedTTL != int64(LeaseTTL/time.Second) {
			t.Errorf("etcd lease of %v: %+v, %v; want granted TTL 86400", l.Subnet, ttl, err)
		}
	}
	if len(seen) != n {
		t.Fatalf("%d distinct subnets, want %d", len(seen), n)
	}
	m, api := newTestManager(t, srv)
	_, err := m.AcquireLease(ctxT(t), cfg, attrsFor("192.168.2.1"), subnet.Lease{})
	if !errors.Is(err, subnet.ErrNoFreeSubnets) {
		t.Fatalf("acquire on a full range = %v, want ErrNoFreeSubnets", err)
	}
	if api.grants.Load() != 0 {
		t.Errorf("a full range granted %d etcd leases, want none", api.grants.Load())
	}
	// Leases granted for keys that others took first were revoked: every
	// etcd lease left holds a key.
	ls, err := c.Leases(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(ls.Leases) != n {
		t.Errorf("%d etcd leases exist, want %d (one per key; unused grants revoked)", len(ls.Leases), n)
	}
}

func TestAcquireRestart(t *testing.T) {
	srv := etcdtest.Start(t)
	c := v3(t, srv)
	put(t, c, "config", testConfig, 0)
	cfg := mustConfig(t, testConfig)
	ctx := ctxT(t)

	m1, _ := newTestManager(t, srv)
	l1, err := m1.AcquireLease(ctx, cfg, attrsFor("192.168.0.1"), subnet.Lease{})
	if err != nil {
		t.Fatal(err)
	}
	before := getKV(t, c, leaseKeyOf(l1.Subnet)).Kvs[0]

	// Same PublicIP, new VtepMAC: the same subnet, the same etcd lease, the
	// new value.
	m2, api := newTestManager(t, srv)
	a := attrsFor("192.168.0.1")
	a.BackendData = []byte(`{"VtepMAC":"02:00:00:00:00:01"}`)
	l2, err := m2.AcquireLease(ctx, cfg, a, subnet.Lease{Subnet: pfx("10.5.40.0/24")})
	if err != nil {
		t.Fatal(err)
	}
	if l2.Subnet != l1.Subnet {
		t.Fatalf("restart got %v, want its own %v back", l2.Subnet, l1.Subnet)
	}
	after := getKV(t, c, leaseKeyOf(l1.Subnet)).Kvs[0]
	if after.Lease != before.Lease || !strings.Contains(string(after.Value), "02:00:00:00:00:01") {
		t.Errorf("key after restart: %q lease %x; want the new value on etcd lease %x", after.Value, after.Lease, before.Lease)
	}
	if api.grants.Load() != 0 {
		t.Errorf("reuse granted %d new etcd leases, want 0", api.grants.Load())
	}

	// Same value again: nothing written, only the lease refreshed.
	m3, api3 := newTestManager(t, srv)
	if _, err := m3.AcquireLease(ctx, cfg, a, subnet.Lease{}); err != nil {
		t.Fatal(err)
	}
	if api3.txns.Load() != 0 || api3.keepalives.Load() != 1 {
		t.Errorf("unchanged restart: %d txns, %d keep-alives; want 0 and 1", api3.txns.Load(), api3.keepalives.Load())
	}

	// A new node with a free previous subnet gets it; with a taken one, another.
	m4, _ := newTestManager(t, srv)
	l4, err := m4.AcquireLease(ctx, cfg, attrsFor("192.168.0.2"), subnet.Lease{Subnet: pfx("10.5.33.0/24")})
	if err != nil || l4.Subnet != pfx("10.5.33.0/24") {
		t.Fatalf("with free prev: %v, %v; want 10.5.33.0/24", l4, err)
	}
	m5, _ := newTestManager(t, srv)
	l5, err := m5.AcquireLease(ctx, cfg, attrsFor("192.168.0.3"), subnet.Lease{Subnet: pfx("10.5.33.0/24")})
	if err != nil || l5.Subnet == l4.Subnet {
		t.Fatalf("with taken prev: %v, %v; want another subnet", l5, err)
	}
	// A previous subnet outside the range is ignored.
	m6, _ := newTestManager(t, srv)
	l6, err := m6.AcquireLease(ctx, cfg, attrsFor("192.168.0.4"), subnet.Lease{Subnet: pfx("10.5.99.0/24")})
	if err != nil || !cfg.InRange(l6.Subnet) {
		t.Fatalf("with prev out of range: %v, %v", l6, err)
	}
}

func TestAcquireSkipsGarbage(t *testing.T) {
	srv := etcdtest.Start(t)
	c := v3(t, srv)
	put(t, c, "config", `{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.3.0"}`, 0)
	cfg := mustConfig(t, `{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.3.0"}`)
	put(t, c, "subnets/10.5.1.0-24", "{not json", 0)
	put(t, c, "subnets/10.5.2.0-24x", `{"PublicIP":"192.168.0.1"}`, 0)
	put(t, c, "subnets/junk", `{"PublicIP":"192.168.0.1"}`, 0)
	m, _ := newTestManager(t, srv)
	l, err := m.AcquireLease(ctxT(t), cfg, attrsFor("192.168.0.1"), subnet.Lease{})
	if err != nil || l.Subnet != pfx("10.5.3.0/24") {
		t.Fatalf("AcquireLease = %v, %v; want 10.5.3.0/24, the one subnet no key claims", l, err)
	}
	if _, err := m.AcquireLease(ctxT(t), cfg, attrsFor("192.168.0.2"), subnet.Lease{}); !errors.Is(err, subnet.ErrNoFreeSubnets) {
		t.Fatalf("second node = %v, want ErrNoFreeSubnets (garbage keys still claim)", err)
	}
}

func TestReservation(t *testing.T) {
	srv := etcdtest.Start(t)
	c := v3(t, srv)
	put(t, c, "config", testConfig, 0)
	cfg := mustConfig(t, testConfig)
	put(t, c, "subnets/10.5.7.0-24", `{"PublicIP":"192.168.0.7"}`, 0)
	ctx := ctxT(t)

	// Another node never takes it, even as its previous subnet.
	other, _ := newTestManager(t, srv)
	lo, err := other.AcquireLease(ctx, cfg, attrsFor("192.168.0.8"), subnet.Lease{Subnet: pfx("10.5.7.0/24")})
	if err != nil || lo.Subnet == pfx("10.5.7.0/24") {
		t.Fatalf("other node: %v, %v; must not get the reservation", lo, err)
	}
	// The node with its PublicIP uses it and it stays without etcd lease.
	m, api := newTestManager(t, srv)
	l, err := m.AcquireLease(ctx, cfg, attrsFor("192.168.0.7"), subnet.Lease{})
	if err != nil || l.Subnet != pfx("10.5.7.0/24") || !l.Reservation() {
		t.Fatalf("reserved node: %+v, %v; want the reservation 10.5.7.0/24", l, err)
	}
	kv := getKV(t, c, "subnets/10.5.7.0-24").Kvs[0]
	if kv.Lease != 0 || !strings.Contains(string(kv.Value), "vxlan") {
		t.Errorf("reservation key = %q lease %d; want our value, no etcd lease", kv.Value, kv.Lease)
	}
	if api.grants.Load() != 0 {
		t.Errorf("%d etcd leases granted for a reservation", api.grants.Load())
	}
	if err := m.RenewLease(ctx, l); err != nil || !l.Reservation() {
		t.Fatalf("renewing the reservation: %v (expiration %v)", err, l.Expiration)
	}
	if kv := getKV(t, c, "subnets/10.5.7.0-24").Kvs[0]; kv.Lease != 0 {
		t.Errorf("renewal attached the reservation to etcd lease %d", kv.Lease)
	}
	del(t, c, "subnets/10.5.7.0-24")
	if err := m.RenewLease(ctx, l); !errors.Is(err, subnet.ErrLeaseLost) {
		t.Fatalf("renewing a deleted reservation = %v, want ErrLeaseLost", err)
	}
}

func TestRenew(t *testing.T) {
	srv := etcdtest.Start(t)
	c := v3(t, srv)
	put(t, c, "config", testConfig, 0)
	cfg := mustConfig(t, testConfig)
	ctx := ctxT(t)
	m, _ := newTestManager(t, srv)
	l, err := m.AcquireLease(ctx, cfg, attrsFor("192.168.0.1"), subnet.Lease{})
	if err != nil {
		t.Fatal(err)
	}
	id := clientv3.LeaseID(getKV(t, c, leaseKeyOf(l.Subnet)).Kvs[0].Lease)
	time.Sleep(2100 * time.Millisecond) // etcd counts TTLs in seconds
	before, err := c.TimeToLive(ctx, id)
	if err != nil || before.TTL > 86398 {
		t.Fatalf("TTL before renewal = %+v, %v; want at most 86398 after 2 s", before, err)
	}
	later := time.Now().Add(time.Hour)
	m.now = func() time.Time { return later }
	if err := m.RenewLease(ctx, l); err != nil {
		t.Fatal(err)
	}
	after, err := c.TimeToLive(ctx, id)
	if err != nil || after.TTL < 86399 {
		t.Fatalf("TTL after renewal = %+v, %v; want 86399 or more", after, err)
	}
	if want := later.Add(LeaseTTL); !l.Expiration.Equal(want) {
		t.Errorf("Expiration = %v, want %v", l.Expiration, want)
	}
	// Another node's value in our key: lost.
	put(t, c, leaseKeyOf(l.Subnet), `{"PublicIP":"192.168.0.99"}`, 0)
	if err := m.RenewLease(ctx, l); !errors.Is(err, subnet.ErrLeaseLost) {
		t.Fatalf("renewing a key holding another PublicIP = %v, want ErrLeaseLost", err)
	}
	// An etcd lease revoked (expired): the key is gone, lost.
	l2, err := m.AcquireLease(ctx, cfg, attrsFor("192.168.0.2"), subnet.Lease{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Revoke(ctx, clientv3.LeaseID(getKV(t, c, leaseKeyOf(l2.Subnet)).Kvs[0].Lease)); err != nil {
		t.Fatal(err)
	}
	if err := m.RenewLease(ctx, l2); !errors.Is(err, subnet.ErrLeaseLost) {
		t.Fatalf("renewing an expired lease = %v, want ErrLeaseLost", err)
	}
}

func TestLeaseLostAndWatchRemoved(t *testing.T) {
	srv := etcdtest.Start(t)
	c := v3(t, srv)
	put(t, c, "config", testConfig, 0)
	cfg := mustConfig(t, testConfig)
	ctx := ctxT(t)
	m, _ := newTestManager(t, srv)
	l, err := m.AcquireLease(ctx, cfg, attrsFor("192.168.0.1"), subnet.Lease{})
	if err != nil {
		t.Fatal(err)
	}
	col := startCollector(t, m)
	col.waitFor(t, map[netip.Prefix]string{l.Subnet: "192.168.0.1"})
	del(t, c, leaseKeyOf(l.Subnet))
	eventually(t, "Removed of the own lease", func() bool { return col.removals(l.Subnet) == 1 })
	if err := m.RenewLease(ctx, l); !errors.Is(err, subnet.ErrLeaseLost) {
		t.Fatalf("RenewLease after delete = %v, want ErrLeaseLost", err)
	}
	l2, err := m.AcquireLease(ctx, cfg, attrsFor("192.168.0.1"), subnet.Lease{Subnet: l.Subnet})
	if err != nil || l2.Subnet != l.Subnet {
		t.Fatalf("re-acquire = %v, %v; want %v again", l2, err, l.Subnet)
	}
	col.waitFor(t, map[netip.Prefix]string{l.Subnet: "192.168.0.1"})
}

func TestTLS(t *testing.T) {
	srv := etcdtest.Start(t, etcdtest.WithTLS())
	c := v3(t, srv)
	put(t, c, "config", testConfig, 0)
	m, _ := newTestManager(t, srv)
	cfg, err := m.GetNetworkConfig(ctxT(t))
	if err != nil {
		t.Fatalf("GetNetworkConfig over TLS with a client certificate: %v", err)
	}
	if _, err := m.AcquireLease(ctxT(t), cfg, attrsFor("192.168.0.1"), subnet.Lease{}); err != nil {
		t.Fatalf("AcquireLease over TLS: %v", err)
	}
	// Without a client certificate the server refuses.
	f := srv.TLS()
	var logs []string
	nocert, _ := newTestManager(t, srv, func(o *Options) {
		o.CertFile, o.KeyFile, o.CAFile, o.Logger = "", "", f.CAFile, captureLogger(&logs)
		o.RequestTimeout = time.Second
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := nocert.GetNetworkConfig(ctx); err == nil {
		t.Fatal("GetNetworkConfig without a client certificate succeeded")
	}
	logMu.Lock()
	defer logMu.Unlock()
	if len(logs) == 0 || !strings.Contains(strings.Join(logs, "\n"), "certificate") {
		t.Errorf("the refusal is not logged as a certificate problem: %q", logs)
	}
	// Bad options are one clear error at New.
	if _, err := New(Options{Endpoints: srv.Endpoints(), CertFile: f.ClientCert}); err == nil || !strings.Contains(err.Error(), "both") {
		t.Errorf("cert without key: %v", err)
	}
	if _, err := New(Options{Endpoints: []string{"127.0.0.1:2379"}}); err == nil || !strings.Contains(err.Error(), "http://127.0.0.1:2379") {
		t.Errorf("endpoint without scheme: %v", err)
	}
}

func TestBasicAuth(t *testing.T) {
	srv := etcdtest.Start(t)
	c := v3(t, srv)
	put(t, c, "config", testConfig, 0)
	ctx := ctxT(t)
	const rootPW = "s3cret-root"
	const pw = "s3cret-flannel"
	steps := []func() error{
		func() error { _, err := c.UserAdd(ctx, "root", rootPW); return err },
		func() error { _, err := c.UserGrantRole(ctx, "root", "root"); return err },
		func() error { _, err := c.RoleAdd(ctx, "flannel"); return err },
		func() error {
			_, err := c.RoleGrantPermission(ctx, "flannel", testPrefix+"/", clientv3.GetPrefixRangeEnd(testPrefix+"/"), clientv3.PermissionType(clientv3.PermReadWrite))
			return err
		},
		func() error { _, err := c.UserAdd(ctx, "flannel", pw); return err },
		func() error { _, err := c.UserGrantRole(ctx, "flannel", "flannel"); return err },
		func() error { _, err := c.AuthEnable(ctx); return err },
	}
	for i, s := range steps {
		if err := s(); err != nil {
			t.Fatalf("auth setup step %d: %v", i, err)
		}
	}

	var logs []string
	if _, err := New(Options{Endpoints: srv.Endpoints(), Username: "flannel", Password: pw, Logger: captureLogger(&logs)}); err != nil {
		t.Fatal(err)
	}
	m, _ := newTestManager(t, srv, func(o *Options) { o.Username, o.Password, o.Logger = "flannel", pw, captureLogger(&logs) })
	cfg, err := m.GetNetworkConfig(ctx)
	if err != nil {
		t.Fatalf("GetNetworkConfig with credentials: %v", err)
	}
	if _, err := m.AcquireLease(ctx, cfg, attrsFor("192.168.0.1"), subnet.Lease{}); err != nil {
		t.Fatalf("AcquireLease with credentials: %v", err)
	}
	for _, tc := range []struct{ name, user, pw string }{
		{"no credentials", "", ""},
		{"wrong password", "flannel", "wrong"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, _ := newTestManager(t, srv, func(o *Options) { o.Username, o.Password, o.Logger = tc.user, tc.pw, captureLogger(&logs) })
			ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
			defer cancel()
			_, err := m.GetNetworkConfig(ctx)
			if err == nil || ctx.Err() != nil || !strings.Contains(err.Error(), "refused access") {
				t.Fatalf("GetNetworkConfig = %v, want a refusal at once", err)
			}
			logMu.Lock()
			logs = append(logs, err.Error())
			logMu.Unlock()
		})
	}
	logMu.Lock()
	defer logMu.Unlock()
	for _, l := range logs {
		if strings.Contains(l, pw) || strings.Contains(l, rootPW) {
			t.Errorf("a log line holds the password: %s", l)
		}
	}
	if len(logs) == 0 {
		t.Errorf("no log line captured; the check above proves nothing")
	}
}

// TestShortLeaseMoves: a lease key on an etcd lease granted for less than a
// day (copied by flannel-migrate-v3 with the TTL it had left) moves to a new
// lease of a day when the node acquires or renews it, instead of being kept
// alive at its short TTL (which the daemon would renew in a loop).
func TestShortLeaseMoves(t *testing.T) {
	srv := etcdtest.Start(t)
	c := v3(t, srv)
	put(t, c, "config", testConfig, 0)
	cfg := mustConfig(t, testConfig)
	ctx := ctxT(t)
	grantedTTL := func(key string) int64 {
		t.Helper()
		kv := getKV(t, c, key).Kvs[0]
		ttl, err := c.TimeToLive(ctx, clientv3.LeaseID(kv.Lease))
		if err != nil {
			t.Fatal(err)
		}
		return ttl.GrantedTTL
	}
	value := `{"PublicIP":"192.168.0.1","BackendType":"vxlan","BackendData":{"VtepMAC":"82:4b:b6:2f:54:4e"}}`

	// Acquire: same value, short lease.
	put(t, c, "subnets/10.5.9.0-24", value, 10*time.Minute)
	m, _ := newTestManager(t, srv)
	l, err := m.AcquireLease(ctx, cfg, attrsFor("192.168.0.1"), subnet.Lease{})
	if err != nil || l.Subnet != pfx("10.5.9.0/24") {
		t.Fatalf("AcquireLease = %v, %v; want the existing 10.5.9.0/24", l, err)
	}
	if got := grantedTTL("subnets/10.5.9.0-24"); got != 86400 {
		t.Errorf("after acquiring, the key's etcd lease was granted %d s, want 86400", got)
	}
	if time.Until(l.Expiration) < LeaseTTL-time.Minute {
		t.Errorf("Expiration %v, want a day ahead", l.Expiration)
	}

	// Renew: the key put back on a short lease.
	put(t, c, "subnets/10.5.9.0-24", value, 10*time.Minute)
	if err := m.RenewLease(ctx, l); err != nil {
		t.Fatal(err)
	}
	if got := grantedTTL("subnets/10.5.9.0-24"); got != 86400 {
		t.Errorf("after renewing, the key's etcd lease was granted %d s, want 86400", got)
	}
	if time.Until(l.Expiration) < LeaseTTL-time.Minute {
		t.Errorf("Expiration after renewal %v, want a day ahead", l.Expiration)
	}
	// No grant wasted: the key's lease, the two short ones (left to
	// expire) and the day lease of the acquisition, which the test's second
	// put took the key off.
	ls, err := c.Leases(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(ls.Leases) != 4 {
		t.Errorf("%d etcd leases, want 4", len(ls.Leases))
	}
}
