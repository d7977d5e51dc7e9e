package agent

import (
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/flanneld-go/flanneld/subnet"
)

// TestOnApply: after each Apply the hook gets the config, the MTU, the own
// lease and exactly the admitted remote leases (a lease outside the
// network never reaches it), including leases written while running.
func TestOnApply(t *testing.T) {
	l := newLab(t)
	l.config("")
	lease := `{"PublicIP":"192.168.8.%s","BackendType":"fake-test"}`
	l.set("subnets/10.5.5.0-24", fmt.Sprintf(lease, "5"), time.Hour)
	l.set("subnets/10.9.0.0-24", fmt.Sprintf(lease, "9"), time.Hour)
	var mu sync.Mutex
	var got []string
	var own netip.Prefix
	var mtu int
	r := l.start(Options{RouteResync: 20 * time.Millisecond, OnApply: func(cfg *subnet.Config, m int, o subnet.Lease, remote []subnet.Lease) {
		mu.Lock()
		defer mu.Unlock()
		got, own, mtu = got[:0], o.Subnet, m
		for _, r := range remote {
			got = append(got, r.Subnet.String())
		}
		slices.Sort(got)
	}})
	r.waitReady(t)
	l.set("subnets/10.5.8.0-24", fmt.Sprintf(lease, "8"), time.Hour)
	eventually(t, "the hook sees both admitted leases", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return slices.Equal(got, []string{"10.5.5.0/24", "10.5.8.0/24"})
	})
	mu.Lock()
	defer mu.Unlock()
	if !own.IsValid() || mtu != 1400 {
		t.Errorf("own %v, MTU %d; want the lease and the fake backend's 1400", own, mtu)
	}
}
