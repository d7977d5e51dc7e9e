package subnet_test

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/flanneld-go/flanneld/subnet"
)

const dualConfig = `{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.50.0","EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetMin":"fc00:0:0:1::","IPv6SubnetMax":"fc00:0:0:32::","Backend":{"Type":"vxlan"}}`

func dualAttrs(n int) subnet.LeaseAttrs {
	a := attrsFor("192.168.0." + string(rune('0'+n)))
	a.PublicIPv6 = netip.MustParseAddr("fd5e::" + string(rune('0'+n)))
	a.BackendV6Data = []byte(`{"VtepMAC":"82:4b:b6:2f:54:4f"}`)
	return a
}

// TestEtcdDualStackLease: one key in flannel's dual-stack form, reused on
// restart, renewed, asked for again by its subnets, watched with both
// subnets; IPv6-only keys under 0.0.0.0-0.
func TestEtcdDualStackLease(t *testing.T) {
	stores(t, func(t *testing.T, s *store) {
		ctx := ctxT(t)
		cfg := mustConfig(t, dualConfig)
		m, _ := s.manager(t)
		l, err := m.AcquireLease(ctx, cfg, dualAttrs(1), subnet.Lease{})
		if err != nil {
			t.Fatal(err)
		}
		if !cfg.InRange(l.Subnet) || !cfg.InRange6(l.IPv6Subnet) {
			t.Fatalf("lease %v %v not in range", l.Subnet, l.IPv6Subnet)
		}
		key := leaseKeyOf(*l)
		if v, ttl, ok := s.get(t, key); !ok || !strings.Contains(v, `"PublicIPv6":"fd5e::1"`) || ttl == 0 || !strings.Contains(key, "&fc00:0:0:") {
			t.Fatalf("key %s = %q (ttl %v)", key, v, ttl)
		}
		m2, _ := s.manager(t)
		again, err := m2.AcquireLease(ctx, cfg, dualAttrs(1), subnet.Lease{})
		if err != nil || again.Subnet != l.Subnet || again.IPv6Subnet != l.IPv6Subnet {
			t.Fatalf("restart got %v, %v", again, err)
		}
		if err := m2.RenewLease(ctx, again); err != nil {
			t.Fatalf("renewing: %v", err)
		}
		// A pair of free subnets: the first acquisition picked its own at
		// random.
		var prev subnet.Lease
		for n := 33; !prev.Subnet.IsValid() || prev.Subnet == l.Subnet || prev.IPv6Subnet == l.IPv6Subnet; n++ {
			prev = subnet.Lease{Subnet: pfx(fmt.Sprintf("10.5.%d.0/24", n)), IPv6Subnet: pfx(fmt.Sprintf("fc00:0:0:%x::/64", n))}
		}
		l2, err := m.AcquireLease(ctx, cfg, dualAttrs(2), prev)
		if err != nil || l2.Subnet != prev.Subnet || l2.IPv6Subnet != prev.IPv6Subnet {
			t.Fatalf("prev: got %v, %v", l2, err)
		}
		l3, err := m.AcquireLease(ctx, cfg, dualAttrs(3), prev)
		if err != nil || l3.Subnet == prev.Subnet || l3.IPv6Subnet == prev.IPv6Subnet {
			t.Fatalf("taken prev: got %v, %v", l3, err)
		}
		wctx, cancel := context.WithCancel(ctx)
		defer cancel()
		events := make(chan []subnet.Event, 10)
		go m2.WatchLeases(wctx, events)
		got := map[netip.Prefix]netip.Prefix{}
		for len(got) < 3 {
			select {
			case evs := <-events:
				for _, ev := range evs {
					got[ev.Lease.Subnet] = ev.Lease.IPv6Subnet
				}
			case <-time.After(20 * time.Second):
				t.Fatalf("watched only %v", got)
			}
		}
		for _, x := range []*subnet.Lease{l, l2, l3} {
			if got[x.Subnet] != x.IPv6Subnet {
				t.Errorf("watched %v with IPv6 %v, want %v", x.Subnet, got[x.Subnet], x.IPv6Subnet)
			}
		}

		v6cfg := mustConfig(t, `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/48","Backend":{"Type":"vxlan"}}`)
		a := dualAttrs(4)
		a.PublicIP = netip.IPv4Unspecified()
		l4, err := m.AcquireLease(ctx, v6cfg, a, subnet.Lease{})
		if err != nil || l4.Subnet.IsValid() || !v6cfg.InRange6(l4.IPv6Subnet) {
			t.Fatalf("IPv6-only lease %v, %v", l4, err)
		}
		if _, _, ok := s.get(t, "subnets/0.0.0.0-0&"+l4.IPv6Subnet.Addr().String()+"-64"); !ok {
			t.Errorf("no IPv6-only key for %v", l4.IPv6Subnet)
		}
		if again, err := m2.AcquireLease(ctx, v6cfg, a, subnet.Lease{}); err != nil || again.IPv6Subnet != l4.IPv6Subnet {
			t.Errorf("IPv6-only restart got %v, %v", again, err)
		}
		if err := m2.RenewLease(ctx, l4); err != nil {
			t.Errorf("renewing the IPv6-only lease: %v", err)
		}
	})
}

// TestEtcdDualStackFirstClaim: two keys that claim one subnet (a plain IPv4
// key and a dual-stack key written after it) can both be created; the
// later one gives the subnet up, the older keeps it.
func TestEtcdDualStackFirstClaim(t *testing.T) {
	stores(t, func(t *testing.T, s *store) {
		ctx := ctxT(t)
		m, _ := s.manager(t)
		opts, _ := s.options(t).WithDefaults()
		ks, err := s.keyspace(t, opts)
		if err != nil {
			t.Fatal(err)
		}
		read := func(key string) subnet.KV {
			t.Helper()
			kv, _, err := ks.Get(ctx, testPrefix+"/"+key)
			if err != nil || kv == nil {
				t.Fatalf("reading %s: %v, %v", key, kv, err)
			}
			return *kv
		}
		s.put(t, "subnets/10.5.9.0-24", `{"PublicIP":"192.168.0.8"}`, time.Hour)
		ours := subnet.Lease{Subnet: pfx("10.5.9.0/24"), IPv6Subnet: pfx("fc00:0:0:9::/64")}
		s.put(t, leaseKeyOf(ours), `{"PublicIP":"192.168.0.9"}`, time.Hour)
		won, err := subnet.FirstClaim(m, ctx, read(leaseKeyOf(ours)), ours)
		if err != nil || won {
			t.Fatalf("firstClaim = %v, %v; want lost", won, err)
		}
		if _, _, ok := s.get(t, leaseKeyOf(ours)); ok {
			t.Error("the losing key is still there")
		}
		other := subnet.Lease{Subnet: pfx("10.5.9.0/24")}
		if won, err := subnet.FirstClaim(m, ctx, read("subnets/10.5.9.0-24"), other); err != nil || !won {
			t.Errorf("older key: firstClaim = %v, %v; want won", won, err)
		}
	})
}

// TestEtcdWatchFirstBatchHasOwnLease: the first batch after AcquireLease
// holds the lease it wrote, so a store wiped before the watch saw that
// write still reports the own lease removed (the daemon then writes it
// again).
func TestEtcdWatchFirstBatchHasOwnLease(t *testing.T) {
	stores(t, func(t *testing.T, s *store) {
		s.put(t, "subnets/10.5.1.0-24", `{"PublicIP":"192.168.0.1"}`, time.Hour)
		m, _ := s.manager(t)
		l, err := m.AcquireLease(ctxT(t), mustConfig(t, testConfig), attrsFor("192.168.0.2"), subnet.Lease{})
		if err != nil {
			t.Fatal(err)
		}
		col := startCollector(t, m)
		eventually(t, "the first batch", func() bool { return col.nBatches() > 0 })
		if first := col.batch(0); !strings.Contains(first, l.Subnet.String()) {
			t.Fatalf("first batch %q lacks the own lease %v", first, l.Subnet)
		}
		s.wipe(t)
		eventually(t, "the own lease reported removed", func() bool { return col.removals(l.Subnet) > 0 })
	})
}
