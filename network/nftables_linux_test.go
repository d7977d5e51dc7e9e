package network

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"k8s.io/klog/v2"
	"sigs.k8s.io/knftables"

	"github.com/flanneld-go/flanneld/internal/nstest"
)

// The expected ip6tables listings (ip6tables -S) of our IPv6 chains.
var (
	wantFlannelFwd6 = []string{
		`-N FLANNEL-FWD`,
		`-A FLANNEL-FWD -s fc00::/48 -m comment --comment "flanneld forward from network" -j ACCEPT`,
		`-A FLANNEL-FWD -d fc00::/48 -m comment --comment "flanneld forward to network" -j ACCEPT`,
	}
	wantFlannelPostrtg6 = []string{
		`-N FLANNEL-POSTRTG`,
		`-A FLANNEL-POSTRTG -s fc00::/48 -d fc00::/48 -m comment --comment "flanneld no masq within network" -j RETURN`,
		`-A FLANNEL-POSTRTG -s fc00::/48 ! -d ff00::/8 -m comment --comment "flanneld masq leaving network" -j MASQUERADE`,
		`-A FLANNEL-POSTRTG ! -s fc00::/48 -d fc00:0:0:22::/64 -m comment --comment "flanneld no masq to own subnet" -j RETURN`,
		`-A FLANNEL-POSTRTG ! -s fc00::/48 -d fc00::/48 -m comment --comment "flanneld masq entering network" -j MASQUERADE`,
	}
	wantForward6     = []string{`-P FORWARD ACCEPT`, `-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD`}
	wantPostrouting6 = []string{`-P POSTROUTING ACCEPT`, `-A POSTROUTING -m comment --comment "flanneld masquerade" -j FLANNEL-POSTRTG`}

	// The expected nftables tables, as rendered by nftRuleset.
	wantNFT = []string{
		`table ip flannel-ipv4`,
		`chain ip flannel-ipv4 forward: type filter hook forward prio 0 policy accept`,
		`chain ip flannel-ipv4 postrtg: type nat hook postrouting prio 100 policy accept`,
		`rule ip flannel-ipv4 forward: ip saddr 10.5.0.0/16 accept # flanneld forward from 10.5.0.0/16`,
		`rule ip flannel-ipv4 forward: ip daddr 10.5.0.0/16 accept # flanneld forward to 10.5.0.0/16`,
		`rule ip flannel-ipv4 postrtg: ip saddr 10.5.0.0/16 ip daddr 10.5.0.0/16 return # flanneld no masq within 10.5.0.0/16`,
		`rule ip flannel-ipv4 postrtg: ip saddr 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade # flanneld masq leaving 10.5.0.0/16`,
		`rule ip flannel-ipv4 postrtg: ip saddr != 10.5.0.0/16 ip daddr 10.5.34.0/24 return # flanneld no masq to own subnet 10.5.34.0/24`,
		`rule ip flannel-ipv4 postrtg: ip saddr != 10.5.0.0/16 ip daddr 10.5.0.0/16 masquerade # flanneld masq entering 10.5.0.0/16`,
		`table ip6 flannel-ipv6`,
		`chain ip6 flannel-ipv6 forward: type filter hook forward prio 0 policy accept`,
		`chain ip6 flannel-ipv6 postrtg: type nat hook postrouting prio 100 policy accept`,
		`rule ip6 flannel-ipv6 forward: ip6 saddr fc00::/48 accept # flanneld forward from fc00::/48`,
		`rule ip6 flannel-ipv6 forward: ip6 daddr fc00::/48 accept # flanneld forward to fc00::/48`,
		`rule ip6 flannel-ipv6 postrtg: ip6 saddr fc00::/48 ip6 daddr fc00::/48 return # flanneld no masq within fc00::/48`,
		`rule ip6 flannel-ipv6 postrtg: ip6 saddr fc00::/48 ip6 daddr != ff00::/8 masquerade # flanneld masq leaving fc00::/48`,
		`rule ip6 flannel-ipv6 postrtg: ip6 saddr != fc00::/48 ip6 daddr fc00:0:0:22::/64 return # flanneld no masq to own subnet fc00:0:0:22::/64`,
		`rule ip6 flannel-ipv6 postrtg: ip6 saddr != fc00::/48 ip6 daddr fc00::/48 masquerade # flanneld masq entering fc00::/48`,
	}
	wantForeignNFT = []string{
		`table ip other`,
		`chain ip other c: type filter hook input prio 0 policy accept`,
		`rule ip other c: ip saddr 192.0.2.0/24 accept # other program`,
	}
)

// nsTools are the tools of one test namespace: iptables and ip6tables
// wrappers that enter it, and an nft on PATH that enters it too, which is
// the nft knftables runs.
type nsTools struct {
	t          testing.TB
	ns         *nstest.NS
	ipt, ip6t  *nsIPTables
	nftWrapper string
}

func newNSTools(t testing.TB, prefix string) *nsTools {
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root to create a network namespace")
	}
	nsenter, err := exec.LookPath("nsenter")
	if err != nil {
		t.Skip("skipping: nsenter (util-linux) not found; it runs the tools inside the test's namespace")
	}
	for _, bin := range []string{"iptables", "ip6tables"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("skipping: %s not found; install it with `apt-get install -y iptables`", bin)
		}
	}
	nft, err := exec.LookPath("nft")
	if err != nil {
		t.Skip("skipping: nft not found; install it with `apt-get install -y nftables`")
	}
	checkRootUntouched(t)
	ns := nstest.New(t, prefix)
	n := &nsTools{t: t, ns: ns}
	n.ipt = newNSIPTables(t, nsenter, ns.Path, "iptables")
	n.ip6t = newNSIPTables(t, nsenter, ns.Path, "ip6tables")
	dir := t.TempDir()
	n.nftWrapper = filepath.Join(dir, "nft")
	script := fmt.Sprintf("#!/bin/sh\nexec %s --net=%s -- %s \"$@\"\n", nsenter, ns.Path, nft)
	if err := os.WriteFile(n.nftWrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	// knftables runs the nft it finds on PATH: the wrapper.
	t.Setenv("PATH", dir+string(os.PathListSeparator)+os.Getenv("PATH"))
	return n
}

// options returns dual-stack Options using the namespace's tools.
func (n *nsTools) options(nftables bool, interval time.Duration) Options {
	return Options{
		Network: testNetwork, Lease: testLease, IPv6Network: testNetwork6, IPv6Lease: testLease6,
		IPMasq: true, NFTables: nftables, ResyncInterval: interval, Logger: testLogger(n.t),
		ipt: n.ipt.keeper, ip6t: n.ip6t.keeper,
		nft: func(family knftables.Family, table string) (knftables.Interface, error) {
			return knftables.New(family, table)
		},
	}
}

func (n *nsTools) keeper(nftables bool, interval time.Duration) *Keeper {
	n.t.Helper()
	k, err := New(n.options(nftables, interval))
	if err != nil {
		n.t.Fatalf("New: %v", err)
	}
	return k
}

// nft runs nft with args in the namespace and returns its output.
func (n *nsTools) nft(args ...string) []byte {
	n.t.Helper()
	out, err := exec.Command(n.nftWrapper, args...).Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		n.t.Fatalf("nft %q in namespace: %v: %s", args, err, stderr)
	}
	return out
}

// ruleset parses `nft -j list ruleset` of the namespace and renders the
// tables named in keep (all when empty), see renderRuleset.
func (n *nsTools) ruleset(keep ...string) []string {
	n.t.Helper()
	got, err := renderRuleset(n.nft("-j", "list", "ruleset"), keep)
	if err != nil {
		n.t.Fatal(err)
	}
	return got
}

// renderRuleset renders the tables, chains and rules of a `nft -j list
// ruleset` output as lines: per table (sorted by family and name) the table,
// its chains, then its rules in order, e.g.
// `rule ip flannel-ipv4 forward: ip saddr 10.5.0.0/16 accept # comment`.
// An expression it does not know is rendered as its JSON. Only tables whose
// name is in keep are rendered, unless keep is empty.
func renderRuleset(out []byte, keep []string) ([]string, error) {
	var doc struct {
		Nftables []map[string]json.RawMessage `json:"nftables"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		return nil, fmt.Errorf("parsing nft -j output: %w", err)
	}
	type object struct {
		Family, Table, Name, Chain, Type, Hook, Policy, Comment string
		Prio                                                    *int
		Expr                                                    []map[string]json.RawMessage
	}
	var tables []string
	byTable := map[string][]string{}
	rules := map[string][]string{}
	for _, o := range doc.Nftables {
		for kind, raw := range o {
			var obj object
			if kind == "metainfo" {
				continue
			}
			if err := json.Unmarshal(raw, &obj); err != nil {
				return nil, fmt.Errorf("parsing %s %s: %w", kind, raw, err)
			}
			table := obj.Table
			if kind == "table" {
				table = obj.Name
			}
			if len(keep) > 0 && !slices.Contains(keep, table) {
				continue
			}
			id := obj.Family + " " + table
			switch kind {
			case "table":
				tables = append(tables, id)
			case "chain":
				line := "chain " + id + " " + obj.Name + ":"
				if obj.Type != "" {
					line += fmt.Sprintf(" type %s hook %s prio %d policy %s", obj.Type, obj.Hook, *obj.Prio, obj.Policy)
				}
				byTable[id] = append(byTable[id], line)
			case "rule":
				var parts []string
				for _, e := range obj.Expr {
					parts = append(parts, renderExpr(e))
				}
				line := "rule " + id + " " + obj.Chain + ": " + strings.Join(parts, " ")
				if obj.Comment != "" {
					line += " # " + obj.Comment
				}
				rules[id] = append(rules[id], line)
			}
		}
	}
	slices.Sort(tables)
	var lines []string
	for _, id := range tables {
		lines = append(lines, "table "+id)
		lines = append(lines, byTable[id]...)
		lines = append(lines, rules[id]...)
	}
	return lines, nil
}

// renderExpr renders the expressions of our rules: payload matches against
// prefixes or addresses, and verdicts/statements without arguments.
func renderExpr(e map[string]json.RawMessage) string {
	for kind, raw := range e {
		if string(raw) == "null" {
			return kind // accept, return, masquerade, ...
		}
		if kind != "match" {
			break
		}
		var m struct {
			Op   string
			Left struct {
				Payload *struct{ Protocol, Field string }
			}
			Right json.RawMessage
		}
		if err := json.Unmarshal(raw, &m); err != nil || m.Left.Payload == nil {
			break
		}
		var right string
		var prefix struct {
			Prefix *struct {
				Addr string
				Len  int
			}
		}
		if json.Unmarshal(m.Right, &right) != nil {
			if json.Unmarshal(m.Right, &prefix) != nil || prefix.Prefix == nil {
				break
			}
			right = fmt.Sprintf("%s/%d", prefix.Prefix.Addr, prefix.Prefix.Len)
		}
		s := m.Left.Payload.Protocol + " " + m.Left.Payload.Field
		if m.Op != "==" {
			s += " " + m.Op
		}
		return s + " " + right
	}
	j, _ := json.Marshal(e)
	return string(j)
}

// rootState returns what the host's own (root namespace) tables hold of
// flanneld's, to check that the tests leave it alone. bins are the paths of
// iptables-save, ip6tables-save and nft.
func rootState(t testing.TB, bins []string) string {
	t.Helper()
	var b strings.Builder
	for _, argv := range [][]string{{bins[0]}, {bins[1]}, {bins[2], "list", "tables"}} {
		out, err := exec.Command(argv[0], argv[1:]...).Output()
		if err != nil {
			t.Fatalf("%s in the root namespace: %v", argv[0], err)
		}
		for _, l := range strings.Split(string(out), "\n") {
			if strings.Contains(strings.ToLower(l), "flannel") {
				b.WriteString(l + "\n")
			}
		}
	}
	return b.String()
}

// checkRootUntouched compares the root namespace's flanneld rules at the
// end of the test with those at its start. It must be called before PATH
// is changed to reach the test's namespace.
func checkRootUntouched(t testing.TB) {
	var bins []string
	for _, b := range []string{"iptables-save", "ip6tables-save", "nft"} {
		p, err := exec.LookPath(b)
		if err != nil {
			t.Fatalf("%s not found: %v", b, err)
		}
		bins = append(bins, p)
	}
	before := rootState(t, bins)
	t.Cleanup(func() {
		if after := rootState(t, bins); after != before {
			t.Errorf("the root namespace's tables changed:\n%s\nbefore:\n%s", after, before)
		}
	})
}

// TestIP6TablesInNetns runs a dual-stack Keeper in iptables mode against the
// kernel: the IPv6 chains are installed through ip6tables-restore, exactly,
// idempotently, and put back when changed by hand.
func TestIP6TablesInNetns(t *testing.T) {
	n := newNSTools(t, "flanneld-ip6t")
	checkAll := func() {
		t.Helper()
		n.ip6t.checkChain("filter", "FORWARD", wantForward6)
		n.ip6t.checkChain("filter", ChainForward, wantFlannelFwd6)
		n.ip6t.checkChain("nat", "POSTROUTING", wantPostrouting6)
		n.ip6t.checkChain("nat", ChainMasquerade, wantFlannelPostrtg6)
		n.ipt.checkChain("filter", ChainForward, wantFlannelFwd)
		n.ipt.checkChain("nat", ChainMasquerade, wantFlannelPostrtg)
	}
	k := n.keeper(false, time.Hour)
	ensure(t, k)
	checkAll()
	if got := k.Restores(); got != 4 {
		t.Errorf("Restores() = %d, want 4 (two chains per family)", got)
	}
	// ip6tables-save shows the same rules.
	out, err := exec.Command(n.ip6t.keeper.save).Output()
	if err != nil {
		t.Fatal(err)
	}
	var saved []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(l, "-A "+ChainForward+" ") || strings.HasPrefix(l, "-A "+ChainMasquerade+" ") {
			saved = append(saved, l)
		}
	}
	if want := slices.Concat(wantFlannelFwd6[1:], wantFlannelPostrtg6[1:]); !slices.Equal(saved, want) {
		t.Errorf("ip6tables-save:\n%s\nwant:\n%s", lines(saved), lines(want))
	}

	before := n.ip6t.snapshot() + n.ipt.snapshot()
	ensure(t, k)
	ensure(t, n.keeper(false, time.Hour)) // a restarted daemon
	if after := n.ip6t.snapshot() + n.ipt.snapshot(); after != before {
		t.Errorf("Ensure with the rules in place changed them:\n%s\nbefore:\n%s", after, before)
	}

	// A rule deleted by hand, a jump deleted by hand.
	n.ip6t.run("-t", "nat", "-D", ChainMasquerade, "2")
	n.ip6t.run("-D", "FORWARD", "1")
	ensure(t, k)
	checkAll()
	if got := k.Restores(); got != 6 {
		t.Errorf("Restores() = %d, want 6", got)
	}

	// Run puts back what is deleted while it runs.
	runner := n.keeper(false, 10*time.Millisecond)
	stop := startRun(t, runner)
	n.ip6t.run("-D", ChainForward, "1")
	eventually(t, "the IPv6 forward chain to be restored", func() bool {
		return slices.Equal(n.ip6t.run("-S", ChainForward), wantFlannelFwd6)
	})
	stop()
	checkAll()
}

// TestNFTablesInNetns runs Keepers in nftables mode against the kernel, with
// the real nft (through knftables), and switches modes both ways.
func TestNFTablesInNetns(t *testing.T) {
	n := newNSTools(t, "flanneld-nft")
	// Another program's table, which must stay as it is.
	n.nft("add table ip other; add chain ip other c { type filter hook input priority 0; }; " +
		"add rule ip other c ip saddr 192.0.2.0/24 accept comment \"other program\"")
	checkForeign := func() {
		t.Helper()
		if got := n.ruleset("other"); !slices.Equal(got, wantForeignNFT) {
			t.Errorf("another program's table:\n%s\nwant:\n%s", lines(got), lines(wantForeignNFT))
		}
	}
	checkNFT := func(what string) {
		t.Helper()
		if got := n.ruleset(NFTTableIPv4, NFTTableIPv6); !slices.Equal(got, wantNFT) {
			t.Errorf("%s: nftables:\n%s\nwant:\n%s", what, lines(got), lines(wantNFT))
		}
	}
	noFlannelChains := func(ipt *nsIPTables) {
		t.Helper()
		for _, table := range []string{"filter", "nat"} {
			for _, l := range ipt.run("-t", table, "-S") {
				if strings.Contains(l, "FLANNEL") || strings.Contains(l, "flanneld") {
					t.Errorf("%s table %s still holds %q", ipt.wrapper, table, l)
				}
			}
		}
	}

	// An earlier run in iptables mode.
	ensure(t, n.keeper(false, time.Hour))
	n.ip6t.checkChain("filter", ChainForward, wantFlannelFwd6)

	// nftables mode: the tables come, the chains and jumps go.
	k := n.keeper(true, time.Hour)
	ensure(t, k)
	checkNFT("after switching to nftables")
	noFlannelChains(n.ipt)
	noFlannelChains(n.ip6t)
	checkForeign()

	// Idempotent, also for a restarted daemon: not even a handle changes.
	before := string(n.nft("-a", "list", "ruleset"))
	ensure(t, k)
	fresh := n.keeper(true, time.Hour)
	ensure(t, fresh)
	if after := string(n.nft("-a", "list", "ruleset")); after != before {
		t.Errorf("Ensure with the tables in place changed them:\n%s\nbefore:\n%s", after, before)
	}
	if got := fresh.Restores(); got != 0 {
		t.Errorf("restarted daemon: Restores() = %d, want 0", got)
	}

	// A rule deleted by hand comes back.
	rules, err := k.keepers[ipv4].(*nftKeeper).nft.ListRules(context.Background(), NFTChainMasquerade)
	if err != nil || len(rules) != 4 {
		t.Fatalf("listing postrtg: %v (%d rules)", err, len(rules))
	}
	n.nft("delete", "rule", "ip", NFTTableIPv4, NFTChainMasquerade, "handle", fmt.Sprint(*rules[2].Handle))
	if got := n.ruleset(NFTTableIPv4); len(got) != 8 {
		t.Fatalf("the rule was not deleted: %q", got)
	}
	restores := k.Restores()
	ensure(t, k)
	checkNFT("after a rule was deleted by hand")
	if got := k.Restores(); got != restores+1 {
		t.Errorf("Restores() = %d, want %d", got, restores+1)
	}

	// Run puts back a chain deleted while it runs, and a whole table.
	runner := n.keeper(true, 10*time.Millisecond)
	stop := startRun(t, runner)
	n.nft("flush chain ip6 flannel-ipv6 forward; delete chain ip6 flannel-ipv6 forward")
	eventually(t, "the IPv6 forward chain to come back", func() bool {
		return slices.Equal(n.ruleset(NFTTableIPv4, NFTTableIPv6), wantNFT)
	})
	n.nft("delete", "table", "ip", NFTTableIPv4)
	eventually(t, "the IPv4 table to come back", func() bool {
		return slices.Equal(n.ruleset(NFTTableIPv4, NFTTableIPv6), wantNFT)
	})
	stop()
	checkNFT("after Run")

	// Back to iptables mode: the chains come, the tables go.
	b := n.keeper(false, time.Hour)
	ensure(t, b)
	if got := n.ruleset(NFTTableIPv4, NFTTableIPv6); len(got) != 0 {
		t.Errorf("nftables tables left after switching back:\n%s", lines(got))
	}
	n.ipt.checkChain("filter", ChainForward, wantFlannelFwd)
	n.ipt.checkChain("nat", ChainMasquerade, wantFlannelPostrtg)
	n.ip6t.checkChain("filter", ChainForward, wantFlannelFwd6)
	n.ip6t.checkChain("nat", ChainMasquerade, wantFlannelPostrtg6)
	checkForeign()
}

func TestRenderRuleset(t *testing.T) {
	out := `{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
{"table": {"family": "ip", "name": "t", "handle": 1}},
{"chain": {"family": "ip", "table": "t", "name": "c", "handle": 1, "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}},
{"chain": {"family": "ip", "table": "t", "name": "r", "handle": 2}},
{"rule": {"family": "ip", "table": "t", "chain": "c", "handle": 3, "comment": "x", "expr": [
 {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "10.5.0.0", "len": 16}}}},
 {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "10.5.1.1"}},
 {"counter": {"packets": 0, "bytes": 0}},
 {"masquerade": null}]}}]}`
	got, err := renderRuleset([]byte(out), nil)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"table ip t",
		"chain ip t c: type nat hook postrouting prio 100 policy accept",
		"chain ip t r:",
		`rule ip t c: ip saddr != 10.5.0.0/16 ip daddr 10.5.1.1 {"counter":{"packets":0,"bytes":0}} masquerade # x`,
	}
	if !slices.Equal(got, want) {
		t.Errorf("renderRuleset:\n%s\nwant:\n%s", lines(got), lines(want))
	}
}

// BenchmarkEnsureInPlaceInNetns measures the periodic check of a dual-stack
// Keeper whose rules are in place (what Run does every --iptables-resync):
// two iptables-save runs in iptables mode, two nft listings in nftables mode.
func BenchmarkEnsureInPlaceInNetns(b *testing.B) {
	for _, mode := range []struct {
		name     string
		nftables bool
	}{{"iptables", false}, {"nftables", true}} {
		b.Run(mode.name, func(b *testing.B) {
			n := newNSTools(b, "flanneld-bench")
			opts := n.options(mode.nftables, time.Hour)
			opts.Logger = klog.Background().V(10) // quiet
			k, err := New(opts)
			if err != nil {
				b.Fatal(err)
			}
			if err := k.Ensure(context.Background()); err != nil {
				b.Fatal(err)
			}
			restores := k.Restores()
			b.ResetTimer()
			for b.Loop() {
				if err := k.Ensure(context.Background()); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			if k.Restores() != restores {
				b.Fatalf("a check with the rules in place changed them")
			}
		})
	}
}
