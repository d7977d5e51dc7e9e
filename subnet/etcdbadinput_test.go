package subnet_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/flanneld-go/flanneld/subnet"
)

// badInputConfig has 20 leasable /24s, 10.5.1.0 .. 10.5.20.0.
const badInputConfig = `{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.20.0"}`

// newcomerIP is the PublicIP of the node that acquires next to the bad keys.
const newcomerIP = "192.168.100.1"

type badKey struct {
	key, value string // key relative to subnets/
	ttl        time.Duration
}

// TestEtcdBadLeaseInput writes, as another (broken or foreign) node would,
// malformed keys under subnets/, then checks the watcher and the allocator
// against each: no panic, a bounded number of requests, one skip log per
// version of a bad value, and an AcquireLease that never hands out a
// subnet one of the keys claims and never changes or deletes them. Each
// case runs under its own prefix.
func TestEtcdBadLeaseInput(t *testing.T) {
	huge := strings.Repeat("x", 1<<20)
	tests := []struct {
		name string
		keys []badKey
		// claims are the subnets the keys' names claim: no new lease may
		// overlap them.
		claims []string
		// watched is what the watcher reports for the keys (subnet →
		// PublicIP): a well-formed key is a lease whatever its subnet;
		// fitting it to the network config is the daemon's job.
		watched map[string]string
		// skipped are the keys whose values are logged and skipped.
		skipped []string
	}{
		{name: "bad JSON", keys: []badKey{{"10.5.1.0-24", `{"PublicIP":`, time.Hour}},
			claims: []string{"10.5.1.0/24"}, skipped: []string{"10.5.1.0-24"}},
		{name: "wrong types", keys: []badKey{{"10.5.2.0-24", `{"PublicIP":5}`, time.Hour}, {"10.5.3.0-24", `{"PublicIP":"192.168.0.3","BackendType":["vxlan"]}`, 0}},
			claims: []string{"10.5.2.0/24", "10.5.3.0/24"}, skipped: []string{"10.5.2.0-24", "10.5.3.0-24"}},
		{name: "IPv6 PublicIP", keys: []badKey{{"10.5.4.0-24", `{"PublicIP":"fd00::4"}`, time.Hour}, {"10.5.5.0-24", `{"PublicIP":"::ffff:192.168.0.5"}`, time.Hour}},
			claims: []string{"10.5.4.0/24", "10.5.5.0/24"}, skipped: []string{"10.5.4.0-24", "10.5.5.0-24"}},
		{name: "empty object", keys: []badKey{{"10.5.1.0-24", `{}`, 0}},
			claims: []string{"10.5.1.0/24"}, skipped: []string{"10.5.1.0-24"}},
		{name: "outside Network", keys: []badKey{{"10.6.1.0-24", `{"PublicIP":"192.168.0.6"}`, time.Hour}, {"192.168.1.0-24", `{"PublicIP":"` + newcomerIP + `"}`, time.Hour}},
			claims: []string{"10.6.1.0/24", "192.168.1.0/24"}, watched: map[string]string{"10.6.1.0/24": "192.168.0.6", "192.168.1.0/24": newcomerIP}},
		// A stale lease of the newcomer itself, of another SubnetLen: not
		// reused, not overwritten, and its /24 is not handed out.
		{name: "wrong prefix length", keys: []badKey{{"10.5.6.0-26", `{"PublicIP":"` + newcomerIP + `"}`, time.Hour}, {"10.5.7.128-25", `{"PublicIP":"192.168.0.7"}`, 0}},
			claims: []string{"10.5.6.0/26", "10.5.7.128/25"}, watched: map[string]string{"10.5.6.0/26": newcomerIP, "10.5.7.128/25": "192.168.0.7"}},
		{name: "a /20 over part of the range", keys: []badKey{{"10.5.0.0-20", `{"PublicIP":"192.168.0.20"}`, time.Hour}},
			claims: []string{"10.5.0.0/20"}, watched: map[string]string{"10.5.0.0/20": "192.168.0.20"}},
		// It overlaps every subnet of the range: nothing is free.
		{name: "a /16 over the whole network", keys: []badKey{{"10.5.0.0-16", `{"PublicIP":"192.168.0.16"}`, 0}},
			claims: []string{"10.5.0.0/16"}, watched: map[string]string{"10.5.0.0/16": "192.168.0.16"}},
		{name: "directory under subnets", keys: []badKey{{"sub/10.5.8.0-24", `{"PublicIP":"192.168.0.8"}`, time.Hour}, {"sub/deeper/10.5.9.0-24", `{"PublicIP":"192.168.0.9"}`, 0}},
			claims: []string{"10.5.8.0/24", "10.5.9.0/24"}, skipped: []string{"sub/10.5.8.0-24", "sub/deeper/10.5.9.0-24"}},
		{name: "1 MB garbage value", keys: []badKey{{"10.5.10.0-24", huge, time.Hour}},
			claims: []string{"10.5.10.0/24"}, skipped: []string{"10.5.10.0-24"}},
		{name: "1 MB PublicIP", keys: []badKey{{"10.5.11.0-24", `{"PublicIP":"` + huge + `"}`, time.Hour}},
			claims: []string{"10.5.11.0/24"}, skipped: []string{"10.5.11.0-24"}},
		{name: "1 MB BackendData", keys: []badKey{{"10.5.12.0-24", `{"PublicIP":"192.168.0.12","BackendData":{"Blob":"` + huge + `"}}`, time.Hour}},
			claims: []string{"10.5.12.0/24"}, watched: map[string]string{"10.5.12.0/24": "192.168.0.12"}},
	}
	stores(t, func(t *testing.T, s *store) {
		for i, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				dir := fmt.Sprintf("case%d", i)
				onPrefix := func(o *subnet.EtcdOptions) { o.Prefix = testPrefix + "/" + dir }
				cfg := mustConfig(t, badInputConfig)
				var claims []netip.Prefix
				for _, c := range tt.claims {
					claims = append(claims, pfx(c))
				}
				for _, k := range tt.keys {
					s.put(t, dir+"/subnets/"+k.key, k.value, k.ttl)
				}
				var logs []string
				m, api := s.manager(t, onPrefix, func(o *subnet.EtcdOptions) { o.Logger = captureLogger(&logs) })
				c := startCollector(t, m)
				want := map[netip.Prefix]string{}
				for s, publicIP := range tt.watched {
					want[pfx(s)] = publicIP
				}
				eventually(t, "the first batch", func() bool { return c.nBatches() > 0 })
				c.waitFor(t, want)

				// A second version of each key (a renewal), then a good
				// lease, come through the watch itself.
				writes := 0
				for _, k := range tt.keys {
					s.put(t, dir+"/subnets/"+k.key, k.value, k.ttl)
					writes++
				}
				before := map[string]string{}
				for _, k := range tt.keys {
					before[k.key] = s.version(t, dir+"/subnets/"+k.key)
				}
				sentinel := pfx("10.5.20.0/24")
				s.put(t, dir+"/subnets/10.5.20.0-24", `{"PublicIP":"192.168.0.99"}`, time.Hour)
				writes++
				claims = append(claims, sentinel)
				want[sentinel] = "192.168.0.99"
				c.waitFor(t, want)

				// Bounded: one listing, a watch answer per write (and the
				// watch's start), and nothing more while nothing changes.
				if lists, nexts := api.lists.Load(), api.nexts.Load(); lists != 1 || nexts > int64(writes)+3 {
					t.Errorf("%d listings and %d watch answers for %d writes: the watcher retries", lists, nexts, writes)
				}
				settled := api.total()
				time.Sleep(200 * time.Millisecond)
				if n := api.total() - settled; n > 1 {
					t.Errorf("%d requests while nothing changed: the watcher loops", n)
				}

				// Logs: each bad version once, on one short line.
				for _, k := range tt.skipped {
					if n := countLogs(&logs, dir+"/subnets/"+k+`"`); n != 2 {
						t.Errorf("%s logged %d times, want 2 (once per version)", k, n)
					}
				}
				logMu.Lock()
				for _, l := range logs {
					if len(l) > 1024 || strings.ContainsAny(l, "\n\r") {
						t.Errorf("log line of %d bytes, want one line under 1 KiB: %.200q...", len(l), l)
					}
				}
				if len(tt.skipped) == 0 && len(logs) != 0 {
					t.Errorf("logged %q, want nothing: every key is a well-formed lease", logs)
				}
				logMu.Unlock()

				// Acquire: newcomers fill every subnet the keys leave free,
				// and none of the claimed ones; the first asks for a claimed
				// one.
				free := 0
				cfg.Subnets(func(p netip.Prefix) bool {
					if !overlapsAny(p, claims) {
						free++
					}
					return true
				})
				am, _ := s.manager(t, onPrefix)
				got := map[netip.Prefix]bool{}
				for i := 0; ; i++ {
					publicIP := newcomerIP
					if i > 0 {
						publicIP = fmt.Sprintf("192.168.101.%d", i)
					}
					l, err := am.AcquireLease(context.Background(), cfg, attrsFor(publicIP), subnet.Lease{Subnet: claims[0]})
					if errors.Is(err, subnet.ErrNoFreeSubnets) {
						break
					}
					if err != nil {
						t.Fatalf("newcomer %d: %v", i, err)
					}
					if !cfg.InRange(l.Subnet) || overlapsAny(l.Subnet, claims) || got[l.Subnet] {
						t.Fatalf("newcomer %d got %v: out of range, claimed by %v, or given twice (%v)", i, l.Subnet, claims, got)
					}
					got[l.Subnet] = true
					if i > free {
						t.Fatalf("more than %d leases handed out", free)
					}
				}
				if len(got) != free {
					t.Errorf("%d subnets handed out, want the %d that no key claims", len(got), free)
				}
				// The bad keys are as they were: same value, same version,
				// same TTL (none for those written without).
				for _, k := range tt.keys {
					if b, a := before[k.key], s.version(t, dir+"/subnets/"+k.key); a != b {
						t.Errorf("%s changed: %.80s → %.80s", k.key, b, a)
					}
				}
				// The watcher saw the newcomers, and still reports the keys.
				for p := range got {
					want[p] = "" // any PublicIP
				}
				eventually(t, "the newcomers' leases to be watched", func() bool {
					snap := c.snapshot()
					for p := range want {
						if _, ok := snap[p]; !ok {
							return false
						}
					}
					return len(snap) == len(want)
				})
				snap := c.snapshot()
				for s, publicIP := range tt.watched {
					if snap[pfx(s)] != publicIP {
						t.Errorf("watched %v = %q after the acquires, want %q", s, snap[pfx(s)], publicIP)
					}
				}
			})
		}
	})
}

// version is what identifies the version of key: its modification
// revision (v2: index), whether it expires, and its value's start.
func (s *store) version(t testing.TB, key string) string {
	t.Helper()
	v, ttl, ok := s.get(t, key)
	var mod int64
	if s.v2 {
		resp, err := s.kapi.Get(context.Background(), testPrefix+"/"+key, nil)
		if err == nil {
			mod = int64(resp.Node.ModifiedIndex)
		}
	} else if resp, err := s.c.Get(context.Background(), testPrefix+"/"+key); err == nil && len(resp.Kvs) > 0 {
		mod = resp.Kvs[0].ModRevision
	}
	return fmt.Sprintf("exists %v, revision %d, expires %v, value %.40q", ok, mod, ttl > 0, v)
}

func overlapsAny(p netip.Prefix, claims []netip.Prefix) bool {
	for _, c := range claims {
		if c.Overlaps(p) {
			return true
		}
	}
	return false
}
