package network

import (
	"slices"
	"strings"
	"testing"
	"time"
)

// TestForwardRulesOffInNetns (--iptables-forward-rules=false), in iptables
// and nftables mode against the kernel: no forward chain or jump, and the
// ones an earlier run (forward rules on) left are removed when switching;
// the masquerade rules stay.
func TestForwardRulesOffInNetns(t *testing.T) {
	n := newNSTools(t, "flanneld-fwd")
	opts := func(nftables, noForward bool) Options {
		o := n.options(nftables, time.Hour)
		o.NoForwardRules = noForward
		return o
	}
	keeper := func(o Options) *Keeper {
		t.Helper()
		k, err := New(o)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	noForward := func(ipt *nsIPTables) {
		t.Helper()
		if got := ipt.run("-t", "filter", "-S"); slices.ContainsFunc(got, func(l string) bool { return strings.Contains(l, ChainForward) }) {
			t.Errorf("%s filter still holds our forward chain or jump:\n%s", ipt.wrapper, lines(got))
		}
	}

	ensure(t, keeper(opts(false, false)))
	n.ipt.checkChain("filter", ChainForward, wantFlannelFwd)
	off := keeper(opts(false, true))
	ensure(t, off)
	noForward(n.ipt)
	noForward(n.ip6t)
	n.ipt.checkChain("nat", ChainMasquerade, wantFlannelPostrtg)
	n.ip6t.checkChain("nat", ChainMasquerade, wantFlannelPostrtg6)
	if got := off.Restores(); got != 2 {
		t.Errorf("switching forward rules off: Restores() = %d, want 2 (one removal per family)", got)
	}
	// In place: nothing more to do.
	ensure(t, off)
	if got := off.Restores(); got != 2 {
		t.Errorf("second Ensure: Restores() = %d, want still 2", got)
	}

	// nftables: no forward chain in either table.
	ensure(t, keeper(opts(true, false)))
	if got := n.ruleset(NFTTableIPv4, NFTTableIPv6); !slices.Equal(got, wantNFT) {
		t.Fatalf("nftables with forward rules:\n%s", lines(got))
	}
	ensure(t, keeper(opts(true, true)))
	var want []string
	for _, l := range wantNFT {
		if !strings.Contains(l, " forward") {
			want = append(want, l)
		}
	}
	if got := n.ruleset(NFTTableIPv4, NFTTableIPv6); !slices.Equal(got, want) {
		t.Errorf("nftables without forward rules:\n%s\nwant:\n%s", lines(got), lines(want))
	}
}

// TestRandomFullyInNetns: with MasqRandomFully the two MASQUERADE rules
// carry --random-fully as iptables lists them (nftables: masquerade
// fully-random), the rules are recognised as in place afterwards, and
// switching it off puts the plain rules back.
func TestRandomFullyInNetns(t *testing.T) {
	n := newNSTools(t, "flanneld-rnd")
	keeper := func(nftables, fully bool) *Keeper {
		t.Helper()
		o := n.options(nftables, time.Hour)
		o.MasqRandomFully = fully
		k, err := New(o)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	if has, err := n.ipt.keeper.RandomFully(t.Context()); err != nil || !has {
		t.Skipf("skipping: this iptables has no --random-fully (%v)", err)
	}
	want := slices.Clone(wantFlannelPostrtg)
	for i, l := range want {
		if strings.HasSuffix(l, "-j MASQUERADE") {
			want[i] = l + " --random-fully"
		}
	}
	k := keeper(false, true)
	ensure(t, k)
	n.ipt.checkChain("nat", ChainMasquerade, want)
	restores := k.Restores()
	fresh := keeper(false, true)
	ensure(t, fresh)
	if fresh.Restores() != 0 {
		t.Errorf("a restarted keeper rewrote rules in place (Restores %d)", fresh.Restores())
	}
	ensure(t, k)
	if k.Restores() != restores {
		t.Errorf("second Ensure restored again")
	}
	ensure(t, keeper(false, false))
	n.ipt.checkChain("nat", ChainMasquerade, wantFlannelPostrtg)

	ensure(t, keeper(true, true))
	out := string(n.nft("list", "table", "ip", NFTTableIPv4))
	if c := strings.Count(out, "masquerade fully-random"); c != 2 {
		t.Errorf("nftables: %d fully-random masquerade statements, want 2:\n%s", c, out)
	}
	ensure(t, keeper(true, false))
	out = string(n.nft("list", "table", "ip", NFTTableIPv4))
	if strings.Contains(out, "fully-random") || strings.Count(out, "masquerade") != 2 {
		t.Errorf("nftables after switching fully-random off:\n%s", out)
	}
}

func TestVersionAtLeast(t *testing.T) {
	for _, tc := range []struct {
		s    string
		want bool
		err  bool
	}{
		{"iptables-save v1.8.9 (nf_tables)\n", true, false},
		{"iptables v1.6.2", true, false},
		{"iptables v1.6.1", false, false},
		{"iptables v1.4.21", false, false},
		{"ip6tables-save v2.0.0 (legacy)", true, false},
		{"no version here", false, true},
	} {
		got, err := versionAtLeast(tc.s, 1, 6, 2)
		if got != tc.want || (err != nil) != tc.err {
			t.Errorf("versionAtLeast(%q) = %v, %v; want %v, error %v", tc.s, got, err, tc.want, tc.err)
		}
	}
}
