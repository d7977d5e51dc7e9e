package network

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/internal/metrics"
)

// iptablesAPI is how an iptKeeper reads and changes the kernel's rules of
// one family: one dump of every table, and one batch of changes applied
// atomically per table. Tests replace it with a fake; execIPTables runs
// iptables-save and iptables-restore (or their ip6tables twins).
type iptablesAPI interface {
	// Save returns the rules of every table in iptables-save format.
	Save(ctx context.Context) ([]byte, error)
	// Restore applies an iptables-restore script without flushing the
	// tables it names (--noflush), waiting for the xtables lock.
	Restore(ctx context.Context, script []byte) error
}

// iptKeeper keeps the chains of one family (iptables or ip6tables) in
// place. Its caller, the Keeper, serialises its calls.
type iptKeeper struct {
	ipt      iptablesAPI
	prog     string // "iptables" or "ip6tables", for messages
	log      klog.Logger
	network  netip.Prefix
	set      Set
	restores *atomic.Uint64 // the Keeper's count
	// probed is set once the iptables binary was asked whether it has
	// --random-fully (when set.RandomFully asks for it).
	probed bool

	rendered map[string]rendering // by setKey: what our last restore read back
}

func newIPTKeeper(ipt iptablesAPI, ipv6 bool, log klog.Logger, network netip.Prefix, set Set, restores *atomic.Uint64) *iptKeeper {
	prog := "iptables"
	if ipv6 {
		prog = "ip6tables"
	}
	return &iptKeeper{ipt: ipt, prog: prog, log: log, network: network, set: set, restores: restores, rendered: make(map[string]rendering)}
}

// randomFullyProber is an iptablesAPI that can tell whether its iptables
// has MASQUERADE --random-fully (iptables 1.6.2 and later). One that cannot
// tell is taken to have it.
type randomFullyProber interface {
	RandomFully(ctx context.Context) (bool, error)
}

// probeRandomFully turns set.RandomFully off, with one log line, when the
// iptables binary lacks --random-fully, as flannel does. A failed probe is
// tried again at the next ensure.
func (c *iptKeeper) probeRandomFully(ctx context.Context) {
	if c.probed || !c.set.RandomFully || !c.set.IPMasq {
		return
	}
	p, ok := c.ipt.(randomFullyProber)
	if !ok {
		c.probed = true
		return
	}
	has, err := p.RandomFully(ctx)
	if err != nil {
		c.log.V(1).Info("Could not tell whether iptables has --random-fully; asking again at the next check", "program", c.prog, "err", err.Error())
		return
	}
	c.probed = true
	if !has {
		c.set.RandomFully = false
		c.log.Info("This iptables lacks MASQUERADE --random-fully (iptables 1.6.2 or later); masquerading without it", "program", c.prog)
	}
}

// ensure makes the kernel's rules match Rules for lease. It reads every
// table with one iptables-save and, only if something is off, applies the
// changes with one iptables-restore: a chain missing or with any rule
// missing, extra or out of order is declared again (which empties it) and
// refilled in order in the same transaction, so the chain is never seen
// half-filled; a missing jump from FORWARD or POSTROUTING is inserted at
// position 1 (an existing jump stays where it is). With IPMasq off, every
// jump to FLANNEL-POSTRTG is deleted from POSTROUTING and the chain removed.
// If the restore fails, each table is tried again on its own, so that one
// table's failure does not keep the other's rules out; the errors are joined.
func (c *iptKeeper) ensure(ctx context.Context, lease netip.Prefix) error {
	p, err := c.plan(ctx, lease)
	if err != nil {
		return err
	}
	if len(p) == 0 {
		return nil
	}
	return c.apply(ctx, p, func() (plan, error) { return c.plan(ctx, lease) })
}

// apply runs the plan as one restore; if that fails and the plan spans both
// tables, it plans again with replan and applies each table on its own.
func (c *iptKeeper) apply(ctx context.Context, p plan, replan func() (plan, error)) error {
	err := c.restore(ctx, p.script())
	if err == nil {
		c.done(ctx, p)
		return nil
	}
	if len(p) == 1 || ctx.Err() != nil {
		return p[0].wrap(c.prog, err)
	}
	// One table failed; the other may or may not have been committed before
	// it. Look again and apply each table on its own.
	first := p
	if p, err = replan(); err != nil {
		return err
	}
	var errs []error
	var applied plan
	for _, tc := range first {
		if !slices.ContainsFunc(p, func(o *tableChange) bool { return o.table == tc.table }) {
			applied = append(applied, tc) // committed before the failure
		}
	}
	for _, tc := range p {
		if err := c.restore(ctx, plan{tc}.script()); err != nil {
			errs = append(errs, tc.wrap(c.prog, err))
			continue
		}
		applied = append(applied, tc)
	}
	c.done(ctx, applied)
	return errors.Join(errs...)
}

// removeAll deletes both of our chains and every jump to them: the rules of
// an earlier run in the other mode (nftables) or for a family no longer
// configured. It reports whether there was anything to remove.
func (c *iptKeeper) removeAll(ctx context.Context) (bool, error) {
	replan := func() (plan, error) {
		dump, err := c.ipt.Save(ctx)
		if err != nil {
			return nil, fmt.Errorf("reading %s rules: %w", c.prog, err)
		}
		tables := parseSave(dump)
		var p plan
		for _, s := range []struct{ table, parent, chain string }{
			{TableFilter, chainFilterForward, ChainForward},
			{TableNAT, chainNATPostrouting, ChainMasquerade},
		} {
			if tc := planRemove(tables[s.table], s.table, s.parent, s.chain); tc != nil {
				p = append(p, tc)
			}
		}
		return p, nil
	}
	p, err := replan()
	if err != nil || len(p) == 0 {
		return false, err
	}
	return true, c.apply(ctx, p, replan)
}

// restoreTimeout bounds one iptables-restore, which waits for the xtables
// lock, or one nft transaction.
const restoreTimeout = time.Minute

// restore runs one iptables-restore. Once started it is not cut short by
// ctx: killing it after its COMMIT would leave rules applied but reported
// as failed (and uncounted). It is bounded by restoreTimeout instead.
func (c *iptKeeper) restore(ctx context.Context, script []byte) error {
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), restoreTimeout)
	defer cancel()
	return c.ipt.Restore(rctx, script)
}

// plan is the changes one ensure makes, per table, in script order.
type plan []*tableChange

// tableChange is what must change in one table: one of our chain sets put
// back in place, or one of our chains removed.
type tableChange struct {
	table   string
	lines   []string  // iptables-restore lines, without *table and COMMIT
	set     *chainSet // the set put in place; nil for a removal
	refill  string    // why the chain is declared again and refilled ("" if not)
	jump    bool      // the jump to the chain is inserted
	removed string    // the chain removed with the jumps to it ("" if none)
}

func (tc *tableChange) wrap(prog string, err error) error {
	what := tc.removed + " removal"
	if tc.set != nil {
		what = tc.set.chain
	}
	return fmt.Errorf("restoring %s table %s (%s): %w", prog, tc.table, what, err)
}

// script renders the plan as one iptables-restore input.
func (p plan) script() []byte {
	var b strings.Builder
	for _, tc := range p {
		b.WriteString("*" + tc.table + "\n")
		for _, l := range tc.lines {
			b.WriteString(l + "\n")
		}
		b.WriteString("COMMIT\n")
	}
	return []byte(b.String())
}

// plan reads the tables and works out what must change.
func (c *iptKeeper) plan(ctx context.Context, lease netip.Prefix) (plan, error) {
	dump, err := c.ipt.Save(ctx)
	if err != nil {
		return nil, fmt.Errorf("reading %s rules: %w", c.prog, err)
	}
	tables := parseSave(dump)
	c.probeRandomFully(ctx)

	var p plan
	if !c.set.NoForward {
		if tc := c.planSet(tables, forwardSet(c.network)); tc != nil {
			p = append(p, tc)
		}
	} else if tc := planRemove(tables[TableFilter], TableFilter, chainFilterForward, ChainForward); tc != nil {
		p = append(p, tc)
	}
	if c.set.IPMasq {
		if tc := c.planSet(tables, masqSet(c.network, lease, c.set.RandomFully)); tc != nil {
			p = append(p, tc)
		}
	} else if tc := planRemove(tables[TableNAT], TableNAT, chainNATPostrouting, ChainMasquerade); tc != nil {
		p = append(p, tc)
	}
	return p, nil
}

// planSet returns the changes that put one chain and its jump in place, or
// nil if they are in place.
func (c *iptKeeper) planSet(tables map[string]*savedTable, s chainSet) *tableChange {
	t := tables[s.table]
	if t == nil {
		t = &savedTable{}
	}
	tc := &tableChange{table: s.table, set: &s}
	if reason := c.chainDrift(t, s); reason != "" {
		tc.lines = append(tc.lines, ":"+s.chain+" - [0:0]")
		for _, r := range s.rules {
			tc.lines = append(tc.lines, ruleLine("-A", s.chain, r))
		}
		tc.refill = reason
	}
	if !hasRule(t.rules[s.parent], s.parent, s.jump) {
		tc.lines = append(tc.lines, ruleLine("-I", s.parent, append([]string{"1"}, s.jump...)))
		tc.jump = true
	}
	if len(tc.lines) == 0 {
		return nil
	}
	return tc
}

// chainDrift returns why the chain must be restored, or "" if it is in place.
func (c *iptKeeper) chainDrift(t *savedTable, s chainSet) string {
	if !t.chains[s.chain] {
		return "chain missing"
	}
	listing := t.rules[s.chain]
	if chainMatches(listing, s.chain, s.rules) {
		return ""
	}
	// An iptables version that prints rules differently from how we write
	// them would otherwise cause a restore at every check: accept exactly
	// what it printed after our last restore of these same rules.
	if r, ok := c.rendered[setKey(s)]; ok && r.rules == rulesKey(s.rules) && slices.Equal(r.listing, listing) {
		return ""
	}
	return "rules missing, extra or out of order"
}

// hasRule reports whether a chain's "-A" lines hold rulespec.
func hasRule(lines []string, chain string, rulespec []string) bool {
	for _, l := range lines {
		if s, ok := appendedSpec(l, chain); ok && slices.Equal(s, rulespec) {
			return true
		}
	}
	return false
}

// planRemove returns the changes that delete every jump from parent to
// chain (whatever its comment) and then the chain, or nil if there is none
// of either.
func planRemove(t *savedTable, table, parent, chain string) *tableChange {
	if t == nil {
		return nil
	}
	tc := &tableChange{table: table, removed: chain}
	for _, l := range t.rules[parent] {
		s, ok := appendedSpec(l, parent)
		if !ok || !jumpsTo(s, chain) {
			continue
		}
		// By rulespec, as iptables-save printed it, not by position, so a
		// rule someone else inserted meanwhile cannot be hit.
		tc.lines = append(tc.lines, "-D"+strings.TrimPrefix(l, "-A"))
	}
	if t.chains[chain] {
		tc.lines = append(tc.lines, ":"+chain+" - [0:0]", "-X "+chain)
	}
	if len(tc.lines) == 0 {
		return nil
	}
	return tc
}

func setKey(s chainSet) string { return s.table + " " + s.chain }

// done remembers how iptables prints the chains an applied plan refilled
// (see chainDrift), then logs and counts what it restored.
func (c *iptKeeper) done(ctx context.Context, p plan) {
	var refilled []*chainSet
	for _, tc := range p {
		if tc.refill != "" {
			refilled = append(refilled, tc.set)
			delete(c.rendered, setKey(*tc.set))
		}
	}
	if len(refilled) > 0 {
		// A failed read only loses the shortcut.
		if dump, err := c.ipt.Save(ctx); err == nil {
			tables := parseSave(dump)
			for _, s := range refilled {
				t := tables[s.table]
				if t == nil {
					continue
				}
				// Only a listing with as many rules as were written can be
				// another rendering of them; anything else is a change made
				// since the restore, which the next check repairs.
				if l := t.rules[s.chain]; len(l) == len(s.rules) && !chainMatches(l, s.chain, s.rules) {
					c.rendered[setKey(*s)] = rendering{rules: rulesKey(s.rules), listing: l}
				}
			}
		}
	}
	for _, tc := range p {
		if s := tc.set; s != nil {
			if tc.refill != "" {
				c.log.Info("Restored iptables chain", "program", c.prog, "table", s.table, "chain", s.chain, "reason", tc.refill, "rules", len(s.rules))
			}
			if tc.jump {
				c.log.Info("Restored iptables jump", "program", c.prog, "table", s.table, "from", s.parent, "to", s.chain)
			}
		}
		if tc.removed != "" {
			c.log.Info("Removed iptables chain left from an earlier run", "program", c.prog, "table", tc.table, "chain", tc.removed)
		}
		c.restores.Add(1)
		metrics.IPTablesRestores.Inc()
	}
}

// rendering is a chain's listing read back right after we restored it.
type rendering struct {
	rules   string // rulesKey of the rules written
	listing []string
}

// rulesKey identifies a rule set, so a remembered listing is only used for
// the rules it was read back from.
func rulesKey(rules [][]string) string {
	return fmt.Sprintf("%q", rules)
}
