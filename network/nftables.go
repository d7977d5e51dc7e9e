package network

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sync/atomic"

	"k8s.io/klog/v2"
	"sigs.k8s.io/knftables"

	"github.com/flanneld-go/flanneld/internal/metrics"
)

// The nftables tables of flanneld (flannel v0.25+'s names). Each belongs
// wholly to flanneld: anything found in it that is not ours is removed.
const (
	NFTTableIPv4 = "flannel-ipv4" // family ip
	NFTTableIPv6 = "flannel-ipv6" // family ip6

	// NFTChainForward accepts forwarded traffic of the network; a base
	// chain on the forward hook.
	NFTChainForward = "forward"
	// NFTChainMasquerade holds the masquerade rules; a nat base chain on
	// the postrouting hook.
	NFTChainMasquerade = "postrtg"
)

// nftTable returns the family and name of the table for a network.
func nftTable(ipv6 bool) (knftables.Family, string) {
	if ipv6 {
		return knftables.IPv6Family, NFTTableIPv6
	}
	return knftables.IPv4Family, NFTTableIPv4
}

// NFTRule is one rule of an nftables chain: Rule in nft syntax, and the
// comment that names it. The comment carries the prefixes the rule matches,
// so the comments of a chain identify its rules (see nftKeeper.drift).
type NFTRule struct {
	Rule    string
	Comment string
}

// NFTChain is one base chain of flanneld's table with its rules in order.
type NFTChain struct {
	Name     string
	Type     knftables.BaseChainType
	Hook     knftables.BaseChainHook
	Priority knftables.BaseChainPriority
	Rules    []NFTRule
}

// NFTRules returns the chains flanneld keeps in its nftables table for the
// flannel network and this node's lease subnet (both IPv4 for "ip
// flannel-ipv4", both IPv6 for "ip6 flannel-ipv6"): the forward chain, then,
// when ipMasq is set, the masquerade chain. The rules are those of Rules, in
// the same order. Prefixes are masked to their network address.
func NFTRules(network, lease netip.Prefix, ipMasq bool) []NFTChain {
	return NFTRuleSet(network, lease, Set{IPMasq: ipMasq})
}

// NFTRuleSet returns the chains of set s: without the forward chain with
// s.NoForward; with s.RandomFully the masquerade statements are
// "masquerade fully-random" and their comments say so, so that a switch
// is seen by the comments the keeper compares.
func NFTRuleSet(network, lease netip.Prefix, set Set) []NFTChain {
	ip := "ip"
	if network.Addr().Is6() {
		ip = "ip6"
	}
	n := network.Masked().String()
	s := lease.Masked().String()
	var chains []NFTChain
	if !set.NoForward {
		chains = append(chains, NFTChain{
			Name: NFTChainForward, Type: knftables.FilterType, Hook: knftables.ForwardHook, Priority: knftables.FilterPriority,
			Rules: []NFTRule{
				{ip + " saddr " + n + " accept", "flanneld forward from " + n},
				{ip + " daddr " + n + " accept", "flanneld forward to " + n},
			},
		})
	}
	masq, fully := "masquerade", ""
	if set.RandomFully {
		masq, fully = "masquerade fully-random", " fully-random"
	}
	if set.IPMasq {
		chains = append(chains, NFTChain{
			Name: NFTChainMasquerade, Type: knftables.NATType, Hook: knftables.PostroutingHook, Priority: knftables.SNATPriority,
			Rules: []NFTRule{
				{ip + " saddr " + n + " " + ip + " daddr " + n + " return", "flanneld no masq within " + n},
				{ip + " saddr " + n + " " + ip + " daddr != " + multicast(network) + " " + masq, "flanneld masq leaving " + n + fully},
				{ip + " saddr != " + n + " " + ip + " daddr " + s + " return", "flanneld no masq to own subnet " + s},
				{ip + " saddr != " + n + " " + ip + " daddr " + n + " " + masq, "flanneld masq entering " + n + fully},
			},
		})
	}
	return chains
}

// nftKeeper keeps the table of one family in place. Its caller, the Keeper,
// serialises its calls.
//
// A check is one `nft --json --terse list table`, which yields each rule's
// chain, comment and handle. The table is in place when its chains hold
// exactly the comments of NFTRules in order, and, if this keeper wrote the
// table, still the rules (handles) it wrote. Otherwise one transaction
// deletes the table and declares it again with all its chains and rules, so
// traffic never meets a half-filled table and anything else found in it goes.
// (A chain without rules added by hand is not seen by the listing and
// stays until the next rebuild.)
type nftKeeper struct {
	connect  func() (knftables.Interface, error)
	nft      knftables.Interface // bound to the family and table; nil until connected
	family   knftables.Family
	table    string
	log      klog.Logger
	network  netip.Prefix
	set      Set
	restores *atomic.Uint64 // the Keeper's count

	written string           // key of the chains our last transaction wrote
	handles map[string][]int // their rules' handles read back, by chain
}

func newNFTKeeper(connect func() (knftables.Interface, error), ipv6 bool, log klog.Logger, network netip.Prefix, set Set, restores *atomic.Uint64) *nftKeeper {
	family, table := nftTable(ipv6)
	return &nftKeeper{connect: connect, family: family, table: table, log: log, network: network, set: set, restores: restores}
}

func (n *nftKeeper) name() string { return string(n.family) + " " + n.table }

// ensure makes the table match NFTRules for lease.
func (n *nftKeeper) ensure(ctx context.Context, lease netip.Prefix) error {
	if n.nft == nil {
		nft, err := n.connect()
		if err != nil {
			return fmt.Errorf("setting up nftables for table %s: %w; install the nftables package (nft 1.0.1 or later) or turn EnableNFTables off", n.name(), err)
		}
		n.nft = nft
	}
	want := NFTRuleSet(n.network, lease, n.set)
	listed, err := n.list(ctx)
	if err != nil {
		return err
	}
	reason := n.drift(listed, want)
	if reason == "" {
		return nil
	}
	tx := n.nft.NewTransaction()
	// Adding first makes the delete succeed whether or not the table exists.
	tx.Add(&knftables.Table{})
	tx.Delete(&knftables.Table{})
	tx.Add(&knftables.Table{Comment: knftables.PtrTo("rules of flanneld")})
	for _, c := range want {
		tx.Add(&knftables.Chain{Name: c.Name, Type: knftables.PtrTo(c.Type), Hook: knftables.PtrTo(c.Hook), Priority: knftables.PtrTo(c.Priority)})
		for _, r := range c.Rules {
			tx.Add(&knftables.Rule{Chain: c.Name, Rule: r.Rule, Comment: knftables.PtrTo(r.Comment)})
		}
	}
	n.written, n.handles = "", nil
	if err := n.run(ctx, tx); err != nil {
		return fmt.Errorf("writing nftables table %s: %w", n.name(), err)
	}
	// Remember the handles of what we wrote; a failed read only loses the
	// check that the rules are still the ones written.
	if listed, err := n.list(ctx); err == nil && listed != nil && commentsMatch(listed, want) {
		n.written, n.handles = chainsKey(want), listed.handles
	}
	n.log.Info("Restored nftables table", "table", n.name(), "reason", reason, "chains", len(want))
	n.restores.Add(1)
	metrics.IPTablesRestores.Inc()
	return nil
}

// run applies one transaction. Once started it is not cut short by ctx (see
// iptKeeper.restore).
func (n *nftKeeper) run(ctx context.Context, tx *knftables.Transaction) error {
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), restoreTimeout)
	defer cancel()
	return n.nft.Run(rctx, tx)
}

// nftListing is a table's rules as listed: comments and handles by chain.
type nftListing struct {
	chains   []string // in listing order
	comments map[string][]string
	handles  map[string][]int
}

// list reads the table's rules; a missing table is a nil listing.
func (n *nftKeeper) list(ctx context.Context) (*nftListing, error) {
	rules, err := n.nft.ListRules(ctx, "")
	if knftables.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading nftables table %s: %w", n.name(), err)
	}
	l := &nftListing{comments: map[string][]string{}, handles: map[string][]int{}}
	for _, r := range rules {
		if _, ok := l.comments[r.Chain]; !ok {
			l.chains = append(l.chains, r.Chain)
		}
		comment, handle := "", -1
		if r.Comment != nil {
			comment = *r.Comment
		}
		if r.Handle != nil {
			handle = *r.Handle
		}
		l.comments[r.Chain] = append(l.comments[r.Chain], comment)
		l.handles[r.Chain] = append(l.handles[r.Chain], handle)
	}
	return l, nil
}

// drift returns why the table must be written, or "" if it is in place.
func (n *nftKeeper) drift(l *nftListing, want []NFTChain) string {
	if l == nil {
		return "table missing"
	}
	for _, c := range want {
		if _, ok := l.comments[c.Name]; !ok {
			return "chain " + c.Name + " missing"
		}
	}
	for _, name := range l.chains {
		if !slices.ContainsFunc(want, func(c NFTChain) bool { return c.Name == name }) {
			return "extra chain " + name
		}
	}
	if !commentsMatch(l, want) {
		return "rules missing, extra or out of order"
	}
	if n.written == chainsKey(want) {
		for name, h := range n.handles {
			if !slices.Equal(l.handles[name], h) {
				return "rules replaced in chain " + name
			}
		}
	}
	return ""
}

// commentsMatch reports whether each wanted chain holds exactly the
// comments of its rules, in order.
func commentsMatch(l *nftListing, want []NFTChain) bool {
	for _, c := range want {
		got := l.comments[c.Name]
		if len(got) != len(c.Rules) {
			return false
		}
		for i, r := range c.Rules {
			if got[i] != r.Comment {
				return false
			}
		}
	}
	return true
}

// chainsKey identifies a set of chains.
func chainsKey(chains []NFTChain) string { return fmt.Sprintf("%q", chains) }

// removeNFTTable deletes the table if it exists: the rules of an earlier run
// in iptables mode, or for a family no longer configured. It reports
// whether there was one.
func removeNFTTable(ctx context.Context, nft knftables.Interface, family knftables.Family, table string) (bool, error) {
	name := string(family) + " " + table
	if _, err := nft.List(ctx, "chains"); knftables.IsNotFound(err) {
		return false, nil
	} else if err != nil {
		return false, fmt.Errorf("reading nftables table %s: %w", name, err)
	}
	tx := nft.NewTransaction()
	tx.Delete(&knftables.Table{})
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), restoreTimeout)
	defer cancel()
	if err := nft.Run(rctx, tx); err != nil && !knftables.IsNotFound(err) {
		return false, fmt.Errorf("deleting nftables table %s: %w", name, err)
	}
	return true, nil
}
