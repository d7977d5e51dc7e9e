package network

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"
	"k8s.io/klog/v2"
)

var (
	testNetwork = netip.MustParsePrefix("10.5.0.0/16")
	testLease   = netip.MustParsePrefix("10.5.34.0/24")
)

// testLogger sends the Keeper's log lines to t.
func testLogger(t testing.TB) klog.Logger {
	return funcr.New(func(prefix, args string) { t.Log(prefix, args) }, funcr.Options{})
}

func newTestKeeper(t *testing.T, f *fakeIPT, ipMasq bool, interval time.Duration) *Keeper {
	t.Helper()
	k, err := New(Options{Network: testNetwork, Lease: testLease, IPMasq: ipMasq, ResyncInterval: interval, Logger: testLogger(t), ipt: f})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return k
}

// withForeignRules returns a fake holding rules of other software, which the
// Keeper must leave as they are.
func withForeignRules() *fakeIPT {
	f := newFakeIPT()
	f.add("filter", "FORWARD", "-i", "eth0", "-j", "ACCEPT")
	f.add("filter", "FORWARD", "-o", "docker0", "-j", "DOCKER")
	f.add("filter", "DOCKER", "-d", "172.17.0.2/32", "-j", "ACCEPT")
	f.add("nat", "POSTROUTING", "-s", "172.17.0.0/16", "!", "-o", "docker0", "-j", "MASQUERADE")
	f.add("nat", "KUBE-POSTROUTING", "-m", "comment", "--comment", "kubernetes postrouting rules", "-j", "RETURN")
	return f
}

const goldenFilter = `*filter
-P INPUT ACCEPT
-P FORWARD ACCEPT
-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
-A FORWARD -i eth0 -j ACCEPT
-A FORWARD -o docker0 -j DOCKER
-P OUTPUT ACCEPT
-N DOCKER
-A DOCKER -d 172.17.0.2/32 -j ACCEPT
-N FLANNEL-FWD
-A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment "flanneld forward from network" -j ACCEPT
-A FLANNEL-FWD -d 10.5.0.0/16 -m comment --comment "flanneld forward to network" -j ACCEPT
`

// goldenMasq is the state after Ensure with IPMasq on withForeignRules.
const goldenMasq = goldenFilter + `*nat
-P PREROUTING ACCEPT
-P INPUT ACCEPT
-P OUTPUT ACCEPT
-P POSTROUTING ACCEPT
-A POSTROUTING -m comment --comment "flanneld masquerade" -j FLANNEL-POSTRTG
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-N KUBE-POSTROUTING
-A KUBE-POSTROUTING -m comment --comment "kubernetes postrouting rules" -j RETURN
-N FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld no masq within network" -j RETURN
-A FLANNEL-POSTRTG -s 10.5.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq leaving network" -j MASQUERADE
-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.34.0/24 -m comment --comment "flanneld no masq to own subnet" -j RETURN
-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld masq entering network" -j MASQUERADE
`

// goldenNoMasq is the state after Ensure with IPMasq off on withForeignRules.
const goldenNoMasq = goldenFilter + `*nat
-P PREROUTING ACCEPT
-P INPUT ACCEPT
-P OUTPUT ACCEPT
-P POSTROUTING ACCEPT
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-N KUBE-POSTROUTING
-A KUBE-POSTROUTING -m comment --comment "kubernetes postrouting rules" -j RETURN
`

var (
	restoreFwd  = []string{"clear filter FLANNEL-FWD", "append filter FLANNEL-FWD", "append filter FLANNEL-FWD"}
	restoreMasq = []string{"clear nat FLANNEL-POSTRTG", "append nat FLANNEL-POSTRTG", "append nat FLANNEL-POSTRTG", "append nat FLANNEL-POSTRTG", "append nat FLANNEL-POSTRTG"}
	jumpFwd     = []string{"insert1 filter FORWARD"}
	jumpMasq    = []string{"insert1 nat POSTROUTING"}
)

func join(parts ...[]string) []string { return slices.Concat(parts...) }

func ensure(t *testing.T, k *Keeper) {
	t.Helper()
	if err := k.Ensure(context.Background()); err != nil {
		t.Fatalf("Ensure: %v", err)
	}
}

func checkDump(t *testing.T, f *fakeIPT, want string) {
	t.Helper()
	if got := f.dump(); got != want {
		t.Errorf("rules after Ensure:\n%s\nwant:\n%s", got, want)
	}
}

func TestEnsureInstallsAndIsIdempotent(t *testing.T) {
	for _, tt := range []struct {
		name         string
		ipMasq       bool
		want         string
		writes       []string
		wantRestores uint64
	}{
		{"ip-masq on", true, goldenMasq, join(restoreFwd, jumpFwd, restoreMasq, jumpMasq), 2},
		{"ip-masq off", false, goldenNoMasq, join(restoreFwd, jumpFwd), 1},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := withForeignRules()
			k := newTestKeeper(t, f, tt.ipMasq, 0)
			ensure(t, k)
			checkDump(t, f, tt.want)
			if w := f.takeWrites(); !slices.Equal(w, tt.writes) {
				t.Errorf("first Ensure made calls %q, want %q", w, tt.writes)
			}
			if got := k.Restores(); got != tt.wantRestores {
				t.Errorf("Restores() = %d after install, want %d", got, tt.wantRestores)
			}
			ensure(t, k)
			if w := f.takeWrites(); len(w) != 0 {
				t.Errorf("second Ensure changed rules: %q", w)
			}
			checkDump(t, f, tt.want)
			if got := k.Restores(); got != tt.wantRestores {
				t.Errorf("Restores() = %d after second Ensure, want %d", got, tt.wantRestores)
			}
		})
	}
}

func TestEnsureRestoresDrift(t *testing.T) {
	deleteAt := func(i int) func([][]string) [][]string {
		return func(r [][]string) [][]string { return slices.Delete(r, i, i+1) }
	}
	deleteJump := func(chain string) func([][]string) [][]string {
		return func(rs [][]string) [][]string {
			return slices.DeleteFunc(rs, func(r []string) bool { return jumpsTo(r, chain) })
		}
	}
	tests := []struct {
		name         string
		mutate       func(f *fakeIPT)
		wantWrites   []string
		wantRestores uint64 // beyond the 2 of the install
	}{
		{
			name:   "nothing changed",
			mutate: func(*fakeIPT) {},
		},
		{
			name:         "forward rule deleted",
			mutate:       func(f *fakeIPT) { f.edit("filter", ChainForward, deleteAt(0)) },
			wantWrites:   restoreFwd,
			wantRestores: 1,
		},
		{
			name:         "masquerade rule deleted",
			mutate:       func(f *fakeIPT) { f.edit("nat", ChainMasquerade, deleteAt(2)) },
			wantWrites:   restoreMasq,
			wantRestores: 1,
		},
		{
			name: "masquerade rule moved",
			mutate: func(f *fakeIPT) {
				f.edit("nat", ChainMasquerade, func(r [][]string) [][]string {
					moved := r[0]
					return append(slices.Delete(r, 0, 1), moved)
				})
			},
			wantWrites:   restoreMasq,
			wantRestores: 1,
		},
		{
			name: "masquerade rule changed",
			mutate: func(f *fakeIPT) {
				f.edit("nat", ChainMasquerade, func(r [][]string) [][]string {
					r[2] = slices.Clone(r[2])
					r[2][4] = "10.5.99.0/24"
					return r
				})
			},
			wantWrites:   restoreMasq,
			wantRestores: 1,
		},
		{
			name:         "foreign rule added to our chain",
			mutate:       func(f *fakeIPT) { f.add("filter", ChainForward, "-j", "DROP") },
			wantWrites:   restoreFwd,
			wantRestores: 1,
		},
		{
			name:         "forward jump deleted",
			mutate:       func(f *fakeIPT) { f.edit("filter", "FORWARD", deleteJump(ChainForward)) },
			wantWrites:   jumpFwd,
			wantRestores: 1,
		},
		{
			name: "masquerade jump deleted and chain flushed",
			mutate: func(f *fakeIPT) {
				f.edit("nat", "POSTROUTING", deleteJump(ChainMasquerade))
				f.edit("nat", ChainMasquerade, func([][]string) [][]string { return nil })
			},
			wantWrites:   join(restoreMasq, jumpMasq),
			wantRestores: 1,
		},
		{
			name: "both chains and jumps deleted",
			mutate: func(f *fakeIPT) {
				f.edit("filter", "FORWARD", deleteJump(ChainForward))
				f.dropChain("filter", ChainForward)
				f.edit("nat", "POSTROUTING", deleteJump(ChainMasquerade))
				f.dropChain("nat", ChainMasquerade)
			},
			wantWrites:   join(restoreFwd, jumpFwd, restoreMasq, jumpMasq),
			wantRestores: 2,
		},
		{
			name: "foreign rules changed",
			mutate: func(f *fakeIPT) {
				f.edit("filter", "FORWARD", func(r [][]string) [][]string {
					return slices.DeleteFunc(r, func(r []string) bool { return slices.Contains(r, "eth0") })
				})
				f.add("nat", "POSTROUTING", "-o", "eth1", "-j", "MASQUERADE")
				f.add("filter", "DOCKER", "-j", "RETURN")
			},
		},
		{
			name: "our jump moved below foreign rules stays",
			mutate: func(f *fakeIPT) {
				f.edit("filter", "FORWARD", func(r [][]string) [][]string {
					jump := r[0]
					return append(slices.Delete(r, 0, 1), jump)
				})
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := withForeignRules()
			k := newTestKeeper(t, f, true, 0)
			ensure(t, k)
			f.takeWrites()
			tt.mutate(f)
			mutated := f.dump()

			ensure(t, k)
			if w := f.takeWrites(); !slices.Equal(w, tt.wantWrites) {
				t.Errorf("Ensure made calls %q, want %q", w, tt.wantWrites)
			}
			if tt.wantWrites != nil {
				checkDump(t, f, goldenMasq)
			} else {
				checkDump(t, f, mutated)
			}
			if got, want := k.Restores(), 2+tt.wantRestores; got != want {
				t.Errorf("Restores() = %d, want %d", got, want)
			}
			ensure(t, k)
			if w := f.takeWrites(); len(w) != 0 {
				t.Errorf("Ensure after restore changed rules again: %q", w)
			}
		})
	}
}

func TestEnsureMasqOffRemovesLeftovers(t *testing.T) {
	tests := []struct {
		name       string
		leftover   func(t *testing.T, f *fakeIPT)
		wantWrites []string
	}{
		{
			name:       "no leftovers",
			leftover:   func(*testing.T, *fakeIPT) {},
			wantWrites: join(restoreFwd, jumpFwd),
		},
		{
			name: "chain and jump of an earlier ip-masq run",
			leftover: func(t *testing.T, f *fakeIPT) {
				ensure(t, newTestKeeper(t, f, true, 0))
				f.takeWrites()
			},
			wantWrites: []string{"delete nat POSTROUTING", "clear nat FLANNEL-POSTRTG", "deletechain nat FLANNEL-POSTRTG"},
		},
		{
			name: "jumps with other comments and duplicates",
			leftover: func(t *testing.T, f *fakeIPT) {
				ensure(t, newTestKeeper(t, f, true, 0))
				f.add("nat", "POSTROUTING", "-j", ChainMasquerade)
				f.add("nat", "POSTROUTING", "-m", "comment", "--comment", "flanneld masquerade", "-j", ChainMasquerade)
				f.takeWrites()
			},
			wantWrites: []string{"delete nat POSTROUTING", "delete nat POSTROUTING", "delete nat POSTROUTING", "clear nat FLANNEL-POSTRTG", "deletechain nat FLANNEL-POSTRTG"},
		},
		{
			name: "empty chain without jump",
			leftover: func(t *testing.T, f *fakeIPT) {
				ensure(t, newTestKeeper(t, f, false, 0))
				f.add("nat", ChainMasquerade, "-j", "RETURN")
				f.takeWrites()
			},
			wantWrites: []string{"clear nat FLANNEL-POSTRTG", "deletechain nat FLANNEL-POSTRTG"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := withForeignRules()
			tt.leftover(t, f)
			k := newTestKeeper(t, f, false, 0)
			ensure(t, k)
			if w := f.takeWrites(); !slices.Equal(w, tt.wantWrites) {
				t.Errorf("Ensure made calls %q, want %q", w, tt.wantWrites)
			}
			checkDump(t, f, goldenNoMasq)
			if got := k.Restores(); got != 1 {
				t.Errorf("Restores() = %d, want 1", got)
			}
			ensure(t, k)
			if w := f.takeWrites(); len(w) != 0 {
				t.Errorf("second Ensure changed rules: %q", w)
			}
		})
	}
}

func TestEnsureErrors(t *testing.T) {
	leftoverMasq := func(f *fakeIPT) { f.add("nat", ChainMasquerade, "-j", "RETURN") }
	tests := []struct {
		name         string
		ipMasq       bool
		setup        func(f *fakeIPT)
		fail         string
		wantRestores uint64
		wantInDump   []string // rules that must be in place despite the error
		wantNotIn    []string // rules a failed transaction must not leave behind
	}{
		{name: "check fails", ipMasq: true, fail: "save"},
		{name: "restore fails", ipMasq: true, fail: "restore", wantNotIn: []string{"FLANNEL-FWD", "FLANNEL-POSTRTG"}},
		{name: "flush fails", ipMasq: true, fail: "clear", wantNotIn: []string{"FLANNEL-FWD", "FLANNEL-POSTRTG"}},
		{name: "append fails", ipMasq: true, fail: "append", wantNotIn: []string{"FLANNEL-FWD", "FLANNEL-POSTRTG"}},
		{
			// Each table is one transaction: a failed jump leaves no
			// half-installed chain behind either.
			name: "jump insert fails", ipMasq: true, fail: "insert1",
			wantNotIn: []string{"FLANNEL-FWD", "FLANNEL-POSTRTG"},
		},
		{
			name: "filter fails, nat still done", ipMasq: true, fail: "restore filter",
			wantRestores: 1, wantInDump: []string{"-A POSTROUTING -m comment --comment \"flanneld masquerade\" -j FLANNEL-POSTRTG"},
			wantNotIn: []string{"FLANNEL-FWD"},
		},
		{
			name: "nat fails, filter still done", ipMasq: true, fail: "append nat",
			wantRestores: 1, wantInDump: []string{"-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD"},
			wantNotIn: []string{"FLANNEL-POSTRTG"},
		},
		{
			name: "removal fails, filter still done", ipMasq: false, setup: leftoverMasq, fail: "deletechain",
			wantRestores: 1,
			wantInDump:   []string{"-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD", "-N FLANNEL-POSTRTG"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := withForeignRules()
			if tt.setup != nil {
				tt.setup(f)
			}
			f.setFail(tt.fail, errFake)
			k := newTestKeeper(t, f, tt.ipMasq, 0)
			err := k.Ensure(context.Background())
			if !errors.Is(err, errFake) {
				t.Fatalf("Ensure error = %v, want one wrapping %v", err, errFake)
			}
			dump := f.dump()
			for _, r := range tt.wantInDump {
				if !strings.Contains(dump, r) {
					t.Errorf("rule %q missing after partial failure:\n%s", r, dump)
				}
			}
			for _, r := range tt.wantNotIn {
				if strings.Contains(dump, r) {
					t.Errorf("%q is in the tables after its transaction failed:\n%s", r, dump)
				}
			}
			if got := k.Restores(); got != tt.wantRestores {
				t.Errorf("Restores() = %d, want %d", got, tt.wantRestores)
			}
			// Once the fault is gone, the next Ensure completes the set.
			f.setFail(tt.fail, nil)
			ensure(t, k)
			if tt.ipMasq {
				checkDump(t, f, goldenMasq)
			} else {
				checkDump(t, f, goldenNoMasq)
			}
		})
	}
}

// TestEnsureExecs counts the iptables-save and iptables-restore runs: a
// check that finds everything in place reads once and writes nothing; an
// install or repair is one restore of both tables, and the declared chains
// are refilled in the same transaction.
func TestEnsureExecs(t *testing.T) {
	f := withForeignRules()
	k := newTestKeeper(t, f, true, 0)
	ensure(t, k)
	if f.saves != 2 || len(f.scripts) != 1 {
		t.Errorf("install: %d saves and %d restores, want 2 (check, read-back) and 1", f.saves, len(f.scripts))
	}
	want := `*filter
:FLANNEL-FWD - [0:0]
-A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment "flanneld forward from network" -j ACCEPT
-A FLANNEL-FWD -d 10.5.0.0/16 -m comment --comment "flanneld forward to network" -j ACCEPT
-I FORWARD 1 -m comment --comment "flanneld forward" -j FLANNEL-FWD
COMMIT
*nat
:FLANNEL-POSTRTG - [0:0]
-A FLANNEL-POSTRTG -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld no masq within network" -j RETURN
-A FLANNEL-POSTRTG -s 10.5.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq leaving network" -j MASQUERADE
-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.34.0/24 -m comment --comment "flanneld no masq to own subnet" -j RETURN
-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld masq entering network" -j MASQUERADE
-I POSTROUTING 1 -m comment --comment "flanneld masquerade" -j FLANNEL-POSTRTG
COMMIT
`
	if len(f.scripts) > 0 && f.scripts[0] != want {
		t.Errorf("install script:\n%s\nwant:\n%s", f.scripts[0], want)
	}

	f.saves, f.scripts = 0, nil
	ensure(t, k)
	if f.saves != 1 || len(f.scripts) != 0 {
		t.Errorf("check with rules in place: %d saves and %d restores, want 1 and 0", f.saves, len(f.scripts))
	}

	// A rule deleted from FLANNEL-FWD: only the filter table is touched,
	// the chain declared again and refilled in the same script.
	f.edit("filter", ChainForward, func(r [][]string) [][]string { return r[1:] })
	f.saves, f.scripts = 0, nil
	ensure(t, k)
	wantFwd := `*filter
:FLANNEL-FWD - [0:0]
-A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment "flanneld forward from network" -j ACCEPT
-A FLANNEL-FWD -d 10.5.0.0/16 -m comment --comment "flanneld forward to network" -j ACCEPT
COMMIT
`
	if f.saves != 2 || !slices.Equal(f.scripts, []string{wantFwd}) {
		t.Errorf("repair: %d saves, restores %q; want 2 saves and one restore %q", f.saves, f.scripts, wantFwd)
	}
	checkDump(t, f, goldenMasq)
}

func TestEnsureCanceledContext(t *testing.T) {
	f := withForeignRules()
	k := newTestKeeper(t, f, true, 0)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := k.Ensure(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Ensure with canceled context = %v, want context.Canceled", err)
	}
	if w := f.takeWrites(); len(w) != 0 {
		t.Errorf("Ensure with canceled context changed rules: %q", w)
	}
}

// TestEnsureOtherRendering covers an iptables that prints rules differently
// from how they were written: after one restore the Keeper recognises its
// own rules and does not restore them at every check.
func TestEnsureOtherRendering(t *testing.T) {
	f := withForeignRules()
	// Print the comment match first, as some other version might.
	f.render = func(spec []string) []string {
		i := slices.Index(spec, "-m")
		if i <= 0 || i+4 > len(spec) {
			return spec
		}
		return slices.Concat(spec[i:i+4], spec[:i], spec[i+4:])
	}
	k := newTestKeeper(t, f, true, 0)
	ensure(t, k)
	f.takeWrites()
	ensure(t, k)
	if w := f.takeWrites(); len(w) != 0 {
		t.Errorf("second Ensure changed rules: %q", w)
	}
	f.edit("nat", ChainMasquerade, func(r [][]string) [][]string { return r[1:] })
	ensure(t, k)
	if w := f.takeWrites(); !slices.Equal(w, restoreMasq) {
		t.Errorf("Ensure after a deleted rule made calls %q, want %q", w, restoreMasq)
	}
	ensure(t, k)
	if w := f.takeWrites(); len(w) != 0 {
		t.Errorf("Ensure after restore changed rules again: %q", w)
	}
	if got := k.Restores(); got != 3 {
		t.Errorf("Restores() = %d, want 3", got)
	}
}

func TestSetLease(t *testing.T) {
	f := withForeignRules()
	k := newTestKeeper(t, f, true, 0)
	ensure(t, k)
	f.takeWrites()

	for _, bad := range []string{"10.6.0.0/24", "10.0.0.0/8", "::/64"} {
		if err := k.SetLease(netip.MustParsePrefix(bad)); err == nil {
			t.Errorf("SetLease(%s) succeeded, want an error", bad)
		}
	}
	if err := k.SetLease(netip.Prefix{}); err == nil {
		t.Error("SetLease(zero prefix) succeeded, want an error")
	}
	ensure(t, k)
	if w := f.takeWrites(); len(w) != 0 {
		t.Errorf("Ensure after rejected leases changed rules: %q", w)
	}

	if err := k.SetLease(netip.MustParsePrefix("10.5.77.9/24")); err != nil {
		t.Fatalf("SetLease: %v", err)
	}
	ensure(t, k)
	if w := f.takeWrites(); !slices.Equal(w, restoreMasq) {
		t.Errorf("Ensure after SetLease made calls %q, want %q", w, restoreMasq)
	}
	checkDump(t, f, strings.Replace(goldenMasq, "-d 10.5.34.0/24", "-d 10.5.77.0/24", 1))
}

func TestNewValidatesOptions(t *testing.T) {
	f := newFakeIPT()
	p := netip.MustParsePrefix
	tests := []struct {
		name string
		opts Options
	}{
		{"no network", Options{Lease: testLease}},
		{"IPv6 network", Options{Network: p("fd00::/48"), Lease: p("fd00::/64")}},
		{"no lease", Options{Network: testNetwork}},
		{"lease outside network", Options{Network: testNetwork, Lease: p("10.6.1.0/24")}},
		{"lease larger than network", Options{Network: testNetwork, Lease: p("10.0.0.0/8")}},
		{"negative interval", Options{Network: testNetwork, Lease: testLease, ResyncInterval: -time.Second}},
	}
	for _, tt := range tests {
		tt.opts.ipt = f
		if k, err := New(tt.opts); err == nil {
			t.Errorf("%s: New succeeded (%+v), want an error", tt.name, k)
		}
	}
	k, err := New(Options{Network: p("10.5.1.0/16"), Lease: testLease, ipt: f})
	if err != nil {
		t.Fatalf("New with valid options: %v", err)
	}
	if k.interval != DefaultResyncInterval {
		t.Errorf("default interval = %v, want %v", k.interval, DefaultResyncInterval)
	}
	if k.network != testNetwork {
		t.Errorf("network = %v, want %v (masked)", k.network, testNetwork)
	}
}

// eventually polls cond until it holds or a generous deadline passes.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// startRun runs k.Run until the test ends and checks that it returns nil.
func startRun(t *testing.T, k *Keeper) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- k.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run returned %v, want nil", err)
				}
			case <-time.After(20 * time.Second):
				t.Errorf("Run did not return after its context ended")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

func TestRunKeepsRulesInPlace(t *testing.T) {
	f := withForeignRules()
	k := newTestKeeper(t, f, true, time.Millisecond)
	stop := startRun(t, k)
	eventually(t, "the first install", func() bool { return k.Restores() >= 2 })
	f.edit("nat", ChainMasquerade, func(r [][]string) [][]string { return r[:2] })
	eventually(t, "the masquerade chain to be restored", func() bool { return f.dump() == goldenMasq })
	f.edit("filter", "FORWARD", func(r [][]string) [][]string { return r[1:] })
	eventually(t, "the forward jump to be restored", func() bool { return f.dump() == goldenMasq })
	stop()
	if got := k.Restores(); got != 4 {
		t.Errorf("Restores() = %d, want 4", got)
	}
}

func TestRunAppliesNewLeaseAtOnce(t *testing.T) {
	f := withForeignRules()
	k := newTestKeeper(t, f, true, time.Hour) // only the wake-up can apply the lease
	startRun(t, k)
	eventually(t, "the first install", func() bool { return k.Restores() == 2 })
	if err := k.SetLease(netip.MustParsePrefix("10.5.77.0/24")); err != nil {
		t.Fatalf("SetLease: %v", err)
	}
	want := strings.Replace(goldenMasq, "-d 10.5.34.0/24", "-d 10.5.77.0/24", 1)
	eventually(t, "the new lease in the rules", func() bool { return f.dump() == want })
}

func TestRunLogsErrorsAndRetries(t *testing.T) {
	f := withForeignRules()
	f.setFail("clear", errFake)
	var (
		mu     sync.Mutex
		logged []string
	)
	log := funcr.New(func(prefix, args string) {
		if strings.Contains(args, `"error"`) {
			mu.Lock()
			logged = append(logged, args)
			mu.Unlock()
		}
	}, funcr.Options{})
	k, err := New(Options{Network: testNetwork, Lease: testLease, IPMasq: true, ResyncInterval: time.Millisecond, Logger: log, ipt: f})
	if err != nil {
		t.Fatal(err)
	}
	stop := startRun(t, k)
	eventually(t, "two logged failures", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(logged) >= 2
	})
	mu.Lock()
	if !strings.Contains(logged[0], "restoring iptables table filter (FLANNEL-FWD)") {
		t.Errorf("logged error %s does not name the chain", logged[0])
	}
	mu.Unlock()
	f.setFail("clear", nil)
	eventually(t, "the rules after the fault is gone", func() bool { return f.dump() == goldenMasq })
	stop()
}

// TestCleanupInRun: with CleanupInRun the first Ensure only installs the
// rules (what a node waits for before it is ready); Run then removes an
// earlier run's leftovers (here the IPv6 chains of a dual-stack run) at
// once, without waiting for its interval.
func TestCleanupInRun(t *testing.T) {
	f4, f6 := withForeignRules(), newFakeIPT()
	v6net, v6lease := netip.MustParsePrefix("fc00::/48"), netip.MustParsePrefix("fc00:0:0:22::/64")
	dual, err := New(Options{Network: testNetwork, Lease: testLease, IPv6Network: v6net, IPv6Lease: v6lease, Logger: testLogger(t), ipt: f4, ip6t: f6})
	if err != nil {
		t.Fatal(err)
	}
	ensure(t, dual)
	if !strings.Contains(f6.dump(), ChainForward) {
		t.Fatalf("the dual-stack run left no IPv6 chain:\n%s", f6.dump())
	}
	k, err := New(Options{Network: testNetwork, Lease: testLease, ResyncInterval: time.Hour, CleanupInRun: true, Logger: testLogger(t), ipt: f4, ip6t: f6})
	if err != nil {
		t.Fatal(err)
	}
	f6.takeWrites()
	ensure(t, k)
	if w := f6.takeWrites(); len(w) != 0 || !strings.Contains(f6.dump(), ChainForward) {
		t.Fatalf("the first Ensure touched the IPv6 leftovers: %q", w)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- k.Run(ctx) }()
	deadline := time.Now().Add(10 * time.Second)
	for strings.Contains(f6.dump(), ChainForward) {
		if time.Now().After(deadline) {
			t.Fatalf("Run did not remove the IPv6 leftovers:\n%s", f6.dump())
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run = %v", err)
	}
}
