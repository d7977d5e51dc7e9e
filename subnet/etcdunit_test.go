package subnet

import (
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"
	"k8s.io/klog/v2"
)

// Unit tests of the etcd lease manager's pure parts; its behaviour against
// real stores is the conformance suite (etcd*_test.go, package subnet_test).

const unitDir = DefaultEtcdPrefix + "/subnets/"

func unitManager(log klog.Logger) *EtcdManager {
	return NewEtcdManager(nil, EtcdOptions{Prefix: DefaultEtcdPrefix, Logger: log})
}

func unitLogger(lines *[]string) klog.Logger {
	var mu sync.Mutex
	return funcr.New(func(_, args string) {
		mu.Lock()
		defer mu.Unlock()
		*lines = append(*lines, args)
	}, funcr.Options{})
}

// listing is a listing of unitDir holding kv (name → value; names may
// contain "/" for subdirectories).
func listing(kv map[string]string) []KV {
	var out []KV
	for name, v := range kv {
		out = append(out, KV{Key: unitDir + name, Value: []byte(v), Mod: 7})
	}
	return out
}

func mustConfig(t *testing.T, js string) *Config {
	t.Helper()
	cfg, err := ParseConfig([]byte(js))
	if err != nil {
		t.Fatalf("ParseConfig(%s): %v", js, err)
	}
	return cfg
}

func TestEtcdChoose(t *testing.T) {
	// Ten subnets: 10.5.1.0 .. 10.5.10.0.
	small := `{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.10.0"}`
	big := `{"Network":"10.5.0.0/16"}` // 254 subnets
	first := func(int) int { return 0 }
	last := func(n int) int { return n - 1 }
	lease := `{"PublicIP":"192.168.0.9"}`
	full := map[string]string{}
	for i := 1; i <= 10; i++ {
		full[netip.AddrFrom4([4]byte{10, 5, byte(i), 0}).String()+"-24"] = lease
	}
	for _, tc := range []struct {
		name   string
		cfg    string
		keys   map[string]string
		prev   string
		intn   func(int) int
		want   string // "" = range full
		nCands int    // checked when > 0: how many candidates intn was offered
	}{
		{name: "empty dir, no prev", cfg: small, intn: first, want: "10.5.1.0/24", nCands: 10},
		{name: "random among free", cfg: small, intn: last, want: "10.5.10.0/24", nCands: 10},
		{name: "prev free", cfg: small, prev: "10.5.7.0/24", intn: first, want: "10.5.7.0/24"},
		{name: "prev held by a key", cfg: small, keys: map[string]string{"10.5.7.0-24": lease}, prev: "10.5.7.0/24", intn: first, want: "10.5.1.0/24"},
		{name: "prev held by a garbage value", cfg: small, keys: map[string]string{"10.5.7.0-24": "{not json"}, prev: "10.5.7.0/24", intn: first, want: "10.5.1.0/24"},
		{name: "prev outside range", cfg: small, prev: "10.5.11.0/24", intn: first, want: "10.5.1.0/24"},
		{name: "prev of other length", cfg: small, prev: "10.5.7.0/25", intn: first, want: "10.5.1.0/24"},
		{name: "prev outside network", cfg: small, prev: "10.6.7.0/24", intn: first, want: "10.5.1.0/24"},
		{name: "taken skipped", cfg: small, keys: map[string]string{"10.5.1.0-24": lease, "10.5.2.0-24": "garbage"}, intn: first, want: "10.5.3.0/24", nCands: 8},
		{name: "odd key claims its subnet", cfg: small, keys: map[string]string{"10.5.1.9-24": lease}, intn: first, want: "10.5.2.0/24", nCands: 9},
		{name: "wider key claims all it overlaps", cfg: small, keys: map[string]string{"10.5.0.0-21": lease}, intn: first, want: "10.5.8.0/24", nCands: 3},
		{name: "key in a subdirectory claims", cfg: small, keys: map[string]string{"sub/10.5.1.0-24": lease}, intn: first, want: "10.5.2.0/24", nCands: 9},
		{name: "only first 100 free are candidates", cfg: big, keys: map[string]string{"10.5.1.0-24": lease}, intn: last, want: "10.5.101.0/24", nCands: 100},
		{name: "full", cfg: small, keys: full, prev: "10.5.3.0/24", intn: first},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := mustConfig(t, tc.cfg)
			a := newAllocation(cfg, listing(tc.keys))
			var prev netip.Prefix
			if tc.prev != "" {
				prev = mustPrefix(tc.prev)
			}
			offered := 0
			got, ok := ChooseLease(cfg, a.taken, a.taken6, Lease{Subnet: prev}, func(n int) int { offered = n; return tc.intn(n) })
			if tc.want == "" {
				if ok {
					t.Fatalf("choose = %v, want range full", got)
				}
				return
			}
			if !ok || got.Subnet != mustPrefix(tc.want) {
				t.Fatalf("choose = %v, %v; want %s", got, ok, tc.want)
			}
			if tc.nCands > 0 && offered != tc.nCands {
				t.Errorf("chose among %d free subnets, want %d", offered, tc.nCands)
			}
		})
	}
}

func TestEtcdOwn(t *testing.T) {
	cfg := mustConfig(t, `{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.10.0"}`)
	kvs := listing(map[string]string{
		"10.5.20.0-24":     `{"PublicIP":"192.168.0.1"}`, // ours but out of range
		"10.5.3.0-24":      `{"PublicIP":"192.168.0.1","BackendType":"vxlan"}`,
		"10.5.4.0-24":      `{"PublicIP":"192.168.0.2"}`,
		"10.5.5.0-24":      `{"PublicIP":"192.168.0.3"`,  // broken JSON
		"sub/10.5.6.0-24":  `{"PublicIP":"192.168.0.3"}`, // in a subdirectory
		"10.5.7.0-24extra": `{"PublicIP":"192.168.0.3"}`,
		"10.5.8.0-024":     `{"PublicIP":"192.168.0.4"}`, // not canonical
		"10.5.9.0-24":      `{"PublicIP":"192.168.0.\u0039"}`,
	})
	m := unitManager(klog.Background())
	own := func(publicIP string) (entry, bool) {
		return m.own(cfg, LeaseAttrs{PublicIP: netip.MustParseAddr(publicIP)}, kvs)
	}
	if e, ok := own("192.168.0.1"); !ok || e.lease.Subnet != mustPrefix("10.5.3.0/24") || e.lease.Attrs.BackendType != "vxlan" {
		t.Errorf("own(192.168.0.1) = %+v, %v; want 10.5.3.0/24", e, ok)
	}
	for _, publicIP := range []string{"192.168.0.3", "192.168.0.4"} {
		if e, ok := own(publicIP); ok {
			t.Errorf("own(%s) = %+v; its keys do not parse, are misplaced or not canonical, want none", publicIP, e)
		}
	}
	// A value that spells the address with a JSON escape is still found.
	if e, ok := own("192.168.0.9"); !ok || e.lease.Subnet != mustPrefix("10.5.9.0/24") {
		t.Errorf("own(192.168.0.9) = %+v, %v; want 10.5.9.0/24 (its value escapes a digit)", e, ok)
	}
	a := newAllocation(cfg, kvs)
	for _, s := range []string{"10.5.3.0/24", "10.5.4.0/24", "10.5.5.0/24", "10.5.6.0/24", "10.5.7.0/24", "10.5.8.0/24"} {
		if a.taken.Free(mustPrefix(s)) {
			t.Errorf("%s is free, want taken", s)
		}
	}
	if !a.taken.Free(mustPrefix("10.5.2.0/24")) {
		t.Errorf("10.5.2.0/24 is taken, want free")
	}
}

// evString renders events compactly: "+10.5.1.0/24@192.168.0.1 -10.5.2.0/24@...".
func evString(evs []Event) string {
	var parts []string
	for _, e := range evs {
		sign := "+"
		if e.Type == EventRemoved {
			sign = "-"
		}
		parts = append(parts, sign+e.Lease.Key().String()+"@"+e.Lease.Attrs.PublicIP.String()+string(e.Lease.Attrs.BackendData))
	}
	return strings.Join(parts, " ")
}

// TestEtcdWatcherApply folds a sequence of watch changes, one at a time,
// into a watcher and checks the events it reports, its cursor and what it
// logs.
func TestEtcdWatcherApply(t *testing.T) {
	var logs []string
	m := unitManager(unitLogger(&logs))
	w := &watcher{m: m, log: m.log, known: NewSummaries(0), logged: map[string]int64{}}
	put := func(name, value string, rev int64) Change {
		return Change{KV: KV{Key: unitDir + name, Value: []byte(value), Mod: rev, Expiration: time.Unix(1e9, 0)}}
	}
	del := func(name string, rev int64) Change {
		return Change{KV: KV{Key: unitDir + name, Mod: rev}, Deleted: true}
	}
	steps := []struct {
		ch   Change
		want string
		logs int
	}{
		{put("10.5.1.0-24", `{"PublicIP":"192.168.0.1"}`, 10), "+10.5.1.0/24@192.168.0.1", 0},
		{put("10.5.1.0-24", `{"PublicIP":"192.168.0.1"}`, 11), "", 0}, // a renewal
		{put("10.5.1.0-24", `{"PublicIP":"192.168.0.9"}`, 12), "+10.5.1.0/24@192.168.0.9", 0},
		{put("10.5.2.0-24&fc00:0:0:2::-64", `{"PublicIP":"192.168.0.2","PublicIPv6":null}`, 13), "+10.5.2.0/24@192.168.0.2", 0},
		{put("10.5.1.0-24", `{"PublicIP":"nope"}`, 14), "-10.5.1.0/24@192.168.0.9", 1}, // turned bad
		{put("10.5.1.0-24", `{"PublicIP":"nope"}`, 14), "", 1},                         // same version: logged once
		{put("10.5.1.0-24", `{"PublicIP":1}`, 15), "", 2},                              // new version: logged
		{put("junk", `{"PublicIP":"192.168.0.3"}`, 16), "", 3},
		{put("sub/10.5.3.0-24", `{"PublicIP":"192.168.0.3"}`, 17), "", 4},
		{del("junk", 18), "", 4},
		{del("10.5.1.0-24", 19), "", 4}, // not known any more
		{del("10.5.2.0-24&fc00:0:0:2::-64", 20), "-10.5.2.0/24@192.168.0.2", 4},
	}
	for i, s := range steps {
		if got := evString(w.apply([]Change{s.ch})); got != s.want {
			t.Errorf("step %d (%s): events %q, want %q", i, s.ch.KV.Key, got, s.want)
		}
		if w.cursor.Index != s.ch.KV.Mod {
			t.Errorf("step %d: cursor %d, want %d", i, w.cursor.Index, s.ch.KV.Mod)
		}
		if len(logs) != s.logs {
			t.Errorf("step %d: %d log lines, want %d: %q", i, len(logs), s.logs, logs)
		}
	}
	if w.known.Len() != 0 {
		t.Errorf("known = %v, want empty", w.known)
	}
	if len(w.logged) != 1 {
		t.Errorf("remembers %d bad keys, want 1 (the deleted ones forgotten): %v", len(w.logged), w.logged)
	}
}

// TestEtcdWentBack: a revision below the cursor or another cluster is a
// store that went back; an answer without revision or cluster is not.
func TestEtcdWentBack(t *testing.T) {
	for _, tc := range []struct {
		rev  Rev
		want bool
	}{
		{Rev{100, "1"}, false},
		{Rev{250, "1"}, false},
		{Rev{99, "1"}, true},
		{Rev{1, "1"}, true},
		{Rev{100, "2"}, true},
		{Rev{100, ""}, false},
		{Rev{}, false},
	} {
		w := &watcher{log: unitLogger(new([]string)), cursor: Rev{100, "1"}}
		if got := w.reset(tc.rev); got != tc.want {
			t.Errorf("reset(%+v) after revision 100 of cluster 1 = %v, want %v", tc.rev, got, tc.want)
		}
	}
	// A cursor without cluster (a v2 listing of a missing directory) takes
	// the cluster of the first answer.
	w := &watcher{log: unitLogger(new([]string)), cursor: Rev{Index: 5}}
	if w.reset(Rev{6, "a"}) || w.cursor.Cluster != "a" || !w.reset(Rev{7, "b"}) {
		t.Errorf("a cursor without cluster: %+v", w.cursor)
	}
}
