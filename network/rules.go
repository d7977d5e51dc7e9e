// Package network keeps flanneld's forward and masquerade rules in place, for
// IPv4 and IPv6, with iptables/ip6tables or with nftables.
//
// In iptables mode the rules of each family live in two chains that belong
// wholly to flanneld, each reached by one jump from a built-in chain (the
// same names in iptables and ip6tables):
//
//	filter FORWARD     -j FLANNEL-FWD      (unless --iptables-forward-rules=false)
//	nat    POSTROUTING -j FLANNEL-POSTRTG  (only with --ip-masq)
//
// Rules returns the desired rules as data; a Keeper installs them and puts
// them back whenever a check finds any of them missing or out of order. A
// check is one iptables-save; a repair is one iptables-restore --noflush that
// declares a drifted chain again (emptying it) and refills it in the same
// transaction, so traffic never meets a half-filled chain.
// Rules in other chains, and rules other than our jumps in FORWARD and
// POSTROUTING, are never touched. Anything else found inside FLANNEL-FWD or
// FLANNEL-POSTRTG is removed, because those chains are ours.
//
// In nftables mode (see nftables.go) the same rules live in the tables
// "ip flannel-ipv4" and "ip6 flannel-ipv6", which belong wholly to flanneld.
package network

import (
	"net/netip"
	"strconv"
	"strings"
)

// Tables and chains used by flanneld.
const (
	TableFilter = "filter"
	TableNAT    = "nat"

	// ChainForward holds the rules that accept forwarded traffic of the
	// flannel network; filter FORWARD jumps to it.
	ChainForward = "FLANNEL-FWD"
	// ChainMasquerade holds the masquerade rules; nat POSTROUTING jumps to it.
	ChainMasquerade = "FLANNEL-POSTRTG"

	chainFilterForward  = "FORWARD"
	chainNATPostrouting = "POSTROUTING"
)

// Multicast destinations are never masqueraded.
const (
	multicast4 = "224.0.0.0/4"
	multicast6 = "ff00::/8"
)

// multicast returns the multicast range of the network's family.
func multicast(network netip.Prefix) string {
	if network.Addr().Is6() {
		return multicast6
	}
	return multicast4
}

// Rule is one iptables rule: Spec is what follows "-t Table -A Chain".
type Rule struct {
	Table string
	Chain string
	Spec  []string
}

// String renders the rule as an iptables command line (without the program
// name), quoting arguments that contain spaces, e.g.
// `-t filter -A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment "flanneld forward from network" -j ACCEPT`.
func (r Rule) String() string {
	var b strings.Builder
	b.WriteString("-t " + r.Table + " -A " + r.Chain)
	for _, a := range r.Spec {
		b.WriteByte(' ')
		if a == "" || strings.ContainsAny(a, " \t\"'\\") {
			a = strconv.Quote(a)
		}
		b.WriteString(a)
	}
	return b.String()
}

// chainSet is one of our chains with the jump that reaches it.
type chainSet struct {
	table  string
	parent string   // built-in chain holding the jump
	chain  string   // our chain
	jump   []string // rulespec of the jump in parent
	rules  [][]string
}

// Set says which of flanneld's rules a node keeps. The zero value is the
// forward rules only.
type Set struct {
	// NoForward leaves out the forward chain and its jump
	// (--iptables-forward-rules=false).
	NoForward bool
	// IPMasq adds the masquerade chain and its jump (--ip-masq).
	IPMasq bool
	// RandomFully gives the two MASQUERADE rules --random-fully (nftables:
	// masquerade fully-random), as flannel v0.28 does unless
	// --ip-masq-fully-random-disable.
	RandomFully bool
}

// Rules returns the rules flanneld keeps for the flannel network and this
// node's lease subnet (both IPv4 for iptables, both IPv6 for ip6tables): the filter FORWARD jump and the FLANNEL-FWD rules, then,
// when ipMasq is set, the nat POSTROUTING jump and the FLANNEL-POSTRTG rules.
// Each jump comes before the rules of its chain; the rules of a chain are in
// evaluation order. Prefixes are masked to their network address. Masquerade
// does not use --random-fully here (flannel v0.10 semantics); RuleSet says
// which rules, with which options.
func Rules(network, lease netip.Prefix, ipMasq bool) []Rule {
	return RuleSet(network, lease, Set{IPMasq: ipMasq})
}

// RuleSet returns the rules of set s, in the order of Rules.
func RuleSet(network, lease netip.Prefix, s Set) []Rule {
	var sets []chainSet
	if !s.NoForward {
		sets = append(sets, forwardSet(network))
	}
	if s.IPMasq {
		sets = append(sets, masqSet(network, lease, s.RandomFully))
	}
	var out []Rule
	for _, s := range sets {
		out = append(out, Rule{Table: s.table, Chain: s.parent, Spec: s.jump})
		for _, r := range s.rules {
			out = append(out, Rule{Table: s.table, Chain: s.chain, Spec: r})
		}
	}
	return out
}

// comment returns the match that tags a rule as flanneld's.
func comment(text string) []string {
	return []string{"-m", "comment", "--comment", "flanneld " + text}
}

// spec joins the parts of a rulespec into a new slice.
func spec(parts ...[]string) []string {
	var out []string
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func forwardSet(network netip.Prefix) chainSet {
	n := network.Masked().String()
	return chainSet{
		table:  TableFilter,
		parent: chainFilterForward,
		chain:  ChainForward,
		jump:   spec(comment("forward"), []string{"-j", ChainForward}),
		rules: [][]string{
			spec([]string{"-s", n}, comment("forward from network"), []string{"-j", "ACCEPT"}),
			spec([]string{"-d", n}, comment("forward to network"), []string{"-j", "ACCEPT"}),
		},
	}
}

func masqSet(network, lease netip.Prefix, randomFully bool) chainSet {
	n := network.Masked().String()
	s := lease.Masked().String()
	masq := []string{"-j", "MASQUERADE"}
	if randomFully {
		masq = append(masq, "--random-fully")
	}
	return chainSet{
		table:  TableNAT,
		parent: chainNATPostrouting,
		chain:  ChainMasquerade,
		jump:   spec(comment("masquerade"), []string{"-j", ChainMasquerade}),
		rules: [][]string{
			// Traffic within the network keeps its addresses.
			spec([]string{"-s", n, "-d", n}, comment("no masq within network"), []string{"-j", "RETURN"}),
			// Traffic from the network to the outside (not multicast) is masqueraded.
			spec([]string{"-s", n, "!", "-d", multicast(network)}, comment("masq leaving network"), masq),
			// Traffic from outside to our own subnet keeps its addresses.
			spec([]string{"!", "-s", n, "-d", s}, comment("no masq to own subnet"), []string{"-j", "RETURN"}),
			// Traffic from outside (e.g. this host) to other subnets is masqueraded.
			spec([]string{"!", "-s", n, "-d", n}, comment("masq entering network"), masq),
		},
	}
}
