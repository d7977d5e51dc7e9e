package etcdv3

import (
	"context"
	"strings"
	"testing"

	"github.com/flanneld-go/flanneld/internal/etcdtest"
	"github.com/flanneld-go/flanneld/subnet"
)

// TestBadLeaseInput: keys written by broken or foreign nodes — values that
// do not parse (1 MB of garbage among them), names outside the subnet form,
// a dual-stack name with a bad IPv6 length — are each logged once and
// skipped by the watch, still claim their subnets, and are neither changed
// nor deleted by a node acquiring next to them.
func TestBadLeaseInput(t *testing.T) {
	srv := etcdtest.Start(t)
	c := v3(t, srv)
	huge := strings.Repeat("x", 1<<20)
	bad := map[string]string{
		"subnets/10.5.1.0-24":                  `{"PublicIP":`,
		"subnets/10.5.2.0-24":                  huge,
		"subnets/10.5.3.0-24":                  `{"PublicIP":"` + huge + `"}`,
		"subnets/10.5.4.0-24&fc00:0:0:4::-129": `{"PublicIP":"192.168.0.4","PublicIPv6":"fd5e::4"}`,
		"subnets/10.5.5.0-24&fc00:0:0:5::1-64": `{"PublicIP":"192.168.0.5","PublicIPv6":"fd5e::5"}`,
		"subnets/10.5.6.0-24":                  `{"PublicIP":"192.168.0.6","PublicIPv6":"10.0.0.6"}`,
		"subnets/not-a-subnet":                 `{"PublicIP":"192.168.0.7"}`,
	}
	revs := map[string]int64{}
	for k, v := range bad {
		revs[k] = put(t, c, k, v, 0).Header.Revision
	}
	var logs []string
	m, _ := newTestManager(t, srv, func(o *Options) { o.Logger = captureLogger(&logs) })
	col := startCollector(t, m)
	eventually(t, "the first batch", func() bool { return col.nBatches() > 0 })
	if got := col.snapshot(); len(got) != 0 {
		t.Errorf("watched %v, want no lease", got)
	}
	cfg := mustConfig(t, `{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.7.0"}`)
	l, err := m.AcquireLease(context.Background(), cfg, attrsFor("192.168.0.9"), subnet.Lease{})
	if err != nil || l.Subnet != pfx("10.5.7.0/24") {
		t.Fatalf("AcquireLease = %v, %v; want the one subnet no key claims, 10.5.7.0/24", l, err)
	}
	for k, v := range bad {
		resp := getKV(t, c, k)
		if resp == nil || string(resp.Kvs[0].Value) != v || resp.Kvs[0].ModRevision != revs[k] {
			t.Errorf("%s was changed or deleted", k)
		}
	}
	logMu.Lock()
	defer logMu.Unlock()
	skipped := 0
	for _, line := range logs {
		if strings.Contains(line, "Skipping a key") {
			skipped++
			if len(line) > 2000 {
				t.Errorf("a skip line of %d bytes: the bad value is not cut", len(line))
			}
		}
	}
	if skipped != len(bad) {
		t.Errorf("%d skip lines, want one per bad key (%d)", skipped, len(bad))
	}
}
