package network

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/internal/metrics"
)

// DefaultResyncInterval is used when Options.ResyncInterval is zero; it is
// flannel's --iptables-resync default.
const DefaultResyncInterval = 5 * time.Second

// iptablesAPI is how the Keeper reads and changes the kernel's rules: one
// dump of every table, and one batch of changes applied atomically per
// table. Tests replace it with a fake; execIPTables runs iptables-save and
// iptables-restore.
type iptablesAPI interface {
	// Save returns the rules of every table in iptables-save format.
	Save(ctx context.Context) ([]byte, error)
	// Restore applies an iptables-restore script without flushing the
	// tables it names (--noflush), waiting for the xtables lock.
	Restore(ctx context.Context, script []byte) error
}

// Options configures a Keeper.
type Options struct {
	// Network is the flannel network (the config's Network), e.g. 10.5.0.0/16.
	// Required; IPv4. Host bits are ignored.
	Network netip.Prefix
	// Lease is this node's lease subnet, e.g. 10.5.34.0/24. Required; IPv4,
	// inside Network. It can be changed later with SetLease.
	Lease netip.Prefix
	// IPMasq installs the masquerade rules (--ip-masq). When false, a
	// masquerade chain and jumps to it left by an earlier run are removed.
	IPMasq bool
	// ResyncInterval is how often Run checks the rules; zero means
	// DefaultResyncInterval.
	ResyncInterval time.Duration
	// Logger receives Run's errors and a line for each restore; the zero
	// value means klog.Background().
	Logger klog.Logger

	// ipt replaces the iptables binaries in tests; nil means iptables-save
	// and iptables-restore found on PATH.
	ipt iptablesAPI
}

// Keeper installs flanneld's iptables rules and keeps them in place. Its
// methods are safe for concurrent use.
//
// The lease subnet can change while it runs (SetLease); IPMasq cannot: to
// switch it, construct a new Keeper, whose first Ensure installs or removes
// the masquerade chain. Nothing is removed when a Keeper stops: the rules
// stay in place for the next run of the daemon to find.
type Keeper struct {
	ipt      iptablesAPI
	log      klog.Logger
	interval time.Duration
	network  netip.Prefix
	ipMasq   bool

	mu    sync.Mutex // guards lease
	lease netip.Prefix

	ensureMu sync.Mutex           // serialises Ensure; guards rendered and lastOK
	rendered map[string]rendering // by setKey: what our last restore read back
	lastOK   time.Time            // end of the last Ensure that succeeded

	restores atomic.Uint64
	wake     chan struct{} // tells Run the lease changed
}

// New validates opts and returns a Keeper. It installs nothing: call Ensure
// or Run.
func New(opts Options) (*Keeper, error) {
	if !opts.Network.IsValid() || !opts.Network.Addr().Is4() {
		return nil, fmt.Errorf("invalid iptables setup: network %q is not an IPv4 prefix; set the config's Network to e.g. 10.5.0.0/16", opts.Network)
	}
	network := opts.Network.Masked()
	lease, err := checkLease(network, opts.Lease)
	if err != nil {
		return nil, err
	}
	if opts.ResyncInterval < 0 {
		return nil, fmt.Errorf("invalid iptables setup: resync interval %v is negative; use a positive interval", opts.ResyncInterval)
	}
	interval := opts.ResyncInterval
	if interval == 0 {
		interval = DefaultResyncInterval
	}
	log := opts.Logger
	if log.GetSink() == nil {
		log = klog.Background()
	}
	ipt := opts.ipt
	if ipt == nil {
		e, err := lookIPTables()
		if err != nil {
			return nil, fmt.Errorf("setting up iptables: %w; install the iptables package (it provides iptables-save and iptables-restore)", err)
		}
		ipt = e
	}
	return &Keeper{
		ipt:      ipt,
		log:      log,
		interval: interval,
		network:  network,
		ipMasq:   opts.IPMasq,
		lease:    lease,
		rendered: make(map[string]rendering),
		wake:     make(chan struct{}, 1),
	}, nil
}

// checkLease validates a lease subnet against the network and masks it.
func checkLease(network, lease netip.Prefix) (netip.Prefix, error) {
	if !lease.IsValid() || !lease.Addr().Is4() {
		return netip.Prefix{}, fmt.Errorf("invalid iptables setup: lease %q is not an IPv4 prefix; pass the node's lease subnet, e.g. 10.5.34.0/24", lease)
	}
	if lease.Bits() < network.Bits() || !network.Contains(lease.Addr()) {
		return netip.Prefix{}, fmt.Errorf("invalid iptables setup: lease %s is not inside network %s; pass a subnet of the network", lease, network)
	}
	return lease.Masked(), nil
}

// SetLease changes the lease subnet, e.g. after the lease was lost and a
// different subnet acquired. The change is applied by the next Ensure; a
// running Run is woken to do so at once.
func (k *Keeper) SetLease(lease netip.Prefix) error {
	lease, err := checkLease(k.network, lease)
	if err != nil {
		return err
	}
	k.mu.Lock()
	changed := k.lease != lease
	k.lease = lease
	k.mu.Unlock()
	if changed {
		select {
		case k.wake <- struct{}{}:
		default:
		}
	}
	return nil
}

// Restores returns how many times Ensure has had to change the kernel's rules:
// once per chain whose rules or jump it put back (the first install counts),
// and once per removal of a masquerade chain left over while IPMasq is off.
func (k *Keeper) Restores() uint64 { return k.restores.Load() }

// Run calls Ensure at once (unless an Ensure succeeded less than
// ResyncInterval ago, e.g. the caller's own first install) and then every
// ResyncInterval, and whenever SetLease changed the lease, until ctx ends. It
// logs failures and retries at the next tick. It returns nil when ctx ends.
func (k *Keeper) Run(ctx context.Context) error {
	t := time.NewTicker(k.interval)
	defer t.Stop()
	k.ensureMu.Lock()
	recent := !k.lastOK.IsZero() && time.Since(k.lastOK) < k.interval
	k.ensureMu.Unlock()
	for {
		if !recent {
			if err := k.Ensure(ctx); err != nil && ctx.Err() == nil {
				k.log.Error(err, "Failed to keep iptables rules in place; retrying", "interval", k.interval)
			}
		}
		recent = false
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case <-k.wake:
		}
	}
}

// Ensure makes the kernel's rules match Rules for the current lease. It
// reads every table with one iptables-save and, only if something is off,
// applies the changes with one iptables-restore: a chain missing or with any
// rule missing, extra or out of order is declared again (which empties it)
// and refilled in order in the same transaction, so the chain is never seen
// half-filled; a missing jump from FORWARD or POSTROUTING is inserted at
// position 1 (an existing jump stays where it is). With IPMasq off, every
// jump to FLANNEL-POSTRTG is deleted from POSTROUTING and the chain removed.
// Calling it again with nothing changed changes nothing. If the restore
// fails, each table is tried again on its own, so that one table's failure
// does not keep the other's rules out; the errors are joined.
func (k *Keeper) Ensure(ctx context.Context) error {
	k.ensureMu.Lock()
	defer k.ensureMu.Unlock()
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("ensuring iptables rules: %w", err)
	}
	p, err := k.plan(ctx)
	if err != nil {
		return err
	}
	if len(p) == 0 {
		k.lastOK = time.Now()
		return nil
	}
	err = k.restore(ctx, p.script())
	if err == nil {
		k.done(ctx, p)
		k.lastOK = time.Now()
		return nil
	}
	if len(p) == 1 || ctx.Err() != nil {
		return p[0].wrap(err)
	}
	// One table failed; the other may or may not have been committed before
	// it. Look again and apply each table on its own.
	first := p
	if p, err = k.plan(ctx); err != nil {
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
		if err := k.restore(ctx, plan{tc}.script()); err != nil {
			errs = append(errs, tc.wrap(err))
			continue
		}
		applied = append(applied, tc)
	}
	k.done(ctx, applied)
	return errors.Join(errs...)
}

// restoreTimeout bounds one iptables-restore, which waits for the xtables
// lock.
const restoreTimeout = time.Minute

// restore runs one iptables-restore. Once started it is not cut short by
// ctx: killing it after its COMMIT would leave rules applied but reported
// as failed (and uncounted). It is bounded by restoreTimeout instead.
func (k *Keeper) restore(ctx context.Context, script []byte) error {
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), restoreTimeout)
	defer cancel()
	return k.ipt.Restore(rctx, script)
}

// plan is the changes one Ensure makes, per table, in script order.
type plan []*tableChange

// tableChange is what must change in one table: one of our chain sets put
// back in place, or the masquerade chain removed.
type tableChange struct {
	table   string
	lines   []string  // iptables-restore lines, without *table and COMMIT
	set     *chainSet // the set put in place; nil for the removal
	refill  string    // why the chain is declared again and refilled ("" if not)
	jump    bool      // the jump to the chain is inserted
	removed bool      // the masquerade chain or jumps to it are removed
}

func (tc *tableChange) wrap(err error) error {
	what := ChainMasquerade + " removal"
	if tc.set != nil {
		what = tc.set.chain
	}
	return fmt.Errorf("restoring iptables table %s (%s): %w", tc.table, what, err)
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
func (k *Keeper) plan(ctx context.Context) (plan, error) {
	dump, err := k.ipt.Save(ctx)
	if err != nil {
		return nil, fmt.Errorf("reading iptables rules: %w", err)
	}
	tables := parseSave(dump)
	k.mu.Lock()
	lease := k.lease
	k.mu.Unlock()

	var p plan
	if tc := k.planSet(tables, forwardSet(k.network)); tc != nil {
		p = append(p, tc)
	}
	if k.ipMasq {
		if tc := k.planSet(tables, masqSet(k.network, lease)); tc != nil {
			p = append(p, tc)
		}
	} else if tc := planRemoveMasq(tables[TableNAT]); tc != nil {
		p = append(p, tc)
	}
	return p, nil
}

// planSet returns the changes that put one chain and its jump in place, or
// nil if they are in place.
func (k *Keeper) planSet(tables map[string]*savedTable, s chainSet) *tableChange {
	t := tables[s.table]
	if t == nil {
		t = &savedTable{}
	}
	tc := &tableChange{table: s.table, set: &s}
	if reason := k.chainDrift(t, s); reason != "" {
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
func (k *Keeper) chainDrift(t *savedTable, s chainSet) string {
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
	if r, ok := k.rendered[setKey(s)]; ok && r.rules == rulesKey(s.rules) && slices.Equal(r.listing, listing) {
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

// planRemoveMasq returns the changes that delete every jump from nat
// POSTROUTING to FLANNEL-POSTRTG (whatever its comment) and then the chain,
// or nil if there is none of either.
func planRemoveMasq(t *savedTable) *tableChange {
	if t == nil {
		return nil
	}
	tc := &tableChange{table: TableNAT, removed: true}
	for _, l := range t.rules[chainNATPostrouting] {
		s, ok := appendedSpec(l, chainNATPostrouting)
		if !ok || !jumpsTo(s, ChainMasquerade) {
			continue
		}
		// By rulespec, as iptables-save printed it, not by position, so a
		// rule someone else inserted meanwhile cannot be hit.
		tc.lines = append(tc.lines, "-D"+strings.TrimPrefix(l, "-A"))
	}
	if t.chains[ChainMasquerade] {
		tc.lines = append(tc.lines, ":"+ChainMasquerade+" - [0:0]", "-X "+ChainMasquerade)
	}
	if len(tc.lines) == 0 {
		return nil
	}
	return tc
}

func setKey(s chainSet) string { return s.table + " " + s.chain }

// done remembers how iptables prints the chains an applied plan refilled
// (see chainDrift), then logs and counts what it restored.
func (k *Keeper) done(ctx context.Context, p plan) {
	var refilled []*chainSet
	for _, tc := range p {
		if tc.refill != "" {
			refilled = append(refilled, tc.set)
			delete(k.rendered, setKey(*tc.set))
		}
	}
	if len(refilled) > 0 {
		// A failed read only loses the shortcut.
		if dump, err := k.ipt.Save(ctx); err == nil {
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
					k.rendered[setKey(*s)] = rendering{rules: rulesKey(s.rules), listing: l}
				}
			}
		}
	}
	for _, tc := range p {
		if s := tc.set; s != nil {
			if tc.refill != "" {
				k.log.Info("Restored iptables chain", "table", s.table, "chain", s.chain, "reason", tc.refill, "rules", len(s.rules))
			}
			if tc.jump {
				k.log.Info("Restored iptables jump", "table", s.table, "from", s.parent, "to", s.chain)
			}
		}
		if tc.removed {
			k.log.Info("Removed iptables masquerade rules left from an earlier run", "table", TableNAT, "chain", ChainMasquerade, "reason", "ip-masq is off")
		}
		k.restores.Add(1)
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
