package subnet_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/subnet"
)

func mustConfig(t testing.TB, js string) *subnet.Config {
	t.Helper()
	cfg, err := subnet.ParseConfig([]byte(js))
	if err != nil {
		t.Fatalf("ParseConfig(%s): %v", js, err)
	}
	return cfg
}

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }

func attrsFor(publicIP string) subnet.LeaseAttrs {
	return subnet.LeaseAttrs{PublicIP: netip.MustParseAddr(publicIP), BackendType: "vxlan", BackendData: []byte(`{"VtepMAC":"82:4b:b6:2f:54:4e"}`)}
}

func leaseKeyOf(l subnet.Lease) string { return "subnets/" + ip.LeaseKey(l.Subnet, l.IPv6Subnet) }

// notOwn is 10.5.3.0/24, or the next /24 up that is not own: a test that
// writes another node's lease after acquiring one of its own must not
// write over it, and acquisitions pick a free subnet at random.
func notOwn(own netip.Prefix) netip.Prefix { return freeFrom(3, own) }

// freeFrom is the first 10.5.n.0/24 from n up that is none of taken.
func freeFrom(n int, taken ...netip.Prefix) netip.Prefix {
	for ; ; n++ {
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 5, byte(n), 0}), 24)
		if !slices.Contains(taken, p) {
			return p
		}
	}
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// eventually polls cond every 20 ms until it holds, failing the test after
// a generous deadline.
func eventually(t testing.TB, what string, cond func() bool) {
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
func waitGoroutinesGone(t testing.TB, substrs ...string) {
	t.Helper()
	eventually(t, "goroutines to end", func() bool {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		for _, g := range strings.Split(string(buf), "\n\n") {
			for _, s := range substrs {
				if strings.Contains(g, s) {
					return false
				}
			}
		}
		return true
	})
}

// leasesIn reads the valid leases in the store, as a watcher should see
// them: subnet → PublicIP.
func leasesIn(t testing.TB, s *store) map[netip.Prefix]string {
	set := map[netip.Prefix]string{}
	for k, v := range s.keys(t, "subnets") {
		name, _ := strings.CutPrefix(k, "subnets/")
		v4, v6, err := ip.ParseLeaseKey(name)
		a, aerr := subnet.ParseLeaseAttrs([]byte(v))
		if err == nil && aerr == nil && !strings.Contains(name, "/") {
			l := subnet.Lease{Subnet: v4, IPv6Subnet: v6}
			set[l.Key()] = a.PublicIP.String()
		}
	}
	return set
}

// collector runs WatchLeases and folds the batches into a set.
type collector struct {
	mu      sync.Mutex
	set     map[netip.Prefix]string // subnet → PublicIP
	batches [][]subnet.Event
	removed map[netip.Prefix]int
}

// startCollector watches with m until the test ends, then checks that
// WatchLeases returned context.Canceled.
func startCollector(t testing.TB, m subnet.Manager) *collector {
	t.Helper()
	c := &collector{set: map[netip.Prefix]string{}, removed: map[netip.Prefix]int{}}
	ctx, cancel := context.WithCancel(context.Background())
	events := make(chan []subnet.Event)
	done := make(chan error, 1)
	go func() { done <- m.WatchLeases(ctx, events) }()
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		for {
			select {
			case evs := <-events:
				c.fold(evs)
			case <-ctx.Done():
				return
			}
		}
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if !errors.Is(err, context.Canceled) {
				t.Errorf("WatchLeases returned %v, want context.Canceled", err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("WatchLeases did not return after cancel")
		}
		<-readerDone
	})
	return c
}

func (c *collector) fold(evs []subnet.Event) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.batches = append(c.batches, evs)
	for _, e := range evs {
		if e.Type == subnet.EventAdded {
			c.set[e.Lease.Key()] = e.Lease.Attrs.PublicIP.String()
		} else {
			delete(c.set, e.Lease.Key())
			c.removed[e.Lease.Key()]++
		}
	}
}

func (c *collector) snapshot() map[netip.Prefix]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return maps.Clone(c.set)
}

func (c *collector) waitFor(t testing.TB, want map[netip.Prefix]string) {
	t.Helper()
	eventually(t, fmt.Sprintf("watched set %v", want), func() bool { return maps.Equal(c.snapshot(), want) })
}

func (c *collector) removals(p netip.Prefix) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.removed[p]
}

func (c *collector) nBatches() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.batches)
}

func (c *collector) batch(i int) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var got []string
	for _, e := range c.batches[i] {
		got = append(got, e.Type.String()+" "+e.Lease.Key().String())
	}
	return strings.Join(got, ",")
}
