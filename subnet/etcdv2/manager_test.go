package etcdv2

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	client "go.etcd.io/etcd/client/v2"

	"github.com/flanneld-go/flanneld/internal/etcdtest"
	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/subnet"
)

func attrsFor(publicIP string) subnet.LeaseAttrs {
	return subnet.LeaseAttrs{
		PublicIP:    netip.MustParseAddr(publicIP),
		BackendType: "vxlan",
		BackendData: []byte(`{"VtepMAC":"82:4b:b6:2f:54:4e"}`),
	}
}

func leaseKeyOf(p netip.Prefix) string { return "subnets/" + ip.Key(p) }

func TestGetNetworkConfigWaitsForKey(t *testing.T) {
	srv := etcdtest.Start(t)
	m, api := newTestManager(t, srv)
	m.configRetry = 50 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)

	type result struct {
		cfg *subnet.Config
		err error
	}
	res := make(chan result, 1)
	go func() {
		cfg, err := m.GetNetworkConfig(ctx)
		res <- result{cfg, err}
	}()
	eventually(t, "a few reads of the missing key", func() bool { return api.gets.Load() >= 3 })
	select {
	case r := <-res:
		t.Fatalf("GetNetworkConfig returned %v, %v before the key existed", r.cfg, r.err)
	default:
	}
	put(t, srv, "config", testConfig, 0)
	r := <-res
	if r.err != nil {
		t.Fatalf("GetNetworkConfig: %v", r.err)
	}
	if r.cfg.Network != pfx("10.5.0.0/16") || r.cfg.BackendType != "vxlan" || r.cfg.SubnetMax != netip.MustParseAddr("10.5.50.0") {
		t.Errorf("config = %+v", r.cfg)
	}
}

func TestGetNetworkConfigCancel(t *testing.T) {
	srv := etcdtest.Start(t)
	m, _ := newTestManager(t, srv)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if _, err := m.GetNetworkConfig(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("GetNetworkConfig without config = %v, want context.DeadlineExceeded", err)
	}
}

func TestGetNetworkConfigInvalid(t *testing.T) {
	srv := etcdtest.Start(t)
	for _, tc := range []struct {
		value, want string
	}{
		{`{"Network":"10.5.0.0/16","SubnetLen":31}`, "invalid network config at /coreos.com/network/config: SubnetLen 31 is longer than 30"},
		{`not json`, "invalid network config at /coreos.com/network/config: not a JSON object"},
	} {
		put(t, srv, "config", tc.value, 0)
		m, api := newTestManager(t, srv)
		_, err := m.GetNetworkConfig(context.Background())
		if !errors.Is(err, subnet.ErrInvalidConfig) {
			t.Fatalf("GetNetworkConfig(%s) = %v, want ErrInvalidConfig", tc.value, err)
		}
		if !strings.HasPrefix(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("error %q, want one line starting %q", err, tc.want)
		}
		if n := api.gets.Load(); n != 1 {
			t.Errorf("read the config %d times, want 1 (no retry)", n)
		}
	}
}

func TestAcquireConcurrent(t *testing.T) {
	srv := etcdtest.Start(t)
	put(t, srv, "config", testConfig, 0)
	cfg := mustConfig(t, testConfig)
	const n = 50
	leases := make([]*subnet.Lease, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	apis := make([]*countingAPI, n)
	for i := range n {
		m, api := newTestManager(t, srv)
		apis[i] = api
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			leases[i], errs[i] = m.AcquireLease(context.Background(), cfg, attrsFor(fmt.Sprintf("192.168.1.%d", i+1)), subnet.Lease{})
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
			t.Errorf("manager %d got %v, outside %v..%v", i, l.Subnet, cfg.SubnetMin, cfg.SubnetMax)
		}
		if j, dup := seen[l.Subnet]; dup {
			t.Errorf("managers %d and %d both got %v", j, i, l.Subnet)
		}
		seen[l.Subnet] = i
		for p := range seen {
			if p != l.Subnet && p.Overlaps(l.Subnet) {
				t.Errorf("%v overlaps %v", p, l.Subnet)
			}
		}
		if l.Reservation() || time.Until(l.Expiration) < LeaseTTL-time.Hour {
			t.Errorf("manager %d: expiration %v, want about 24h ahead", i, l.Expiration)
		}
		// The key holds what this manager wrote.
		node := getNode(t, srv, leaseKeyOf(l.Subnet))
		a, err := subnet.ParseLeaseAttrs([]byte(node.Value))
		if err != nil || a.PublicIP != l.Attrs.PublicIP || node.TTL <= 0 {
			t.Errorf("key of %v = %q ttl %d, want PublicIP %v with a TTL", l.Subnet, node.Value, node.TTL, l.Attrs.PublicIP)
		}
	}
	if len(seen) != n {
		t.Fatalf("%d distinct subnets, want %d", len(seen), n)
	}
	most := int64(0)
	for _, a := range apis {
		most = max(most, a.sets.Load())
	}
	t.Logf("most create attempts by one manager: %d of %d allowed", most, maxAcquireAttempts)

	m, _ := newTestManager(t, srv)
	_, err := m.AcquireLease(context.Background(), cfg, attrsFor("192.168.2.1"), subnet.Lease{})
	if !errors.Is(err, subnet.ErrNoFreeSubnets) {
		t.Fatalf("acquire on a full range = %v, want ErrNoFreeSubnets", err)
	}
}

func TestAcquireRestart(t *testing.T) {
	srv := etcdtest.Start(t)
	cfg := mustConfig(t, testConfig)
	ctx := context.Background()

	m1, _ := newTestManager(t, srv)
	l1, err := m1.AcquireLease(ctx, cfg, attrsFor("192.168.0.1"), subnet.Lease{})
	if err != nil {
		t.Fatal(err)
	}

	t.Run("same public IP gets its lease back", func(t *testing.T) {
		m, _ := newTestManager(t, srv)
		a := attrsFor("192.168.0.1")
		a.BackendData = []byte(`{"VtepMAC":"02:00:00:00:00:01"}`) // a new MAC after restart
		l, err := m.AcquireLease(ctx, cfg, a, subnet.Lease{})
		if err != nil {
			t.Fatal(err)
		}
		if l.Subnet != l1.Subnet {
			t.Fatalf("got %v, want the existing lease %v", l.Subnet, l1.Subnet)
		}
		node := getNode(t, srv, leaseKeyOf(l.Subnet))
		if !strings.Contains(node.Value, "02:00:00:00:00:01") || node.TTL <= 0 {
			t.Errorf("key = %q ttl %d, want the new value with a TTL", node.Value, node.TTL)
		}
	})

	t.Run("new public IP gets prev when free", func(t *testing.T) {
		prev := pfx("10.5.33.0/24")
		if prev == l1.Subnet {
			prev = pfx("10.5.34.0/24")
		}
		m, _ := newTestManager(t, srv)
		l, err := m.AcquireLease(ctx, cfg, attrsFor("192.168.0.2"), subnet.Lease{Subnet: prev})
		if err != nil {
			t.Fatal(err)
		}
		if l.Subnet != prev {
			t.Fatalf("got %v, want prev %v", l.Subnet, prev)
		}
	})

	t.Run("lease expired, node came back with another IP", func(t *testing.T) {
		m, _ := newTestManager(t, srv)
		l, err := m.AcquireLease(ctx, cfg, attrsFor("192.168.0.3"), subnet.Lease{})
		if err != nil {
			t.Fatal(err)
		}
		del(t, srv, leaseKeyOf(l.Subnet)) // as if expired
		l2, err := m.AcquireLease(ctx, cfg, attrsFor("192.168.0.33"), subnet.Lease{Subnet: l.Subnet})
		if err != nil {
			t.Fatal(err)
		}
		if l2.Subnet != l.Subnet {
			t.Fatalf("got %v, want prev %v", l2.Subnet, l.Subnet)
		}
	})

	t.Run("prev held by another node is not taken", func(t *testing.T) {
		before := getNode(t, srv, leaseKeyOf(l1.Subnet))
		m, _ := newTestManager(t, srv)
		l, err := m.AcquireLease(ctx, cfg, attrsFor("192.168.0.4"), subnet.Lease{Subnet: l1.Subnet})
		if err != nil {
			t.Fatal(err)
		}
		if l.Subnet == l1.Subnet {
			t.Fatalf("took %v, held by 192.168.0.1", l.Subnet)
		}
		after := getNode(t, srv, leaseKeyOf(l1.Subnet))
		if after.Value != before.Value || after.ModifiedIndex != before.ModifiedIndex {
			t.Errorf("the other node's key changed: %q@%d → %q@%d", before.Value, before.ModifiedIndex, after.Value, after.ModifiedIndex)
		}
	})

	t.Run("own lease outside the range is left alone", func(t *testing.T) {
		put(t, srv, "subnets/10.5.200.0-24", `{"PublicIP":"192.168.0.5"}`, time.Hour)
		m, _ := newTestManager(t, srv)
		l, err := m.AcquireLease(ctx, cfg, attrsFor("192.168.0.5"), subnet.Lease{})
		if err != nil {
			t.Fatal(err)
		}
		if !cfg.InRange(l.Subnet) {
			t.Fatalf("got %v, outside the range", l.Subnet)
		}
		if n := getNode(t, srv, "subnets/10.5.200.0-24"); n == nil || n.Value != `{"PublicIP":"192.168.0.5"}` {
			t.Errorf("the out-of-range key changed: %+v", n)
		}
	})
}

func TestAcquireSkipsGarbage(t *testing.T) {
	srv := etcdtest.Start(t)
	// Four subnets; two hold garbage, one a lease of another node.
	cfg := mustConfig(t, `{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.4.0"}`)
	put(t, srv, "subnets/10.5.1.0-24", "garbage", 0)
	put(t, srv, "subnets/10.5.2.1-24", `{"PublicIP":"192.168.0.9"}`, 0) // misnamed
	put(t, srv, "subnets/10.5.3.0-24", `{"PublicIP":"192.168.0.8"}`, time.Hour)
	m, _ := newTestManager(t, srv)
	l, err := m.AcquireLease(context.Background(), cfg, attrsFor("192.168.0.1"), subnet.Lease{Subnet: pfx("10.5.1.0/24")})
	if err != nil {
		t.Fatal(err)
	}
	if l.Subnet != pfx("10.5.4.0/24") {
		t.Fatalf("got %v, want the only free subnet 10.5.4.0/24", l.Subnet)
	}
	if _, err := m.AcquireLease(context.Background(), cfg, attrsFor("192.168.0.2"), subnet.Lease{}); !errors.Is(err, subnet.ErrNoFreeSubnets) {
		t.Fatalf("second acquire = %v, want ErrNoFreeSubnets", err)
	}
	if n := getNode(t, srv, "subnets/10.5.1.0-24"); n == nil || n.Value != "garbage" {
		t.Errorf("garbage key changed: %+v", n)
	}
}

func TestReservation(t *testing.T) {
	srv := etcdtest.Start(t)
	// Three subnets: one reserved for 192.168.0.7.
	cfg := mustConfig(t, `{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.3.0"}`)
	reserved := pfx("10.5.2.0/24")
	put(t, srv, leaseKeyOf(reserved), `{"PublicIP":"192.168.0.7"}`, 0)
	ctx := context.Background()

	// Other nodes fill the rest and never take the reservation, not even as prev.
	for i, prev := range []netip.Prefix{reserved, {}} {
		m, _ := newTestManager(t, srv)
		l, err := m.AcquireLease(ctx, cfg, attrsFor(fmt.Sprintf("192.168.0.%d", 20+i)), subnet.Lease{Subnet: prev})
		if err != nil {
			t.Fatal(err)
		}
		if l.Subnet == reserved {
			t.Fatalf("node %d took the reservation", i)
		}
	}
	m, _ := newTestManager(t, srv)
	if _, err := m.AcquireLease(ctx, cfg, attrsFor("192.168.0.30"), subnet.Lease{Subnet: reserved}); !errors.Is(err, subnet.ErrNoFreeSubnets) {
		t.Fatalf("acquire with only the reservation left = %v, want ErrNoFreeSubnets", err)
	}

	own, _ := newTestManager(t, srv)
	l, err := own.AcquireLease(ctx, cfg, attrsFor("192.168.0.7"), subnet.Lease{})
	if err != nil {
		t.Fatal(err)
	}
	if l.Subnet != reserved || !l.Reservation() {
		t.Fatalf("got %v expiration %v, want the reservation %v without expiration", l.Subnet, l.Expiration, reserved)
	}
	checkTTLless := func(when string) {
		n := getNode(t, srv, leaseKeyOf(reserved))
		if n.TTL != 0 || n.Expiration != nil {
			t.Errorf("%s: reservation has ttl %d expiration %v, want none", when, n.TTL, n.Expiration)
		}
		if !strings.Contains(n.Value, "VtepMAC") {
			t.Errorf("%s: value %q, want our attributes", when, n.Value)
		}
	}
	checkTTLless("after acquire")
	// Acquiring again (a restart) is a no-op write-wise and stays TTL-less.
	before := getNode(t, srv, leaseKeyOf(reserved)).ModifiedIndex
	if l, err = own.AcquireLease(ctx, cfg, attrsFor("192.168.0.7"), subnet.Lease{}); err != nil || l.Subnet != reserved {
		t.Fatalf("re-acquire = %v, %v", l, err)
	}
	if after := getNode(t, srv, leaseKeyOf(reserved)).ModifiedIndex; after != before {
		t.Errorf("re-acquiring an unchanged reservation rewrote it (%d → %d)", before, after)
	}
	if err := own.RenewLease(ctx, l); err != nil {
		t.Fatalf("renewing the reservation: %v", err)
	}
	if !l.Reservation() {
		t.Errorf("after renew the lease has expiration %v", l.Expiration)
	}
	checkTTLless("after renew")

	// A reservation handed to another node is lost to us.
	put(t, srv, leaseKeyOf(reserved), `{"PublicIP":"192.168.0.99"}`, 0)
	if err := own.RenewLease(ctx, l); !errors.Is(err, subnet.ErrLeaseLost) {
		t.Errorf("renewing a reservation now for another node = %v, want ErrLeaseLost", err)
	}
}

func TestRenew(t *testing.T) {
	srv := etcdtest.Start(t)
	cfg := mustConfig(t, testConfig)
	ctx := context.Background()
	m, api := newTestManager(t, srv)
	l, err := m.AcquireLease(ctx, cfg, attrsFor("192.168.0.1"), subnet.Lease{})
	if err != nil {
		t.Fatal(err)
	}
	key := leaseKeyOf(l.Subnet)
	value := getNode(t, srv, key).Value

	// As if most of the day had passed: 100 s left.
	put(t, srv, key, value, 100*time.Second)
	l.Expiration = time.Now().Add(100 * time.Second)
	before := l.Expiration
	calls := api.total()
	if err := m.RenewLease(ctx, l); err != nil {
		t.Fatalf("RenewLease: %v", err)
	}
	if n := api.total() - calls; n != 1 {
		t.Errorf("renewal made %d requests, want 1", n)
	}
	n := getNode(t, srv, key)
	if n.TTL < int64(LeaseTTL/time.Second)-60 || n.Value != value {
		t.Errorf("after renew ttl %d value %q, want about %d and the same value", n.TTL, n.Value, int64(LeaseTTL/time.Second))
	}
	if !l.Expiration.After(before.Add(LeaseTTL-time.Hour)) || n.Expiration == nil || !l.Expiration.Equal(*n.Expiration) {
		t.Errorf("lease expiration %v (key %v), want about 24h ahead", l.Expiration, n.Expiration)
	}

	// Another node took the key: we must not clobber it.
	other := `{"PublicIP":"192.168.0.2"}`
	put(t, srv, key, other, time.Hour)
	if err := m.RenewLease(ctx, l); !errors.Is(err, subnet.ErrLeaseLost) {
		t.Fatalf("renew of a key held by another node = %v, want ErrLeaseLost", err)
	}
	if n := getNode(t, srv, key); n.Value != other {
		t.Errorf("renew clobbered the other node's key: %q", n.Value)
	}
}

func TestLeaseLostAndWatchRemoved(t *testing.T) {
	srv := etcdtest.Start(t)
	cfg := mustConfig(t, testConfig)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	m, _ := newTestManager(t, srv)
	l, err := m.AcquireLease(ctx, cfg, attrsFor("192.168.0.1"), subnet.Lease{})
	if err != nil {
		t.Fatal(err)
	}
	col := startCollector(t, ctx, m)
	col.waitFor(t, map[netip.Prefix]string{l.Subnet: "192.168.0.1"})

	del(t, srv, leaseKeyOf(l.Subnet))
	if err := m.RenewLease(ctx, l); !errors.Is(err, subnet.ErrLeaseLost) {
		t.Fatalf("renew of a deleted key = %v, want ErrLeaseLost", err)
	}
	if getNode(t, srv, leaseKeyOf(l.Subnet)) != nil {
		t.Errorf("renew recreated the deleted key")
	}
	col.waitFor(t, map[netip.Prefix]string{})
	if !col.sawRemoved(l.Subnet) {
		t.Errorf("watch did not report Removed for %v", l.Subnet)
	}
}

func TestTLS(t *testing.T) {
	srv := etcdtest.Start(t, etcdtest.WithTLS())
	put(t, srv, "config", testConfig, 0)
	f := srv.TLS()
	cfg := mustConfig(t, testConfig)
	ctx := context.Background()

	m, err := New(Options{Endpoints: srv.Endpoints(), CertFile: f.ClientCert, KeyFile: f.ClientKey, CAFile: f.CAFile, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.GetNetworkConfig(ctx); err != nil {
		t.Fatalf("GetNetworkConfig with TLS: %v", err)
	}
	if _, err := m.AcquireLease(ctx, cfg, attrsFor("192.168.0.1"), subnet.Lease{}); err != nil {
		t.Fatalf("AcquireLease with TLS: %v", err)
	}

	for _, tc := range []struct {
		name string
		opts Options
	}{
		{"no TLS options", Options{}},
		{"CA but no client certificate", Options{CAFile: f.CAFile}},
		{"client certificate but unknown CA", Options{CertFile: f.ClientCert, KeyFile: f.ClientKey}},
		{"plain http", Options{Endpoints: []string{strings.Replace(srv.Endpoints()[0], "https://", "http://", 1)}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := tc.opts
			if opts.Endpoints == nil {
				opts.Endpoints = srv.Endpoints()
			}
			opts.Logger = testLogger(t)
			m, err := New(opts)
			if err != nil {
				t.Fatal(err)
			}
			_, err = m.AcquireLease(ctx, cfg, attrsFor("192.168.0.2"), subnet.Lease{})
			if err == nil {
				t.Fatal("AcquireLease succeeded, want the connection refused")
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error spans lines: %q", err)
			}
			t.Logf("refused: %v", err)
		})
	}
	// Only the TLS client's lease exists.
	resp, err := srv.KeysAPI().Get(ctx, testPrefix+"/subnets", &client.GetOptions{Recursive: true})
	if err != nil || len(resp.Node.Nodes) != 1 {
		t.Errorf("subnets = %v, %v; want exactly one lease", resp, err)
	}
}

func TestTLSOptionErrors(t *testing.T) {
	srv := etcdtest.Start(t, etcdtest.WithTLS())
	f := srv.TLS()
	for _, tc := range []struct {
		name string
		opts Options
		want string
	}{
		{"cert without key", Options{CertFile: f.ClientCert}, "set both"},
		{"missing key file", Options{CertFile: f.ClientCert, KeyFile: "/nonexistent/key.pem"}, "loading etcd client certificate"},
		{"CA not PEM", Options{CAFile: f.ClientKey}, "no PEM certificate"},
		{"missing CA", Options{CAFile: "/nonexistent/ca.pem"}, "loading etcd CA file"},
		{"bad endpoint", Options{Endpoints: []string{"127.0.0.1:2379"}}, "invalid etcd endpoint"},
		{"bad prefix", Options{Prefix: "coreos.com/network"}, "invalid etcd prefix"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(tc.opts)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("New = %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

func TestBasicAuth(t *testing.T) {
	srv := etcdtest.Start(t)
	put(t, srv, "config", testConfig, 0)
	ctx := context.Background()
	const rootPW = "s3cret-root"
	const pw = "s3cret-flannel"

	// v2 auth: a root user, a role for the prefix, a user with it; then
	// enable auth and take every permission from guest.
	c := srv.Client()
	users, roles := client.NewAuthUserAPI(c), client.NewAuthRoleAPI(c)
	if err := users.AddUser(ctx, "root", rootPW); err != nil {
		t.Fatalf("adding root user: %v", err)
	}
	if err := roles.AddRole(ctx, "flannel"); err != nil {
		t.Fatalf("adding role: %v", err)
	}
	if _, err := roles.GrantRoleKV(ctx, "flannel", []string{testPrefix, testPrefix + "/*"}, client.ReadWritePermission); err != nil {
		t.Fatalf("granting role: %v", err)
	}
	if err := users.AddUser(ctx, "flannel", pw); err != nil {
		t.Fatalf("adding user: %v", err)
	}
	if _, err := users.GrantUser(ctx, "flannel", []string{"flannel"}); err != nil {
		t.Fatalf("granting user: %v", err)
	}
	if err := client.NewAuthAPI(c).Enable(ctx); err != nil {
		t.Fatalf("enabling auth: %v", err)
	}
	rootClient, err := client.New(client.Config{Endpoints: srv.Endpoints(), Username: "root", Password: rootPW})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := client.NewAuthRoleAPI(rootClient).RevokeRoleKV(ctx, "guest", []string{"/*"}, client.ReadWritePermission); err != nil {
		t.Fatalf("revoking guest: %v", err)
	}

	var logs []string
	m, err := New(Options{Endpoints: srv.Endpoints(), Username: "flannel", Password: pw, Logger: captureLogger(&logs)})
	if err != nil {
		t.Fatal(err)
	}
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
			m, err := New(Options{Endpoints: srv.Endpoints(), Username: tc.user, Password: tc.pw, Logger: captureLogger(&logs)})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
			defer cancel()
			_, err = m.GetNetworkConfig(ctx)
			if etcdCode(err) != client.ErrorCodeUnauthorized {
				t.Fatalf("GetNetworkConfig = %v, want etcd error %d (unauthorized) at once", err, client.ErrorCodeUnauthorized)
			}
			if tc.user != "" {
				return // each request with a password costs a bcrypt on the server
			}
			if _, err := m.AcquireLease(ctx, cfg, attrsFor("192.168.0.2"), subnet.Lease{}); etcdCode(err) != client.ErrorCodeUnauthorized {
				t.Fatalf("AcquireLease = %v, want etcd error %d (unauthorized)", err, client.ErrorCodeUnauthorized)
			}
		})
	}
	logMu.Lock()
	defer logMu.Unlock()
	for _, l := range logs {
		if strings.Contains(l, pw) || strings.Contains(l, rootPW) {
			t.Errorf("a log line holds the password: %s", l)
		}
	}
}

func TestDeadEndpointIsSkipped(t *testing.T) {
	srv := etcdtest.Start(t)
	put(t, srv, "config", testConfig, 0)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "http://" + l.Addr().String()
	l.Close() // nothing listens there now
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
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
