package network

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/flanneld-go/flanneld/internal/nstest"
)

// The expected kernel listings (iptables -S) of our chains and jumps.
var (
	wantForward = []string{
		`-P FORWARD ACCEPT`,
		`-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD`,
		`-A FORWARD -i lo -j ACCEPT`,
	}
	wantFlannelFwd = []string{
		`-N FLANNEL-FWD`,
		`-A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment "flanneld forward from network" -j ACCEPT`,
		`-A FLANNEL-FWD -d 10.5.0.0/16 -m comment --comment "flanneld forward to network" -j ACCEPT`,
	}
	wantPostrouting = []string{
		`-P POSTROUTING ACCEPT`,
		`-A POSTROUTING -m comment --comment "flanneld masquerade" -j FLANNEL-POSTRTG`,
		`-A POSTROUTING -o lo -j RETURN`,
	}
	wantPostroutingNoMasq = []string{
		`-P POSTROUTING ACCEPT`,
		`-A POSTROUTING -o lo -j RETURN`,
	}
	wantFlannelPostrtg = []string{
		`-N FLANNEL-POSTRTG`,
		`-A FLANNEL-POSTRTG -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld no masq within network" -j RETURN`,
		`-A FLANNEL-POSTRTG -s 10.5.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq leaving network" -j MASQUERADE`,
		`-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.34.0/24 -m comment --comment "flanneld no masq to own subnet" -j RETURN`,
		`-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld masq entering network" -j MASQUERADE`,
	}
	// Rules of other software, added before the Keeper starts.
	foreignRules = [][]string{
		{"-A", "FORWARD", "-i", "lo", "-j", "ACCEPT"},
		{"-N", "OTHER"},
		{"-A", "OTHER", "-s", "192.0.2.0/24", "-j", "DROP"},
		{"-t", "nat", "-A", "POSTROUTING", "-o", "lo", "-j", "RETURN"},
		{"-t", "nat", "-N", "OTHER-NAT"},
		{"-t", "nat", "-A", "OTHER-NAT", "-d", "198.51.100.0/24", "-j", "RETURN"},
	}
	wantOther    = []string{`-N OTHER`, `-A OTHER -s 192.0.2.0/24 -j DROP`}
	wantOtherNAT = []string{`-N OTHER-NAT`, `-A OTHER-NAT -d 198.51.100.0/24 -j RETURN`}
)

// TestKeeperInNetns runs the Keeper against the kernel, with the real
// iptables binary run inside a network namespace created for the test.
func TestKeeperInNetns(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root to create a network namespace and run iptables in it")
	}
	nsenter, err := exec.LookPath("nsenter")
	if err != nil {
		t.Skip("skipping: nsenter (util-linux) not found; it runs iptables inside the test's namespace")
	}
	if _, err := exec.LookPath("iptables"); err != nil {
		t.Skip("skipping: iptables binary not found; install it with `apt-get install -y iptables`")
	}
	// The default binary is what the daemon uses; also cover the other
	// back-end when it is installed.
	variants := []string{"iptables"}
	out, err := exec.Command("iptables", "--version").Output() // prints the version only
	if err != nil {
		t.Fatalf("iptables --version: %v", err)
	}
	for _, v := range []struct{ bin, mode string }{{"iptables-nft", "nf_tables"}, {"iptables-legacy", "legacy"}} {
		defaultMode := strings.Contains(string(out), "nf_tables") == (v.mode == "nf_tables")
		if _, err := exec.LookPath(v.bin); err == nil && !defaultMode {
			variants = append(variants, v.bin)
		}
	}
	for _, bin := range variants {
		t.Run(bin, func(t *testing.T) {
			path, err := exec.LookPath(bin)
			if err != nil {
				t.Fatal(err)
			}
			testKeeperInNetns(t, nsenter, path)
		})
	}
}

// nsIPTables runs iptables inside one namespace only: every call goes
// through a wrapper that enters the namespace first, so it fails instead of
// reaching the host's tables if the namespace is gone. The Keeper's
// iptables-save and iptables-restore (of the same back-end) go through
// wrappers too.
type nsIPTables struct {
	t       testing.TB
	wrapper string
	keeper  *execIPTables
}

func newNSIPTables(t testing.TB, nsenter, nsPath, bin string) *nsIPTables {
	dir := t.TempDir()
	wrap := func(name, bin string) string {
		t.Helper()
		path, err := exec.LookPath(bin)
		if err != nil {
			t.Fatalf("%s not found beside %s: %v", bin, name, err)
		}
		wrapper := filepath.Join(dir, name+"-in-netns")
		script := fmt.Sprintf("#!/bin/sh\nexec %s --net=%s -- %s \"$@\"\n", nsenter, nsPath, path)
		if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
		return wrapper
	}
	return &nsIPTables{
		t:       t,
		wrapper: wrap("iptables", bin),
		keeper:  &execIPTables{save: wrap("iptables-save", bin+"-save"), restore: wrap("iptables-restore", bin+"-restore")},
	}
}

// run runs iptables with args in the namespace and returns its output lines.
func (n *nsIPTables) run(args ...string) []string {
	n.t.Helper()
	cmd := exec.Command(n.wrapper, append(args, "-w")...)
	out, err := cmd.Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		n.t.Fatalf("iptables %q in namespace: %v: %s", args, err, stderr)
	}
	return strings.Split(strings.TrimSuffix(string(out), "\n"), "\n")
}

// chains returns the user chains of a table.
func (n *nsIPTables) chains(table string) []string {
	n.t.Helper()
	var out []string
	for _, l := range n.run("-t", table, "-S") {
		if name, ok := strings.CutPrefix(l, "-N "); ok {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}

func (n *nsIPTables) checkChain(table, chain string, want []string) {
	n.t.Helper()
	if got := n.run("-t", table, "-S", chain); !slices.Equal(got, want) {
		n.t.Errorf("iptables -t %s -S %s:\n%s\nwant:\n%s", table, chain, lines(got), lines(want))
	}
}

// checkAll checks the whole state of both tables.
func (n *nsIPTables) checkAll(ipMasq bool) {
	n.t.Helper()
	n.checkChain("filter", "FORWARD", wantForward)
	n.checkChain("filter", ChainForward, wantFlannelFwd)
	n.checkChain("filter", "OTHER", wantOther)
	n.checkChain("nat", "OTHER-NAT", wantOtherNAT)
	if got, want := n.chains("filter"), []string{"FLANNEL-FWD", "OTHER"}; !slices.Equal(got, want) {
		n.t.Errorf("filter chains = %q, want %q", got, want)
	}
	wantNAT := []string{"OTHER-NAT"}
	if ipMasq {
		n.checkChain("nat", "POSTROUTING", wantPostrouting)
		n.checkChain("nat", ChainMasquerade, wantFlannelPostrtg)
		wantNAT = []string{"FLANNEL-POSTRTG", "OTHER-NAT"}
	} else {
		n.checkChain("nat", "POSTROUTING", wantPostroutingNoMasq)
	}
	if got := n.chains("nat"); !slices.Equal(got, wantNAT) {
		n.t.Errorf("nat chains = %q, want %q", got, wantNAT)
	}
}

func (n *nsIPTables) snapshot() string {
	return strings.Join(n.run("-t", "filter", "-S"), "\n") + "\n" + strings.Join(n.run("-t", "nat", "-S"), "\n")
}

func testKeeperInNetns(t *testing.T, nsenter, bin string) {
	nsPath := nstest.New(t, "flanneld-ipt").Path
	n := newNSIPTables(t, nsenter, nsPath, bin)

	// A fresh namespace has no rules and no chains of its own.
	if out, err := exec.Command(n.wrapper, "-w", "-t", "nat", "-S").CombinedOutput(); err != nil {
		if strings.HasSuffix(bin, "-legacy") {
			t.Skipf("skipping: %s cannot reach the kernel's legacy tables here (%v: %s)", bin, err, out)
		}
		t.Fatalf("listing nat in the new namespace: %v: %s", err, out)
	}
	for _, table := range []string{"filter", "nat"} {
		for _, l := range n.run("-t", table, "-S") {
			if !strings.HasPrefix(l, "-P ") {
				t.Fatalf("new namespace is not empty: table %s has %q", table, l)
			}
		}
	}
	for _, r := range foreignRules {
		n.run(r...)
	}

	newKeeper := func(ipMasq bool, interval time.Duration) *Keeper {
		k, err := New(Options{Network: testNetwork, Lease: testLease, IPMasq: ipMasq, ResyncInterval: interval, Logger: testLogger(t), ipt: n.keeper})
		if err != nil {
			t.Fatalf("New: %v", err)
		}
		return k
	}
	checkRestores := func(k *Keeper, want uint64) {
		t.Helper()
		if got := k.Restores(); got != want {
			t.Errorf("Restores() = %d, want %d", got, want)
		}
	}

	// Install.
	k := newKeeper(true, time.Hour)
	ensure(t, k)
	n.checkAll(true)
	checkRestores(k, 2)

	// Idempotent.
	before := n.snapshot()
	ensure(t, k)
	if after := n.snapshot(); after != before {
		t.Errorf("second Ensure changed the tables:\n%s\nbefore:\n%s", after, before)
	}
	checkRestores(k, 2)

	// A new Keeper (a restarted daemon) recognises the rules as printed by
	// iptables and leaves them alone.
	fresh := newKeeper(true, time.Hour)
	ensure(t, fresh)
	checkRestores(fresh, 0)
	if after := n.snapshot(); after != before {
		t.Errorf("Ensure of a new Keeper changed the tables:\n%s\nbefore:\n%s", after, before)
	}

	// A rule deleted by hand: the whole chain is restored in order.
	n.run("-t", "nat", "-D", ChainMasquerade, "3")
	ensure(t, k)
	n.checkChain("nat", ChainMasquerade, wantFlannelPostrtg)
	checkRestores(k, 3)

	// A rule moved to the end.
	n.run("-t", "nat", "-D", ChainMasquerade, "1")
	n.run("-t", "nat", "-A", ChainMasquerade, "-s", "10.5.0.0/16", "-d", "10.5.0.0/16", "-m", "comment", "--comment", "flanneld no masq within network", "-j", "RETURN")
	ensure(t, k)
	n.checkChain("nat", ChainMasquerade, wantFlannelPostrtg)
	checkRestores(k, 4)

	// The jump deleted: inserted again at position 1.
	n.run("-D", "FORWARD", "-m", "comment", "--comment", "flanneld forward", "-j", ChainForward)
	ensure(t, k)
	n.checkAll(true)
	checkRestores(k, 5)

	// Chain and jump gone altogether.
	n.run("-t", "nat", "-D", "POSTROUTING", "1")
	n.run("-t", "nat", "-F", ChainMasquerade)
	n.run("-t", "nat", "-X", ChainMasquerade)
	ensure(t, k)
	n.checkAll(true)
	checkRestores(k, 6)

	// ip-masq off: our masquerade chain and jump go, everything else stays.
	off := newKeeper(false, time.Hour)
	ensure(t, off)
	n.checkAll(false)
	checkRestores(off, 1)
	before = n.snapshot()
	ensure(t, off)
	if after := n.snapshot(); after != before {
		t.Errorf("second Ensure with ip-masq off changed the tables:\n%s\nbefore:\n%s", after, before)
	}

	// ip-masq on again.
	on := newKeeper(true, time.Hour)
	ensure(t, on)
	n.checkAll(true)
	checkRestores(on, 1)

	// A new lease.
	if err := on.SetLease(netip.MustParsePrefix("10.5.77.0/24")); err != nil {
		t.Fatal(err)
	}
	ensure(t, on)
	want := slices.Clone(wantFlannelPostrtg)
	want[3] = strings.Replace(want[3], "10.5.34.0/24", "10.5.77.0/24", 1)
	n.checkChain("nat", ChainMasquerade, want)
	if err := on.SetLease(testLease); err != nil {
		t.Fatal(err)
	}
	ensure(t, on)
	n.checkAll(true)

	// Run puts back what is deleted while it runs.
	runner := newKeeper(true, 10*time.Millisecond)
	stop := startRun(t, runner)
	n.run("-D", ChainForward, "2")
	deadline := time.Now().Add(30 * time.Second)
	for !slices.Equal(n.run("-S", ChainForward), wantFlannelFwd) {
		if time.Now().After(deadline) {
			t.Fatalf("Run did not restore %s: %q", ChainForward, n.run("-S", ChainForward))
		}
		time.Sleep(10 * time.Millisecond)
	}
	stop()
	n.checkAll(true)
	if runner.Restores() < 1 {
		t.Errorf("Run restored the chain but Restores() = 0")
	}
}
