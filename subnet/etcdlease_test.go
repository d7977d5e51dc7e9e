package subnet_test

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
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flanneld-go/flanneld/internal/etcdtest"
	"github.com/flanneld-go/flanneld/subnet"
)

// The etcd lease manager's behaviour, each test run against every store
// (see stores): etcd v2 and v3 embedded, and etcd 3.6.

func TestEtcdGetNetworkConfig(t *testing.T) {
	stores(t, func(t *testing.T, s *store) {
		m, api := s.manager(t)
		got := make(chan error, 1)
		var cfg *subnet.Config
		go func() {
			var err error
			cfg, err = m.GetNetworkConfig(ctxT(t))
			got <- err
		}()
		eventually(t, "a few reads of the missing key", func() bool { return api.gets.Load() >= 3 })
		s.put(t, "config", testConfig, 0)
		if err := <-got; err != nil {
			t.Fatal(err)
		}
		if cfg.Network != pfx("10.5.0.0/16") || cfg.BackendType != "vxlan" {
			t.Errorf("config = %+v", cfg)
		}

		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		s.del(t, "config")
		if _, err := m.GetNetworkConfig(ctx); !errors.Is(err, context.Canceled) {
			t.Errorf("GetNetworkConfig with a cancelled context = %v", err)
		}

		s.put(t, "config", `{"Network":"10.5.0.0/16","SubnetLen":31}`, 0)
		_, err := m.GetNetworkConfig(ctxT(t))
		if !errors.Is(err, subnet.ErrInvalidConfig) || !strings.Contains(err.Error(), testPrefix+"/config") {
			t.Fatalf("GetNetworkConfig = %v, want an ErrInvalidConfig naming the key", err)
		}
		if s.v2 {
			s.del(t, "config")
			s.put(t, "config/x", "{}", 0)
			if _, err := m.GetNetworkConfig(ctxT(t)); !errors.Is(err, subnet.ErrInvalidConfig) || !strings.Contains(err.Error(), "directory") {
				t.Errorf("GetNetworkConfig of a directory = %v, want an ErrInvalidConfig saying so", err)
			}
		}
	})
}

func TestEtcdAcquireConcurrent(t *testing.T) {
	stores(t, func(t *testing.T, s *store) {
		s.put(t, "config", testConfig, 0)
		cfg := mustConfig(t, testConfig)
		const n = 50
		leases := make([]*subnet.Lease, n)
		errs := make([]error, n)
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range n {
			m, _ := s.manager(t)
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
			if l.Reservation() || time.Until(l.Expiration) < subnet.EtcdLeaseTTL-time.Hour {
				t.Errorf("manager %d: expiration %v, want about 24h ahead", i, l.Expiration)
			}
			v, ttl, ok := s.get(t, leaseKeyOf(*l))
			if a, err := subnet.ParseLeaseAttrs([]byte(v)); !ok || err != nil || a.PublicIP != l.Attrs.PublicIP || ttl < subnet.EtcdLeaseTTL-time.Hour {
				t.Errorf("key of %v = %q (ttl %v), want PublicIP %v with a TTL of a day", l.Subnet, v, ttl, l.Attrs.PublicIP)
			}
		}
		if len(seen) != n {
			t.Fatalf("%d distinct subnets, want %d", len(seen), n)
		}
		m, api := s.manager(t)
		if _, err := m.AcquireLease(ctxT(t), cfg, attrsFor("192.168.2.1"), subnet.Lease{}); !errors.Is(err, subnet.ErrNoFreeSubnets) {
			t.Fatalf("acquire on a full range = %v, want ErrNoFreeSubnets", err)
		}
		if api.creates.Load() != 0 {
			t.Errorf("a full range tried %d creates, want none", api.creates.Load())
		}
		if !s.v2 {
			// Leases granted for keys that others took first were revoked:
			// every etcd lease left holds a key.
			ls, err := s.c.Leases(context.Background())
			if err != nil || len(ls.Leases) != n {
				t.Errorf("etcd leases %v, %v; want %d (one per key; unused grants revoked)", ls, err, n)
			}
		}
	})
}

// withLease writes testConfig and returns a manager of s that acquired a
// lease for publicIP.
func (s *store) withLease(t *testing.T, publicIP string) (*subnet.EtcdManager, *subnet.Config, *subnet.Lease) {
	t.Helper()
	s.put(t, "config", testConfig, 0)
	cfg := mustConfig(t, testConfig)
	m, _ := s.manager(t)
	l, err := m.AcquireLease(ctxT(t), cfg, attrsFor(publicIP), subnet.Lease{})
	if err != nil {
		t.Fatal(err)
	}
	return m, cfg, l
}

func TestEtcdAcquireRestart(t *testing.T) {
	stores(t, func(t *testing.T, s *store) {
		ctx := ctxT(t)
		_, cfg, l1 := s.withLease(t, "192.168.0.1")
		// Same PublicIP, new VtepMAC: the same subnet, the new value.
		m2, api2 := s.manager(t)
		a := attrsFor("192.168.0.1")
		a.BackendData = []byte(`{"VtepMAC":"02:00:00:00:00:01"}`)
		l2, err := m2.AcquireLease(ctx, cfg, a, subnet.Lease{Subnet: pfx("10.5.40.0/24")})
		if err != nil || l2.Subnet != l1.Subnet {
			t.Fatalf("restart = %v, %v; want its own %v back", l2, err, l1.Subnet)
		}
		if v, ttl, _ := s.get(t, leaseKeyOf(*l1)); !strings.Contains(v, "02:00:00:00:00:01") || ttl < subnet.EtcdLeaseTTL-time.Hour {
			t.Errorf("key after restart = %q (ttl %v), want the new value with a TTL of a day", v, ttl)
		}
		if api2.creates.Load() != 0 || api2.updates.Load() != 1 {
			t.Errorf("restart: %d creates, %d updates; want 0 and 1", api2.creates.Load(), api2.updates.Load())
		}
		// A new node with a free previous subnet gets it; with a taken one, another.
		m4, _ := s.manager(t)
		free := freeFrom(33, l1.Subnet)
		l4, err := m4.AcquireLease(ctx, cfg, attrsFor("192.168.0.2"), subnet.Lease{Subnet: free})
		if err != nil || l4.Subnet != free {
			t.Fatalf("with free prev: %v, %v; want %v", l4, err, free)
		}
		l5, err := m4.AcquireLease(ctx, cfg, attrsFor("192.168.0.3"), subnet.Lease{Subnet: free})
		if err != nil || l5.Subnet == l4.Subnet {
			t.Fatalf("with taken prev: %v, %v; want another subnet", l5, err)
		}
		// A previous subnet outside the range is ignored.
		l6, err := m4.AcquireLease(ctx, cfg, attrsFor("192.168.0.4"), subnet.Lease{Subnet: pfx("10.5.99.0/24")})
		if err != nil || !cfg.InRange(l6.Subnet) {
			t.Fatalf("with prev out of range: %v, %v", l6, err)
		}
		// Our PublicIP under a key name that is not in canonical form (a
		// leading zero): not ours, since renewals read the canonical key;
		// the name still claims its subnet.
		odd := freeFrom(44, l1.Subnet, l4.Subnet, l5.Subnet, l6.Subnet)
		s.put(t, "subnets/"+odd.Addr().String()+"-024", `{"PublicIP":"192.168.0.44"}`, 0)
		l7, err := m4.AcquireLease(ctx, cfg, attrsFor("192.168.0.44"), subnet.Lease{Subnet: odd})
		if err != nil || l7.Subnet == odd {
			t.Fatalf("with a non-canonical key of ours: %v, %v; want a new subnet", l7, err)
		}
	})
}

func TestEtcdAcquireSkipsGarbage(t *testing.T) {
	stores(t, func(t *testing.T, s *store) {
		js := `{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.3.0"}`
		s.put(t, "config", js, 0)
		cfg := mustConfig(t, js)
		s.put(t, "subnets/10.5.1.0-24", "{not json", 0)
		s.put(t, "subnets/10.5.2.0-24x", `{"PublicIP":"192.168.0.1"}`, 0)
		s.put(t, "subnets/junk", `{"PublicIP":"192.168.0.1"}`, 0)
		m, _ := s.manager(t)
		l, err := m.AcquireLease(ctxT(t), cfg, attrsFor("192.168.0.1"), subnet.Lease{})
		if err != nil || l.Subnet != pfx("10.5.3.0/24") {
			t.Fatalf("AcquireLease = %v, %v; want 10.5.3.0/24, the one subnet no key claims", l, err)
		}
		if _, err := m.AcquireLease(ctxT(t), cfg, attrsFor("192.168.0.2"), subnet.Lease{}); !errors.Is(err, subnet.ErrNoFreeSubnets) {
			t.Fatalf("second node = %v, want ErrNoFreeSubnets (garbage keys still claim)", err)
		}
	})
}

func TestEtcdReservation(t *testing.T) {
	stores(t, func(t *testing.T, s *store) {
		s.put(t, "config", testConfig, 0)
		cfg := mustConfig(t, testConfig)
		s.put(t, "subnets/10.5.7.0-24", `{"PublicIP":"192.168.0.7"}`, 0)
		ctx := ctxT(t)
		// Another node never takes it, even as its previous subnet.
		other, _ := s.manager(t)
		lo, err := other.AcquireLease(ctx, cfg, attrsFor("192.168.0.8"), subnet.Lease{Subnet: pfx("10.5.7.0/24")})
		if err != nil || lo.Subnet == pfx("10.5.7.0/24") {
			t.Fatalf("other node: %v, %v; must not get the reservation", lo, err)
		}
		// The node with its PublicIP uses it, and it stays without TTL.
		m, api := s.manager(t)
		a := attrsFor("192.168.0.7")
		a.PublicIPv6 = netip.MustParseAddr("fd00::7")
		l, err := m.AcquireLease(ctx, cfg, a, subnet.Lease{})
		if err != nil || l.Subnet != pfx("10.5.7.0/24") || !l.Reservation() {
			t.Fatalf("reserved node: %+v, %v; want the reservation 10.5.7.0/24", l, err)
		}
		if v, ttl, _ := s.get(t, "subnets/10.5.7.0-24"); ttl != 0 || !strings.Contains(v, "vxlan") {
			t.Errorf("reservation key = %q (ttl %v); want our value, no TTL", v, ttl)
		}
		if api.creates.Load() != 0 {
			t.Errorf("%d creates for a reservation", api.creates.Load())
		}
		// Acquiring it again with the same value writes nothing.
		before := api.updates.Load()
		if _, err := m.AcquireLease(ctx, cfg, a, subnet.Lease{}); err != nil || api.updates.Load() != before {
			t.Errorf("re-acquiring the reservation unchanged: %v, %d updates", err, api.updates.Load()-before)
		}
		if err := m.RenewLease(ctx, l); err != nil || !l.Reservation() {
			t.Fatalf("renewing the reservation: %v (expiration %v)", err, l.Expiration)
		}
		if _, ttl, _ := s.get(t, "subnets/10.5.7.0-24"); ttl != 0 {
			t.Errorf("renewal gave the reservation a TTL of %v", ttl)
		}
		// The key now names another node by its IPv6 address only: lost
		// (a renewal compares PublicIP and PublicIPv6, for every store).
		s.put(t, "subnets/10.5.7.0-24", `{"PublicIP":"192.168.0.7","PublicIPv6":"fd00::99"}`, 0)
		if err := m.RenewLease(ctx, l); !errors.Is(err, subnet.ErrLeaseLost) {
			t.Fatalf("renewing a reservation holding another PublicIPv6 = %v, want ErrLeaseLost", err)
		}
		s.del(t, "subnets/10.5.7.0-24")
		if err := m.RenewLease(ctx, l); !errors.Is(err, subnet.ErrLeaseLost) {
			t.Fatalf("renewing a deleted reservation = %v, want ErrLeaseLost", err)
		}
	})
}

// TestEtcdRenew: a renewal gives the key a fresh TTL of a day (v3: keeps
// its etcd lease alive, or moves it to a new one of a day when it was
// granted shorter, as flannel-migrate-v3 copies leases with the TTL they
// had left); a key that holds another node or is gone is lost.
func TestEtcdRenew(t *testing.T) {
	stores(t, func(t *testing.T, s *store) {
		s.put(t, "config", testConfig, 0)
		cfg := mustConfig(t, testConfig)
		ctx := ctxT(t)
		m, api := s.manager(t)
		value := `{"PublicIP":"192.168.0.1","BackendType":"vxlan","BackendData":{"VtepMAC":"82:4b:b6:2f:54:4e"}}`
		s.put(t, "subnets/10.5.9.0-24", value, 10*time.Minute)
		l, err := m.AcquireLease(ctx, cfg, attrsFor("192.168.0.1"), subnet.Lease{})
		if err != nil || l.Subnet != pfx("10.5.9.0/24") {
			t.Fatalf("AcquireLease = %v, %v; want the existing 10.5.9.0/24", l, err)
		}
		if _, ttl, _ := s.get(t, leaseKeyOf(*l)); ttl < subnet.EtcdLeaseTTL-time.Minute {
			t.Errorf("after acquiring a short lease its TTL is %v, want a day", ttl)
		}
		s.put(t, "subnets/10.5.9.0-24", value, 10*time.Minute)
		if err := m.RenewLease(ctx, l); err != nil {
			t.Fatal(err)
		}
		if _, ttl, _ := s.get(t, leaseKeyOf(*l)); ttl < subnet.EtcdLeaseTTL-time.Minute {
			t.Errorf("after renewing a short lease its TTL is %v, want a day", ttl)
		}
		if time.Until(l.Expiration) < subnet.EtcdLeaseTTL-time.Minute {
			t.Errorf("Expiration after renewal %v, want a day ahead", l.Expiration)
		}
		if n := api.creates.Load(); n != 0 {
			t.Errorf("%d creates, want 0", n)
		}
		if !s.v2 {
			// No grant wasted: the two short etcd leases (left to expire:
			// other keys may be on them) and the two of a day, the first
			// of which the test's second put took the key off.
			if ls, err := s.c.Leases(ctx); err != nil || len(ls.Leases) != 4 {
				t.Errorf("etcd leases %v, %v; want 4", ls, err)
			}
		}
		// Another node's value in our key: lost.
		s.put(t, leaseKeyOf(*l), `{"PublicIP":"192.168.0.99"}`, time.Hour)
		if err := m.RenewLease(ctx, l); !errors.Is(err, subnet.ErrLeaseLost) {
			t.Fatalf("renewing a key holding another PublicIP = %v, want ErrLeaseLost", err)
		}
		// An expired key (v3: its etcd lease revoked): lost.
		l2, err := m.AcquireLease(ctx, cfg, attrsFor("192.168.0.2"), subnet.Lease{})
		if err != nil {
			t.Fatal(err)
		}
		s.expire(t, leaseKeyOf(*l2))
		if err := m.RenewLease(ctx, l2); !errors.Is(err, subnet.ErrLeaseLost) {
			t.Fatalf("renewing an expired lease = %v, want ErrLeaseLost", err)
		}
		if _, _, ok := s.get(t, leaseKeyOf(*l2)); ok {
			t.Errorf("renewal wrote the expired key again")
		}
	})
}

func TestEtcdLeaseLostAndWatchRemoved(t *testing.T) {
	stores(t, func(t *testing.T, s *store) {
		ctx := ctxT(t)
		m, cfg, l := s.withLease(t, "192.168.0.1")
		col := startCollector(t, m)
		col.waitFor(t, map[netip.Prefix]string{l.Subnet: "192.168.0.1"})
		s.del(t, leaseKeyOf(*l))
		eventually(t, "Removed of the own lease", func() bool { return col.removals(l.Subnet) == 1 })
		if err := m.RenewLease(ctx, l); !errors.Is(err, subnet.ErrLeaseLost) {
			t.Fatalf("RenewLease after delete = %v, want ErrLeaseLost", err)
		}
		if _, _, ok := s.get(t, leaseKeyOf(*l)); ok {
			t.Errorf("renew recreated the deleted key")
		}
		l2, err := m.AcquireLease(ctx, cfg, attrsFor("192.168.0.1"), subnet.Lease{Subnet: l.Subnet})
		if err != nil || l2.Subnet != l.Subnet {
			t.Fatalf("re-acquire = %v, %v; want %v again", l2, err, l.Subnet)
		}
		col.waitFor(t, map[netip.Prefix]string{l.Subnet: "192.168.0.1"})
	})
}

func TestEtcdTLS(t *testing.T) {
	stores(t, func(t *testing.T, s *store) {
		s.put(t, "config", testConfig, 0)
		m, _ := s.manager(t)
		cfg, err := m.GetNetworkConfig(ctxT(t))
		if err != nil {
			t.Fatalf("GetNetworkConfig over TLS with a client certificate: %v", err)
		}
		if _, err := m.AcquireLease(ctxT(t), cfg, attrsFor("192.168.0.1"), subnet.Lease{}); err != nil {
			t.Fatalf("AcquireLease over TLS: %v", err)
		}
		f := s.srv.TLS()
		for _, tc := range []struct {
			name string
			edit func(o *subnet.EtcdOptions)
		}{
			{"CA but no client certificate", func(o *subnet.EtcdOptions) { o.CertFile, o.KeyFile = "", "" }},
			{"client certificate but unknown CA", func(o *subnet.EtcdOptions) { o.CAFile = "" }},
			{"plain http", func(o *subnet.EtcdOptions) {
				o.Endpoints = []string{strings.Replace(o.Endpoints[0], "https://", "http://", 1)}
			}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				var logs []string
				m, _ := s.manager(t, tc.edit, func(o *subnet.EtcdOptions) { o.RequestTimeout, o.Logger = time.Second, captureLogger(&logs) })
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				_, err := m.AcquireLease(ctx, cfg, attrsFor("192.168.0.2"), subnet.Lease{})
				if err == nil {
					t.Fatal("AcquireLease succeeded, want the connection refused")
				}
				if strings.Contains(err.Error(), "\n") {
					t.Errorf("error spans lines: %q", err)
				}
				if logs = append(logs, err.Error()); tc.name == "CA but no client certificate" && countLogs(&logs, "certificate") == 0 {
					t.Errorf("the refusal does not say it is about the certificate: %q", logs)
				}
				t.Logf("refused: %v", err)
			})
		}
		if n := len(s.keys(t, "subnets")); n != 1 {
			t.Errorf("%d leases, want only the TLS client's", n)
		}
		for _, tc := range []struct {
			name string
			opts subnet.EtcdOptions
			want string
		}{
			{"cert without key", subnet.EtcdOptions{CertFile: f.ClientCert}, "set both"},
			{"missing key file", subnet.EtcdOptions{CertFile: f.ClientCert, KeyFile: "/nonexistent/key.pem"}, "loading etcd client certificate"},
			{"CA not PEM", subnet.EtcdOptions{CAFile: f.ClientKey}, "no PEM certificate"},
			{"missing CA", subnet.EtcdOptions{CAFile: "/nonexistent/ca.pem"}, "loading etcd CA file"},
		} {
			opts, err := tc.opts.WithDefaults()
			if err == nil {
				_, err = s.keyspace(t, opts)
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("%s: %v, want an error containing %q", tc.name, err, tc.want)
			}
		}
	}, etcdtest.WithTLS())
}

func TestEtcdOptionErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts subnet.EtcdOptions
		want string
	}{
		{"endpoint without scheme", subnet.EtcdOptions{Endpoints: []string{"127.0.0.1:2379"}}, "write it like http://127.0.0.1:2379"},
		{"relative prefix", subnet.EtcdOptions{Prefix: "coreos.com/network"}, "it must start with /"},
		{"root prefix", subnet.EtcdOptions{Prefix: "/"}, "use a directory"},
	} {
		if _, err := tc.opts.WithDefaults(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error containing %q", tc.name, err, tc.want)
		}
	}
	opts, err := subnet.EtcdOptions{Prefix: "/a/b/"}.WithDefaults()
	if err != nil || opts.Prefix != "/a/b" || opts.RequestTimeout != subnet.DefaultEtcdRequestTimeout || len(opts.Endpoints) != 2 {
		t.Errorf("defaults = %+v, %v", opts, err)
	}
}

func TestEtcdBasicAuth(t *testing.T) {
	stores(t, func(t *testing.T, s *store) {
		s.put(t, "config", testConfig, 0)
		const rootPW, pw = "s3cret-root", "s3cret-flannel"
		s.enableAuth(t, rootPW, pw)
		var logs []string
		m, _ := s.manager(t, func(o *subnet.EtcdOptions) { o.Username, o.Password, o.Logger = "flannel", pw, captureLogger(&logs) })
		ctx := ctxT(t)
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
				m, _ := s.manager(t, func(o *subnet.EtcdOptions) { o.Username, o.Password, o.Logger = tc.user, tc.pw, captureLogger(&logs) })
				ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
				defer cancel()
				_, err := m.GetNetworkConfig(ctx)
				if !errors.Is(err, subnet.ErrAccessDenied) || ctx.Err() != nil || !strings.Contains(err.Error(), "refused access") {
					t.Fatalf("GetNetworkConfig = %v, want a refusal at once", err)
				}
				logMu.Lock()
				logs = append(logs, err.Error())
				logMu.Unlock()
			})
		}
		if countLogs(&logs, pw)+countLogs(&logs, rootPW) != 0 {
			t.Errorf("a log line holds the password: %q", logs)
		}
		if len(logs) == 0 {
			t.Errorf("no log line captured; the check above proves nothing")
		}
	})
}

// enableAuth turns on authentication: a root user, a user "flannel" with
// password pw that may read and write the prefix, and nothing for anyone
// else.
func (s *store) enableAuth(t *testing.T, rootPW, pw string) {
	t.Helper()
	ctx := ctxT(t)
	var steps []func() error
	if s.v2 {
		c := s.srv.Client()
		users, roles := client.NewAuthUserAPI(c), client.NewAuthRoleAPI(c)
		steps = []func() error{
			func() error { return users.AddUser(ctx, "root", rootPW) },
			func() error { return roles.AddRole(ctx, "flannel") },
			func() error {
				_, err := roles.GrantRoleKV(ctx, "flannel", []string{testPrefix, testPrefix + "/*"}, client.ReadWritePermission)
				return err
			},
			func() error { return users.AddUser(ctx, "flannel", pw) },
			func() error { _, err := users.GrantUser(ctx, "flannel", []string{"flannel"}); return err },
			func() error { return client.NewAuthAPI(c).Enable(ctx) },
			func() error {
				root, err := client.New(client.Config{Endpoints: s.endpoints(), Username: "root", Password: rootPW})
				if err == nil {
					_, err = client.NewAuthRoleAPI(root).RevokeRoleKV(ctx, "guest", []string{"/*"}, client.ReadWritePermission)
				}
				return err
			},
		}
	} else {
		c := s.c
		steps = []func() error{
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
	}
	for i, step := range steps {
		if err := step(); err != nil {
			t.Fatalf("auth setup step %d: %v", i, err)
		}
	}
}

// expire makes key expire now (v3: revokes its etcd lease).
func (s *store) expire(t testing.TB, key string) {
	t.Helper()
	ctx := context.Background()
	if s.v2 {
		if _, err := s.kapi.Delete(ctx, testPrefix+"/"+key, nil); err != nil {
			t.Fatal(err)
		}
		return
	}
	resp, err := s.c.Get(ctx, testPrefix+"/"+key)
	if err != nil || len(resp.Kvs) == 0 || resp.Kvs[0].Lease == 0 {
		t.Fatalf("reading the etcd lease of %s: %v %v", key, resp, err)
	}
	if _, err := s.c.Revoke(ctx, clientv3.LeaseID(resp.Kvs[0].Lease)); err != nil {
		t.Fatal(err)
	}
}

func TestEtcdDeadEndpointIsSkipped(t *testing.T) {
	stores(t, func(t *testing.T, s *store) {
		s.put(t, "config", testConfig, 0)
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		dead := "http://" + l.Addr().String()
		l.Close() // nothing listens there now
		ctx := ctxT(t)
		// Only the dead one: the wait says why.
		var logs []string
		m, _ := s.manager(t, func(o *subnet.EtcdOptions) {
			o.Endpoints, o.RequestTimeout, o.Logger = []string{dead}, 500*time.Millisecond, captureLogger(&logs)
		})
		short, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		if _, err := m.GetNetworkConfig(short); err == nil {
			t.Fatal("GetNetworkConfig through a dead endpoint succeeded")
		}
		if countLogs(&logs, "connection refused") == 0 {
			t.Errorf("the wait does not say the endpoint refused connections: %q", logs)
		}
		for i := range 3 {
			m, _ := s.manager(t, func(o *subnet.EtcdOptions) { o.Endpoints = []string{dead, s.endpoints()[0]} })
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
	})
}
