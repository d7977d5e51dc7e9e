package subnet_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/subnet"
)

// raceNodes is how many nodes start at once in each round of
// TestEtcdLeaseRace.
const raceNodes = 200

// TestEtcdLeaseRace starts raceNodes lease managers at once, each with its
// own client and PublicIP, in rounds with different configs (each under its
// own prefix). Every node must end up with its own subnet: no duplicate, no
// overlap, all in range, and etcd must hold exactly those keys, each with a
// TTL, with those values.
func TestEtcdLeaseRace(t *testing.T) {
	if testing.Short() {
		t.Skip("starts 1000 lease managers per store; skipped with -short")
	}
	rounds := []struct{ name, config string }{
		{"10.0.0.0/8 by /24", `{"Network":"10.0.0.0/8"}`},
		{"10.0.0.0/16 by /26", `{"Network":"10.0.0.0/16","SubnetLen":26}`},
		{"exactly 200 /24s", `{"Network":"10.7.0.0/16","SubnetMin":"10.7.1.0","SubnetMax":"10.7.200.0"}`},
		{"172.16.0.0/12 by /28", `{"Network":"172.16.0.0/12","SubnetLen":28}`},
		{"10.9.0.0/20 by /28", `{"Network":"10.9.0.0/20","SubnetLen":28}`},
	}
	stores(t, func(t *testing.T, s *store) {
		for i, r := range rounds {
			t.Run(r.name, func(t *testing.T) { raceRound(t, s, fmt.Sprintf("race%d", i), mustConfig(t, r.config)) })
		}
	})
}

func raceRound(t *testing.T, s *store, dir string, cfg *subnet.Config) {
	start := time.Now()
	publicIP := func(i int) netip.Addr {
		return ip.FromUint32(ip.Uint32(netip.MustParseAddr("192.168.0.1")) + uint32(i))
	}
	opts := func(o *subnet.EtcdOptions) { o.Prefix, o.RequestTimeout = testPrefix+"/"+dir, time.Minute }
	managers := make([]*subnet.EtcdManager, raceNodes)
	apis := make([]*counter, raceNodes)
	for i := range managers {
		managers[i], apis[i] = s.manager(t, opts)
	}
	leases := make([]*subnet.Lease, raceNodes)
	errs := make([]error, raceNodes)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	var contention atomic.Int64
	var ready, done sync.WaitGroup
	barrier := make(chan struct{})
	for i, m := range managers {
		ready.Add(1)
		done.Add(1)
		go func() {
			defer done.Done()
			ready.Done()
			<-barrier
			attrs := subnet.LeaseAttrs{PublicIP: publicIP(i), BackendType: "vxlan", BackendData: []byte(fmt.Sprintf(`{"Node":%d}`, i))}
			for range 3 {
				leases[i], errs[i] = m.AcquireLease(ctx, cfg, attrs, subnet.Lease{})
				if !errors.Is(errs[i], subnet.ErrContention) {
					break
				}
				contention.Add(1)
			}
		}()
	}
	ready.Wait()
	close(barrier)
	done.Wait()
	elapsed := time.Since(start)

	byNode := map[netip.Prefix]int{}
	for i, l := range leases {
		if errs[i] != nil {
			t.Errorf("node %d (%v): %v", i, publicIP(i), errs[i])
			continue
		}
		if l.Attrs.PublicIP != publicIP(i) || !cfg.InRange(l.Subnet) {
			t.Errorf("node %d: %v for %v, want in range for %v", i, l.Subnet, l.Attrs.PublicIP, publicIP(i))
		}
		if j, dup := byNode[l.Subnet]; dup {
			t.Errorf("nodes %d and %d both got %v", j, i, l.Subnet)
			continue
		}
		byNode[l.Subnet] = i
	}
	if t.Failed() {
		t.FailNow()
	}
	subnets := make([]netip.Prefix, 0, len(byNode))
	for p := range byNode {
		subnets = append(subnets, p)
	}
	sort.Slice(subnets, func(i, j int) bool { return subnets[i].Addr().Less(subnets[j].Addr()) })
	for k := 1; k < len(subnets); k++ {
		if subnets[k-1].Overlaps(subnets[k]) {
			t.Errorf("%v overlaps %v", subnets[k-1], subnets[k])
		}
	}
	if len(byNode) != raceNodes {
		t.Fatalf("%d distinct subnets, want %d", len(byNode), raceNodes)
	}
	keys := s.keys(t, dir+"/subnets")
	if len(keys) != raceNodes {
		t.Errorf("etcd holds %d keys under %s, want %d", len(keys), dir, raceNodes)
	}
	for key, value := range keys {
		v4, _, err := ip.ParseLeaseKey(key[len(dir+"/subnets/"):])
		a, aerr := subnet.ParseLeaseAttrs([]byte(value))
		i, ok := byNode[v4]
		switch {
		case err != nil || aerr != nil || !ok:
			t.Errorf("key %s = %q, which no node was given (%v, %v)", key, value, err, aerr)
		case a.PublicIP != publicIP(i) || string(a.BackendData) != fmt.Sprintf(`{"Node":%d}`, i):
			t.Errorf("key %s = %s, want node %d's value", key, value, i)
		}
	}
	attempts := make([]int, raceNodes)
	for i, a := range apis {
		attempts[i] = int(a.creates.Load())
	}
	sort.Ints(attempts)
	t.Logf("%d nodes acquired in %v; create attempts per node: median %d, max %d; calls that lost every race: %d",
		raceNodes, elapsed.Round(time.Millisecond), attempts[raceNodes/2], attempts[raceNodes-1], contention.Load())
}
