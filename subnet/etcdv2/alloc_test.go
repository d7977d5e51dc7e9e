package etcdv2

import (
	"net/netip"
	"testing"
	"time"

	client "go.etcd.io/etcd/client/v2"

	"github.com/flanneld-go/flanneld/subnet"
)

const testDir = "/coreos.com/network/subnets"

func mustConfig(t *testing.T, js string) *subnet.Config {
	t.Helper()
	cfg, err := subnet.ParseConfig([]byte(js))
	if err != nil {
		t.Fatalf("ParseConfig(%s): %v", js, err)
	}
	return cfg
}

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }

// dirNode builds a recursive listing of testDir holding kv (name → value;
// names may contain "/" for subdirectories).
func dirNode(kv map[string]string) *client.Node {
	root := &client.Node{Key: testDir, Dir: true}
	for name, v := range kv {
		root.Nodes = append(root.Nodes, &client.Node{Key: testDir + "/" + name, Value: v, ModifiedIndex: 7})
	}
	return root
}

func TestChoose(t *testing.T) {
	// Ten subnets: 10.5.1.0 .. 10.5.10.0.
	small := `{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.10.0"}`
	// 254 subnets.
	big := `{"Network":"10.5.0.0/16"}`
	first := func(int) int { return 0 }
	last := func(n int) int { return n - 1 }
	lease := `{"PublicIP":"192.168.0.9"}`
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
		{name: "only first 100 free are candidates", cfg: big, keys: map[string]string{"10.5.1.0-24": lease}, intn: last, want: "10.5.101.0/24", nCands: 100},
		{name: "full", cfg: small, keys: func() map[string]string {
			m := map[string]string{}
			for i := 1; i <= 10; i++ {
				m[netip.AddrFrom4([4]byte{10, 5, byte(i), 0}).String()+"-24"] = lease
			}
			return m
		}(), prev: "10.5.3.0/24", intn: first},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := mustConfig(t, tc.cfg)
			a := newAllocation(cfg, testDir, dirNode(tc.keys))
			var prev netip.Prefix
			if tc.prev != "" {
				prev = pfx(tc.prev)
			}
			offered := 0
			got, ok := a.choose(cfg, subnet.Lease{Subnet: prev}, func(n int) int { offered = n; return tc.intn(n) })
			if tc.want == "" {
				if ok {
					t.Fatalf("choose = %v, want range full", got)
				}
				return
			}
			if !ok || got.Subnet != pfx(tc.want) {
				t.Fatalf("choose = %v, %v; want %s", got, ok, tc.want)
			}
			if tc.nCands > 0 && offered != tc.nCands {
				t.Errorf("chose among %d free subnets, want %d", offered, tc.nCands)
			}
		})
	}
}

func TestAllocationOwn(t *testing.T) {
	cfg := mustConfig(t, `{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.10.0"}`)
	a := newAllocation(cfg, testDir, dirNode(map[string]string{
		"10.5.20.0-24":     `{"PublicIP":"192.168.0.1"}`, // ours but out of range
		"10.5.3.0-24":      `{"PublicIP":"192.168.0.1","BackendType":"vxlan"}`,
		"10.5.4.0-24":      `{"PublicIP":"192.168.0.2"}`,
		"10.5.5.0-24":      `{"PublicIP":"192.168.0.3"`,  // broken JSON
		"sub/10.5.6.0-24":  `{"PublicIP":"192.168.0.3"}`, // in a subdirectory
		"10.5.7.0-24extra": `{"PublicIP":"192.168.0.3"}`,
		"10.5.9.0-24":      `{"PublicIP":"192.168.0.\u0039"}`,
	}))
	e, ok := a.own(cfg, subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("192.168.0.1")})
	if !ok || e.subnet != pfx("10.5.3.0/24") || e.attrs.BackendType != "vxlan" {
		t.Errorf("own(192.168.0.1) = %+v, %v; want 10.5.3.0/24", e, ok)
	}
	if e, ok := a.own(cfg, subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("192.168.0.3")}); ok {
		t.Errorf("own(192.168.0.3) = %+v; its keys do not parse or are misplaced, want none", e)
	}
	// A value that spells the address with a JSON escape is still found.
	if e, ok := a.own(cfg, subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("192.168.0.9")}); !ok || e.subnet != pfx("10.5.9.0/24") {
		t.Errorf("own(192.168.0.9) = %+v, %v; want 10.5.9.0/24 (its value escapes a digit)", e, ok)
	}
	for _, s := range []string{"10.5.3.0/24", "10.5.4.0/24", "10.5.5.0/24", "10.5.6.0/24", "10.5.7.0/24"} {
		if a.taken.Free(pfx(s)) {
			t.Errorf("%s is free, want taken", s)
		}
	}
	if !a.taken.Free(pfx("10.5.8.0/24")) {
		t.Errorf("10.5.8.0/24 is taken, want free")
	}
}

func lease(s, publicIP, data string) subnet.Lease {
	l := subnet.Lease{Subnet: pfx(s), Attrs: subnet.LeaseAttrs{PublicIP: netip.MustParseAddr(publicIP), BackendType: "vxlan"}}
	if data != "" {
		l.Attrs.BackendData = []byte(data)
	}
	return l
}

func leaseMap(ls ...subnet.Lease) map[netip.Prefix]subnet.Lease {
	m := map[netip.Prefix]subnet.Lease{}
	for _, l := range ls {
		m[l.Subnet] = l
	}
	return m
}

// evString renders events compactly: "+10.5.1.0/24@192.168.0.1 -10.5.2.0/24".
func evString(evs []subnet.Event) string {
	s := ""
	for i, e := range evs {
		if i > 0 {
			s += " "
		}
		if e.Type == subnet.EventAdded {
			s += "+"
		} else {
			s += "-"
		}
		s += e.Lease.Subnet.String() + "@" + e.Lease.Attrs.PublicIP.String()
		if len(e.Lease.Attrs.BackendData) > 0 {
			s += string(e.Lease.Attrs.BackendData)
		}
	}
	return s
}

func TestDiffLeases(t *testing.T) {
	a := lease("10.5.1.0/24", "192.168.0.1", "")
	b := lease("10.5.2.0/24", "192.168.0.2", `{"VtepMAC":"aa"}`)
	b2 := lease("10.5.2.0/24", "192.168.0.2", `{"VtepMAC":"bb"}`)
	c := lease("10.5.3.0/24", "192.168.0.3", "")
	cRenewed := c
	cRenewed.Expiration = time.Unix(1e9, 0)
	aUDP := a
	aUDP.Attrs.BackendType = "udp"
	for _, tc := range []struct {
		name           string
		known, current map[netip.Prefix]subnet.Lease
		want           string
	}{
		{"both empty", leaseMap(), leaseMap(), ""},
		{"initial", leaseMap(), leaseMap(c, a, b), "+10.5.1.0/24@192.168.0.1 +10.5.2.0/24@192.168.0.2{\"VtepMAC\":\"aa\"} +10.5.3.0/24@192.168.0.3"},
		{"all gone", leaseMap(a, b), leaseMap(), "-10.5.1.0/24@192.168.0.1 -10.5.2.0/24@192.168.0.2"},
		{"changed value is added", leaseMap(a, b), leaseMap(a, b2), "+10.5.2.0/24@192.168.0.2{\"VtepMAC\":\"bb\"}"},
		{"renewal is no event", leaseMap(a, c), leaseMap(a, cRenewed), ""},
		{"changed type is added", leaseMap(a, c), leaseMap(aUDP, c), "+10.5.1.0/24@192.168.0.1"},
		{"mixed, adds first", leaseMap(a, b), leaseMap(b2, c), "+10.5.2.0/24@192.168.0.2{\"VtepMAC\":\"bb\"} +10.5.3.0/24@192.168.0.3 -10.5.1.0/24@192.168.0.1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := map[netip.Prefix]subnet.LeaseSummary{}
			for p, l := range tc.known {
				before[p] = subnet.Summarize(l.Attrs)
			}
			if got := evString(subnet.DiffLeases(before, tc.current)); got != tc.want {
				t.Errorf("diff = %q\nwant   %q", got, tc.want)
			}
		})
	}
}

func TestWatcherApply(t *testing.T) {
	var logs []string
	m := newManager(nil, Options{Prefix: "/coreos.com/network", Logger: captureLogger(&logs)})
	w := &watcher{m: m, dir: testDir, known: map[netip.Prefix]subnet.LeaseSummary{}, logged: map[string]uint64{}}
	node := func(name, value string, idx uint64) *client.Node {
		return &client.Node{Key: testDir + "/" + name, Value: value, ModifiedIndex: idx}
	}
	steps := []struct {
		action string
		node   *client.Node
		want   string
		relist bool
		logs   int // log lines so far
	}{
		{"create", node("10.5.1.0-24", `{"PublicIP":"192.168.0.1"}`, 10), "+10.5.1.0/24@192.168.0.1", false, 0},
		{"compareAndSwap", node("10.5.1.0-24", `{"PublicIP":"192.168.0.1"}`, 11), "", false, 0}, // renewal
		{"set", node("10.5.1.0-24", `{"PublicIP":"192.168.0.5"}`, 12), "+10.5.1.0/24@192.168.0.5", false, 0},
		{"set", node("10.5.2.0-24", `garbage`, 13), "", false, 1},
		{"set", node("10.5.2.0-24", `garbage`, 13), "", false, 1}, // same version: not logged again
		{"set", node("10.5.2.0-24", `garbage`, 14), "", false, 2}, // new version: logged
		{"set", node("10.5.2.0-24", `{"PublicIP":"192.168.0.2"}`, 15), "+10.5.2.0/24@192.168.0.2", false, 2},
		{"set", node("10.5.2.0-24", `{"PublicIP":1}`, 16), "-10.5.2.0/24@192.168.0.2", false, 3}, // broken value: no lease any more
		{"set", node("notakey", `{"PublicIP":"192.168.0.3"}`, 17), "", false, 4},
		{"set", node("sub/10.5.3.0-24", `{"PublicIP":"192.168.0.3"}`, 18), "", false, 5},
		{"delete", node("notakey", "", 19), "", false, 5},
		{"expire", node("10.5.1.0-24", "", 20), "-10.5.1.0/24@192.168.0.5", false, 5},
		{"delete", node("10.5.1.0-24", "", 21), "", false, 5}, // unknown: nothing
		{"set", &client.Node{Key: testDir + "/sub", Dir: true, ModifiedIndex: 22}, "", false, 5},
		{"delete", &client.Node{Key: testDir + "/sub", Dir: true, ModifiedIndex: 23}, "", true, 5},
		{"expire", &client.Node{Key: testDir, Dir: true, ModifiedIndex: 24}, "", true, 5},
	}
	for i, s := range steps {
		evs, relist := w.apply(&client.Response{Action: s.action, Node: s.node})
		if got := evString(evs); got != s.want || relist != s.relist {
			t.Errorf("step %d (%s %s): events %q relist %v; want %q relist %v", i, s.action, s.node.Key, got, relist, s.want, s.relist)
		}
		if w.cursor != s.node.ModifiedIndex {
			t.Errorf("step %d: cursor %d, want %d", i, w.cursor, s.node.ModifiedIndex)
		}
		if len(logs) != s.logs {
			t.Errorf("step %d: %d log lines, want %d: %q", i, len(logs), s.logs, logs)
		}
	}
	if len(w.known) != 0 {
		t.Errorf("known = %v, want empty", w.known)
	}
	if len(w.logged) != 2 {
		t.Errorf("remembers %d bad keys, want 2 (the deleted one forgotten): %v", len(w.logged), w.logged)
	}
}
