package etcdv2

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

	client "go.etcd.io/etcd/client/v2"

	"github.com/flanneld-go/flanneld/internal/etcdtest"
	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/subnet"
)

// raceNodes is how many nodes start at once in each round of TestLeaseRace.
const raceNodes = 200

// TestLeaseRace starts raceNodes lease managers at once, each with its own
// etcd client and PublicIP, against one embedded etcd, in five rounds with
// different configs (each round under its own prefix, so it starts empty).
// Every node must end up with its own subnet: no duplicate, no overlap,
// all in range, and etcd must hold exactly those keys with those values.
func TestLeaseRace(t *testing.T) {
	if testing.Short() {
		t.Skip("starts 1000 lease managers; skipped with -short")
	}
	srv := etcdtest.Start(t)
	rounds := []struct {
		name, config string
	}{
		{"10.0.0.0/8 by /24", `{"Network":"10.0.0.0/8"}`},
		{"10.0.0.0/16 by /26", `{"Network":"10.0.0.0/16","SubnetLen":26}`},
		// Exactly raceNodes subnets: the range ends up full.
		{"exactly 200 /24s", `{"Network":"10.7.0.0/16","SubnetMin":"10.7.1.0","SubnetMax":"10.7.200.0"}`},
		{"172.16.0.0/12 by /28", `{"Network":"172.16.0.0/12","SubnetLen":28}`},
		{"10.9.0.0/20 by /28", `{"Network":"10.9.0.0/20","SubnetLen":28}`},
	}
	for i, r := range rounds {
		t.Run(r.name, func(t *testing.T) {
			prefix := fmt.Sprintf("/race/%d", i)
			raceRound(t, srv, prefix, mustConfig(t, r.config))
		})
	}
}

func raceRound(t *testing.T, srv *etcdtest.Server, prefix string, cfg *subnet.Config) {
	start := time.Now()
	publicIP := func(i int) netip.Addr {
		return ip.FromUint32(ip.Uint32(netip.MustParseAddr("192.168.0.1")) + uint32(i))
	}

	// 200 clients at once on a loaded machine (or under -race) can wait
	// longer than the default 5 s for an answer; this test is about who
	// gets which subnet, not about etcd's latency.
	opts := func(o *Options) { o.Prefix, o.RequestTimeout = prefix, 2*time.Minute }
	managers := make([]*Manager, raceNodes)
	apis := make([]*countingAPI, raceNodes)
	for i := range managers {
		managers[i], apis[i] = newTestManager(t, srv, opts)
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
			// Losing the race maxAcquireAttempts times in a row is an
			// error whose remedy is to call again, as the daemon does.
			for range 3 {
				leases[i], errs[i] = m.AcquireLease(ctx, cfg, attrs, subnet.Lease{})
				if !errors.Is(errs[i], errContention) {
					break
				}
				contention.Add(1)
			}
		}()
	}
	ready.Wait() // every goroutine is parked at the barrier
	close(barrier)
	done.Wait()
	elapsed := time.Since(start)

	byNode := map[netip.Prefix]int{}
	for i, l := range leases {
		if errs[i] != nil {
			t.Errorf("node %d (%v): %v", i, publicIP(i), errs[i])
			continue
		}
		if l.Attrs.PublicIP != publicIP(i) {
			t.Errorf("node %d: lease for %v, want %v", i, l.Attrs.PublicIP, publicIP(i))
		}
		if !cfg.InRange(l.Subnet) {
			t.Errorf("node %d: %v is outside %v..%v /%d", i, l.Subnet, cfg.SubnetMin, cfg.SubnetMax, cfg.SubnetLen)
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

	// etcd holds exactly one key per node, with that node's value and a TTL.
	resp, err := srv.KeysAPI().Get(context.Background(), prefix+"/subnets", &client.GetOptions{Recursive: true})
	if err != nil {
		t.Fatalf("listing %s/subnets: %v", prefix, err)
	}
	if n := len(resp.Node.Nodes); n != raceNodes {
		t.Errorf("etcd holds %d keys under %s/subnets, want %d", n, prefix, raceNodes)
	}
	for _, n := range resp.Node.Nodes {
		e, err := parseNode(prefix+"/subnets", n)
		if err != nil {
			t.Errorf("key %s = %q: %v", n.Key, n.Value, err)
			continue
		}
		i, ok := byNode[e.subnet]
		switch {
		case !ok:
			t.Errorf("key %s holds %v, which no node was given", n.Key, e.attrs.PublicIP)
		case e.attrs.PublicIP != publicIP(i) || string(e.attrs.BackendData) != fmt.Sprintf(`{"Node":%d}`, i):
			t.Errorf("key %s = %s, want node %d's value (%v)", n.Key, n.Value, i, publicIP(i))
		case n.TTL <= 0 || n.Expiration == nil:
			t.Errorf("key %s has no TTL", n.Key)
		}
	}

	attempts := make([]int, raceNodes)
	for i, a := range apis {
		attempts[i] = int(a.sets.Load())
	}
	sort.Ints(attempts)
	t.Logf("%d nodes acquired in %v; create attempts per node: median %d, max %d; AcquireLease calls that lost %d races in a row: %d",
		raceNodes, elapsed.Round(time.Millisecond), attempts[raceNodes/2], attempts[raceNodes-1], maxAcquireAttempts, contention.Load())

	// A full range stays full: one more node is refused, not squeezed in,
	// even when it asks for a taken subnet as its previous one.
	if countSubnets(cfg) == raceNodes {
		m, _ := newTestManager(t, srv, opts)
		prev := netip.PrefixFrom(cfg.SubnetMin, cfg.SubnetLen)
		_, err := m.AcquireLease(context.Background(), cfg, attrsFor("192.168.255.1"), subnet.Lease{Subnet: prev})
		if !errors.Is(err, subnet.ErrNoFreeSubnets) {
			t.Errorf("acquire on the full range = %v, want ErrNoFreeSubnets", err)
		}
	}
}

// countSubnets is how many subnets cfg can lease, capped just above
// raceNodes.
func countSubnets(cfg *subnet.Config) int {
	n := 0
	cfg.Subnets(func(netip.Prefix) bool { n++; return n <= raceNodes })
	return n
}
