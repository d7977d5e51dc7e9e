package network

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/knftables"
)

var (
	testNetwork6 = netip.MustParsePrefix("fc00::/48")
	testLease6   = netip.MustParsePrefix("fc00:0:0:22::/64")
)

func TestNFTRules(t *testing.T) {
	render := func(chains []NFTChain) []string {
		var out []string
		for _, c := range chains {
			out = append(out, "chain "+c.Name+" type "+string(c.Type)+" hook "+string(c.Hook)+" priority "+string(c.Priority))
			for _, r := range c.Rules {
				out = append(out, "  "+r.Rule+" # "+r.Comment)
			}
		}
		return out
	}
	tests := []struct {
		name           string
		network, lease string
		ipMasq         bool
		want           []string
	}{
		{
			name: "IPv4 forward only", network: "10.5.0.0/16", lease: "10.5.34.0/24",
			want: []string{
				"chain forward type filter hook forward priority filter",
				"  ip saddr 10.5.0.0/16 accept # flanneld forward from 10.5.0.0/16",
				"  ip daddr 10.5.0.0/16 accept # flanneld forward to 10.5.0.0/16",
			},
		},
		{
			name: "IPv4 with masquerade, host bits masked", network: "10.5.1.0/16", lease: "10.5.34.9/24", ipMasq: true,
			want: []string{
				"chain forward type filter hook forward priority filter",
				"  ip saddr 10.5.0.0/16 accept # flanneld forward from 10.5.0.0/16",
				"  ip daddr 10.5.0.0/16 accept # flanneld forward to 10.5.0.0/16",
				"chain postrtg type nat hook postrouting priority srcnat",
				"  ip saddr 10.5.0.0/16 ip daddr 10.5.0.0/16 return # flanneld no masq within 10.5.0.0/16",
				"  ip saddr 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade # flanneld masq leaving 10.5.0.0/16",
				"  ip saddr != 10.5.0.0/16 ip daddr 10.5.34.0/24 return # flanneld no masq to own subnet 10.5.34.0/24",
				"  ip saddr != 10.5.0.0/16 ip daddr 10.5.0.0/16 masquerade # flanneld masq entering 10.5.0.0/16",
			},
		},
		{
			name: "IPv6 with masquerade", network: "fc00::/48", lease: "fc00:0:0:22::/64", ipMasq: true,
			want: []string{
				"chain forward type filter hook forward priority filter",
				"  ip6 saddr fc00::/48 accept # flanneld forward from fc00::/48",
				"  ip6 daddr fc00::/48 accept # flanneld forward to fc00::/48",
				"chain postrtg type nat hook postrouting priority srcnat",
				"  ip6 saddr fc00::/48 ip6 daddr fc00::/48 return # flanneld no masq within fc00::/48",
				"  ip6 saddr fc00::/48 ip6 daddr != ff00::/8 masquerade # flanneld masq leaving fc00::/48",
				"  ip6 saddr != fc00::/48 ip6 daddr fc00:0:0:22::/64 return # flanneld no masq to own subnet fc00:0:0:22::/64",
				"  ip6 saddr != fc00::/48 ip6 daddr fc00::/48 masquerade # flanneld masq entering fc00::/48",
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := render(NFTRules(netip.MustParsePrefix(tt.network), netip.MustParsePrefix(tt.lease), tt.ipMasq))
			if !slices.Equal(got, tt.want) {
				t.Errorf("NFTRules() =\n%s\nwant\n%s", lines(got), lines(tt.want))
			}
		})
	}
	// The longest possible comment fits nft's limit of 128 bytes.
	long := netip.MustParsePrefix("fc00:1234:5678:9abc:def0:1234:5678:9a00/120")
	for _, c := range NFTRules(long, long, true) {
		for _, r := range c.Rules {
			if len(r.Comment) > 128 {
				t.Errorf("comment %q is %d bytes, longer than nft allows", r.Comment, len(r.Comment))
			}
		}
	}
}

// fakeNFT holds one knftables.Fake per table, as the nft factory of a
// Keeper hands them out.
type fakeNFT struct {
	tables map[string]*knftables.Fake // by "family table"
}

func newFakeNFT() *fakeNFT { return &fakeNFT{tables: map[string]*knftables.Fake{}} }

func (f *fakeNFT) get(family knftables.Family, table string) *knftables.Fake {
	key := string(family) + " " + table
	if f.tables[key] == nil {
		f.tables[key] = knftables.NewFake(family, table)
	}
	return f.tables[key]
}

func (f *fakeNFT) factory(family knftables.Family, table string) (knftables.Interface, error) {
	return f.get(family, table), nil
}

// dump prints both of our tables.
func (f *fakeNFT) dump() string {
	return f.get(knftables.IPv4Family, NFTTableIPv4).Dump() + f.get(knftables.IPv6Family, NFTTableIPv6).Dump()
}

// run applies an administrator's change to a table.
func (f *fakeNFT) run(t *testing.T, family knftables.Family, table string, change func(tx *knftables.Transaction)) {
	t.Helper()
	fake := f.get(family, table)
	tx := fake.NewTransaction()
	change(tx)
	if err := fake.Run(context.Background(), tx); err != nil {
		t.Fatalf("changing %s %s by hand: %v", family, table, err)
	}
}

// handle returns the handle of the i-th rule of a chain.
func (f *fakeNFT) handle(t *testing.T, family knftables.Family, table, chain string, i int) int {
	t.Helper()
	rules, err := f.get(family, table).ListRules(context.Background(), chain)
	if err != nil || i >= len(rules) {
		t.Fatalf("listing %s %s %s: %v (%d rules)", family, table, chain, err, len(rules))
	}
	return *rules[i].Handle
}

const goldenNFT4 = `add table ip flannel-ipv4 { comment "rules of flanneld" ; }
add chain ip flannel-ipv4 forward { type filter hook forward priority 0 ; }
add chain ip flannel-ipv4 postrtg { type nat hook postrouting priority 100 ; }
add rule ip flannel-ipv4 forward ip saddr 10.5.0.0/16 accept comment "flanneld forward from 10.5.0.0/16"
add rule ip flannel-ipv4 forward ip daddr 10.5.0.0/16 accept comment "flanneld forward to 10.5.0.0/16"
add rule ip flannel-ipv4 postrtg ip saddr 10.5.0.0/16 ip daddr 10.5.0.0/16 return comment "flanneld no masq within 10.5.0.0/16"
add rule ip flannel-ipv4 postrtg ip saddr 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade comment "flanneld masq leaving 10.5.0.0/16"
add rule ip flannel-ipv4 postrtg ip saddr != 10.5.0.0/16 ip daddr 10.5.34.0/24 return comment "flanneld no masq to own subnet 10.5.34.0/24"
add rule ip flannel-ipv4 postrtg ip saddr != 10.5.0.0/16 ip daddr 10.5.0.0/16 masquerade comment "flanneld masq entering 10.5.0.0/16"
`

const goldenNFT6 = `add table ip6 flannel-ipv6 { comment "rules of flanneld" ; }
add chain ip6 flannel-ipv6 forward { type filter hook forward priority 0 ; }
add chain ip6 flannel-ipv6 postrtg { type nat hook postrouting priority 100 ; }
add rule ip6 flannel-ipv6 forward ip6 saddr fc00::/48 accept comment "flanneld forward from fc00::/48"
add rule ip6 flannel-ipv6 forward ip6 daddr fc00::/48 accept comment "flanneld forward to fc00::/48"
add rule ip6 flannel-ipv6 postrtg ip6 saddr fc00::/48 ip6 daddr fc00::/48 return comment "flanneld no masq within fc00::/48"
add rule ip6 flannel-ipv6 postrtg ip6 saddr fc00::/48 ip6 daddr != ff00::/8 masquerade comment "flanneld masq leaving fc00::/48"
add rule ip6 flannel-ipv6 postrtg ip6 saddr != fc00::/48 ip6 daddr fc00:0:0:22::/64 return comment "flanneld no masq to own subnet fc00:0:0:22::/64"
add rule ip6 flannel-ipv6 postrtg ip6 saddr != fc00::/48 ip6 daddr fc00::/48 masquerade comment "flanneld masq entering fc00::/48"
`

func newNFTKeeperForTest(t *testing.T, opts Options) *Keeper {
	t.Helper()
	opts.NFTables = true
	opts.Logger = testLogger(t)
	k, err := New(opts)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return k
}

func TestNFTEnsureInstallsAndIsIdempotent(t *testing.T) {
	fwdOnly := func(golden string) string {
		var out []string
		for _, l := range strings.SplitAfter(golden, "\n") {
			if !strings.Contains(l, "postrtg") {
				out = append(out, l)
			}
		}
		return strings.Join(out, "")
	}
	tests := []struct {
		name         string
		opts         Options
		want         string
		wantRestores uint64
	}{
		{"IPv4", Options{Network: testNetwork, Lease: testLease, IPMasq: true}, goldenNFT4, 1},
		{"IPv6-only", Options{IPv6Network: testNetwork6, IPv6Lease: testLease6, IPMasq: true}, goldenNFT6, 1},
		{"dual stack", Options{Network: testNetwork, Lease: testLease, IPv6Network: testNetwork6, IPv6Lease: testLease6, IPMasq: true}, goldenNFT4 + goldenNFT6, 2},
		{"dual stack without ip-masq", Options{Network: testNetwork, Lease: testLease, IPv6Network: testNetwork6, IPv6Lease: testLease6}, fwdOnly(goldenNFT4 + goldenNFT6), 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeNFT()
			tt.opts.nft = f.factory
			k := newNFTKeeperForTest(t, tt.opts)
			ensure(t, k)
			if got := f.dump(); got != tt.want {
				t.Errorf("tables after Ensure:\n%s\nwant:\n%s", got, tt.want)
			}
			if got := k.Restores(); got != tt.wantRestores {
				t.Errorf("Restores() = %d, want %d", got, tt.wantRestores)
			}
			last := map[string]*knftables.Transaction{}
			for key, fake := range f.tables {
				last[key] = fake.LastTransaction
			}
			ensure(t, k)
			for key, fake := range f.tables {
				if fake.LastTransaction != last[key] {
					t.Errorf("second Ensure ran a transaction on %s", key)
				}
			}
			// A restarted daemon recognises the tables by their comments.
			fresh := newNFTKeeperForTest(t, tt.opts)
			ensure(t, fresh)
			for key, fake := range f.tables {
				if fake.LastTransaction != last[key] {
					t.Errorf("Ensure of a new Keeper ran a transaction on %s", key)
				}
			}
			if got := fresh.Restores(); got != 0 {
				t.Errorf("new Keeper: Restores() = %d, want 0", got)
			}
		})
	}
}

func TestNFTEnsureRestoresDrift(t *testing.T) {
	const v4 = knftables.IPv4Family
	tests := []struct {
		name   string
		mutate func(t *testing.T, f *fakeNFT)
		want   string // "" means goldenNFT4 restored
		noop   bool   // nothing to restore
	}{
		{
			name:   "nothing changed",
			mutate: func(*testing.T, *fakeNFT) {},
			noop:   true,
		},
		{
			name: "masquerade rule deleted",
			mutate: func(t *testing.T, f *fakeNFT) {
				h := f.handle(t, v4, NFTTableIPv4, NFTChainMasquerade, 2)
				f.run(t, v4, NFTTableIPv4, func(tx *knftables.Transaction) {
					tx.Delete(&knftables.Rule{Chain: NFTChainMasquerade, Handle: &h})
				})
			},
		},
		{
			name: "forward chain deleted",
			mutate: func(t *testing.T, f *fakeNFT) {
				f.run(t, v4, NFTTableIPv4, func(tx *knftables.Transaction) {
					tx.Flush(&knftables.Chain{Name: NFTChainForward})
					tx.Delete(&knftables.Chain{Name: NFTChainForward})
				})
			},
		},
		{
			name: "table deleted",
			mutate: func(t *testing.T, f *fakeNFT) {
				f.run(t, v4, NFTTableIPv4, func(tx *knftables.Transaction) { tx.Delete(&knftables.Table{}) })
			},
		},
		{
			name: "foreign rule added to our chain",
			mutate: func(t *testing.T, f *fakeNFT) {
				f.run(t, v4, NFTTableIPv4, func(tx *knftables.Transaction) {
					tx.Add(&knftables.Rule{Chain: NFTChainForward, Rule: "drop"})
				})
			},
		},
		{
			name: "foreign chain added to our table",
			mutate: func(t *testing.T, f *fakeNFT) {
				f.run(t, v4, NFTTableIPv4, func(tx *knftables.Transaction) {
					tx.Add(&knftables.Chain{Name: "other"})
					tx.Add(&knftables.Rule{Chain: "other", Rule: "accept"})
				})
			},
		},
		{
			name: "rule replaced by one with the same comment",
			mutate: func(t *testing.T, f *fakeNFT) {
				h := f.handle(t, v4, NFTTableIPv4, NFTChainForward, 0)
				f.run(t, v4, NFTTableIPv4, func(tx *knftables.Transaction) {
					tx.Delete(&knftables.Rule{Chain: NFTChainForward, Handle: &h})
					tx.Insert(&knftables.Rule{Chain: NFTChainForward, Rule: "ip saddr 10.0.0.0/8 accept", Comment: knftables.PtrTo("flanneld forward from 10.5.0.0/16")})
				})
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeNFT()
			k := newNFTKeeperForTest(t, Options{Network: testNetwork, Lease: testLease, IPMasq: true, nft: f.factory})
			ensure(t, k)
			tt.mutate(t, f)
			before := f.get(v4, NFTTableIPv4).LastTransaction
			ensure(t, k)
			if got := f.dump(); got != goldenNFT4 {
				t.Errorf("tables after Ensure:\n%s\nwant:\n%s", got, goldenNFT4)
			}
			ran := f.get(v4, NFTTableIPv4).LastTransaction != before
			if ran == tt.noop {
				t.Errorf("Ensure ran a transaction: %v, want %v", ran, !tt.noop)
			}
			want := uint64(2)
			if tt.noop {
				want = 1
			}
			if got := k.Restores(); got != want {
				t.Errorf("Restores() = %d, want %d", got, want)
			}
			before = f.get(v4, NFTTableIPv4).LastTransaction
			ensure(t, k)
			if f.get(v4, NFTTableIPv4).LastTransaction != before {
				t.Error("Ensure after the repair ran another transaction")
			}
		})
	}
}

func TestNFTSetLeaseAndMasqOff(t *testing.T) {
	f := newFakeNFT()
	opts := Options{Network: testNetwork, Lease: testLease, IPv6Network: testNetwork6, IPv6Lease: testLease6, IPMasq: true, nft: f.factory}
	k := newNFTKeeperForTest(t, opts)
	ensure(t, k)
	if err := k.SetLease(netip.MustParsePrefix("fc00:0:0:77::/64")); err != nil {
		t.Fatalf("SetLease: %v", err)
	}
	if err := k.SetLease(netip.MustParsePrefix("fc01::/64")); err == nil {
		t.Error("SetLease of an IPv6 subnet outside IPv6Network succeeded")
	}
	ensure(t, k)
	want := goldenNFT4 + strings.ReplaceAll(goldenNFT6, "fc00:0:0:22::/64", "fc00:0:0:77::/64")
	if got := f.dump(); got != want {
		t.Errorf("tables after SetLease:\n%s\nwant:\n%s", got, want)
	}
	// A restarted daemon with another lease sees it in the comments.
	opts.IPv6Lease = netip.MustParsePrefix("fc00:0:0:22::/64")
	fresh := newNFTKeeperForTest(t, opts)
	ensure(t, fresh)
	if got := f.dump(); got != goldenNFT4+goldenNFT6 {
		t.Errorf("tables after a restart with the first lease:\n%s\nwant:\n%s", got, goldenNFT4+goldenNFT6)
	}
	if got := fresh.Restores(); got != 1 {
		t.Errorf("Restores() = %d, want 1 (the IPv6 table only)", got)
	}
	// ip-masq off: the postrtg chains go.
	opts.IPMasq = false
	off := newNFTKeeperForTest(t, opts)
	ensure(t, off)
	if got := f.dump(); strings.Contains(got, "postrtg") || !strings.Contains(got, "chain ip6 flannel-ipv6 forward") {
		t.Errorf("tables with ip-masq off:\n%s", got)
	}
}

// TestSwitchingModes: each mode removes, on its first Ensure, what the
// other left, and what a family no longer configured left, and nothing else.
func TestSwitchingModes(t *testing.T) {
	ipt, ip6t, nft := withForeignRules(), withForeignRules(), newFakeNFT()
	foreignNFT := func() {
		nft.run(t, knftables.IPv4Family, "other", func(tx *knftables.Transaction) {
			tx.Add(&knftables.Table{})
			tx.Add(&knftables.Chain{Name: "c"})
			tx.Add(&knftables.Rule{Chain: "c", Rule: "accept"})
		})
	}
	foreignNFT()
	dual := Options{Network: testNetwork, Lease: testLease, IPv6Network: testNetwork6, IPv6Lease: testLease6, IPMasq: true, ResyncInterval: time.Hour,
		Logger: testLogger(t), ipt: ipt, ip6t: ip6t, nft: nft.factory}
	golden6 := strings.NewReplacer("10.5.0.0/16", "fc00::/48", "10.5.34.0/24", "fc00:0:0:22::/64", "224.0.0.0/4", "ff00::/8").Replace(goldenMasq)

	k, err := New(dual)
	if err != nil {
		t.Fatal(err)
	}
	ensure(t, k)
	checkDump(t, ipt, goldenMasq)
	checkDump(t, ip6t, golden6)
	if got := nft.dump(); got != "" {
		t.Errorf("iptables mode made nftables tables:\n%s", got)
	}

	// To nftables: the tables come, then the chains go.
	dual.NFTables = true
	n, err := New(dual)
	if err != nil {
		t.Fatal(err)
	}
	ensure(t, n)
	if got := nft.dump(); got != goldenNFT4+goldenNFT6 {
		t.Errorf("nftables after switching:\n%s\nwant:\n%s", got, goldenNFT4+goldenNFT6)
	}
	checkDump(t, ipt, withForeignRules().dump())
	checkDump(t, ip6t, withForeignRules().dump())
	if got := n.Restores(); got != 2+4 {
		t.Errorf("Restores() = %d, want 6 (two nftables tables written, filter and nat cleaned in each family)", got)
	}
	ipt.takeWrites()
	ensure(t, n)
	if w := ipt.takeWrites(); len(w) != 0 {
		t.Errorf("second Ensure touched iptables: %q", w)
	}

	// Back to iptables, IPv4 only: the chains come, both tables go (the
	// IPv6 one is no longer configured), ip6tables stays clean.
	v4 := dual
	v4.NFTables, v4.IPv6Network, v4.IPv6Lease = false, netip.Prefix{}, netip.Prefix{}
	b, err := New(v4)
	if err != nil {
		t.Fatal(err)
	}
	ensure(t, b)
	checkDump(t, ipt, goldenMasq)
	checkDump(t, ip6t, withForeignRules().dump())
	if got := nft.dump(); got != "" {
		t.Errorf("nftables tables left after switching back:\n%s", got)
	}
	if nft.get(knftables.IPv4Family, "other").Table == nil {
		t.Error("another program's nftables table was removed")
	}

	// IPv6-only in iptables mode: the IPv4 chains of the earlier run go.
	v6 := dual
	v6.NFTables, v6.Network, v6.Lease = false, netip.Prefix{}, netip.Prefix{}
	s, err := New(v6)
	if err != nil {
		t.Fatal(err)
	}
	ensure(t, s)
	checkDump(t, ipt, withForeignRules().dump())
	checkDump(t, ip6t, golden6)
}

func TestNewDualStackOptions(t *testing.T) {
	p := netip.MustParsePrefix
	f := newFakeIPT()
	tests := []struct {
		name    string
		opts    Options
		wantErr string
	}{
		{"neither family", Options{}, "no network given"},
		{"IPv4 in IPv6Network", Options{IPv6Network: p("10.5.0.0/16"), IPv6Lease: p("10.5.1.0/24")}, "is not an IPv6 prefix"},
		{"IPv6 lease missing", Options{Network: testNetwork, Lease: testLease, IPv6Network: testNetwork6}, "is not a prefix"},
		{"IPv6 lease outside", Options{IPv6Network: testNetwork6, IPv6Lease: p("fc01::/64")}, "not inside network fc00::/48"},
		{"IPv4 lease as IPv6 lease", Options{IPv6Network: testNetwork6, IPv6Lease: testLease}, "no IPv4 network is configured"},
		{"ip6tables missing", Options{IPv6Network: testNetwork6, IPv6Lease: testLease6}, "ip6tables not found; install the iptables package"},
		{"nft missing", Options{Network: testNetwork, Lease: testLease, NFTables: true}, "install the nftables package"},
	}
	for _, tt := range tests {
		tt.opts.ipt = f
		if _, err := New(tt.opts); err == nil || !strings.Contains(err.Error(), tt.wantErr) {
			t.Errorf("%s: New error = %v, want one containing %q", tt.name, err, tt.wantErr)
		}
	}
	k, err := New(Options{IPv6Network: p("fc00::1/48"), IPv6Lease: testLease6, ip6t: f})
	if err != nil {
		t.Fatalf("IPv6-only: %v", err)
	}
	if k.network.IsValid() || k.network6 != testNetwork6 {
		t.Errorf("networks = %v, %v; want none and %v", k.network, k.network6, testNetwork6)
	}
	if err := k.SetLease(testLease); err == nil {
		t.Error("SetLease of an IPv4 subnet on an IPv6-only Keeper succeeded")
	}
}

// failingNFT is a knftables.Fake whose runs and listings can be made to fail.
type failingNFT struct {
	*knftables.Fake
	failRun, failList error
}

func (f *failingNFT) Run(ctx context.Context, tx *knftables.Transaction) error {
	if f.failRun != nil {
		return f.failRun
	}
	return f.Fake.Run(ctx, tx)
}

func (f *failingNFT) ListRules(ctx context.Context, chain string) ([]*knftables.Rule, error) {
	if f.failList != nil {
		return nil, f.failList
	}
	return f.Fake.ListRules(ctx, chain)
}

// TestNFTEnsureErrors: a family whose table cannot be read or written does
// not keep the other family's out, the error names the table, and the next
// Ensure completes the set. Leftovers of the other mode are removed only
// once the tables are in, and a failure to remove them is logged, not
// returned.
func TestNFTEnsureErrors(t *testing.T) {
	for _, tt := range []struct {
		name string
		set  func(f *failingNFT)
	}{
		{"listing fails", func(f *failingNFT) { f.failList = errFake }},
		{"transaction fails", func(f *failingNFT) { f.failRun = errFake }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			nft := newFakeNFT()
			v4 := &failingNFT{Fake: nft.get(knftables.IPv4Family, NFTTableIPv4)}
			ipt := withForeignRules()
			ensure(t, newTestKeeper(t, ipt, true, 0)) // an earlier run in iptables mode
			k := newNFTKeeperForTest(t, Options{Network: testNetwork, Lease: testLease, IPv6Network: testNetwork6, IPv6Lease: testLease6, IPMasq: true,
				ipt: ipt,
				nft: func(family knftables.Family, table string) (knftables.Interface, error) {
					if family == knftables.IPv4Family {
						return v4, nil
					}
					return nft.factory(family, table)
				}})
			tt.set(v4)
			err := k.Ensure(context.Background())
			if !errors.Is(err, errFake) || !strings.Contains(err.Error(), "nftables table ip flannel-ipv4") {
				t.Fatalf("Ensure error = %v, want one naming the table and wrapping %v", err, errFake)
			}
			if got := nft.dump(); got != goldenNFT6 {
				t.Errorf("tables after a failure of the IPv4 one:\n%s\nwant:\n%s", got, goldenNFT6)
			}
			checkDump(t, ipt, goldenMasq) // not removed while the IPv4 table is out
			v4.failList, v4.failRun = nil, nil
			ensure(t, k)
			if got := nft.dump(); got != goldenNFT4+goldenNFT6 {
				t.Errorf("tables after the fault is gone:\n%s\nwant:\n%s", got, goldenNFT4+goldenNFT6)
			}
			checkDump(t, ipt, withForeignRules().dump())
		})
	}

	t.Run("nft does not work", func(t *testing.T) {
		calls := 0
		k := newNFTKeeperForTest(t, Options{Network: testNetwork, Lease: testLease, nft: func(knftables.Family, string) (knftables.Interface, error) {
			calls++
			return nil, errFake
		}})
		if calls != 0 {
			t.Errorf("New ran nft %d times, want 0 (it connects at the first Ensure)", calls)
		}
		err := k.Ensure(context.Background())
		if !errors.Is(err, errFake) || !strings.Contains(err.Error(), "install the nftables package") {
			t.Errorf("Ensure error = %v, want one wrapping %v that says what to install", err, errFake)
		}
	})

	t.Run("leftovers cannot be removed", func(t *testing.T) {
		nft := newFakeNFT()
		ipt := withForeignRules()
		ensure(t, newTestKeeper(t, ipt, true, 0))
		ipt.setFail("restore", errFake)
		k := newNFTKeeperForTest(t, Options{Network: testNetwork, Lease: testLease, IPMasq: true, ipt: ipt, nft: nft.factory})
		ensure(t, k) // logged, not returned
		if got := nft.dump(); got != goldenNFT4 {
			t.Errorf("tables:\n%s\nwant:\n%s", got, goldenNFT4)
		}
		checkDump(t, ipt, goldenMasq)
		ipt.setFail("restore", nil)
		ensure(t, k)
		checkDump(t, ipt, withForeignRules().dump())
		ipt.takeWrites()
		ensure(t, k)
		if w := ipt.takeWrites(); len(w) != 0 {
			t.Errorf("Ensure after the removal touched iptables again: %q", w)
		}
	})
}
