package network

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coreos/go-iptables/iptables"
	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/internal/metrics"
)

// DefaultResyncInterval is used when Options.ResyncInterval is zero; it is
// flannel's --iptables-resync default.
const DefaultResyncInterval = 5 * time.Second

// iptablesAPI is the part of go-iptables the Keeper uses. Tests replace it
// with a fake; *iptables.IPTables implements it.
type iptablesAPI interface {
	ChainExists(table, chain string) (bool, error)
	ClearChain(table, chain string) error // creates the chain if missing, else flushes it
	DeleteChain(table, chain string) error
	List(table, chain string) ([]string, error) // `iptables -t table -S chain`
	Append(table, chain string, rulespec ...string) error
	Insert(table, chain string, pos int, rulespec ...string) error
	Exists(table, chain string, rulespec ...string) (bool, error)
	Delete(table, chain string, rulespec ...string) error
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

	// ipt replaces the iptables client in tests; nil means go-iptables for
	// IPv4 with the default binary, which waits for the xtables lock.
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

	ensureMu sync.Mutex           // serialises Ensure; guards rendered
	rendered map[string]rendering // by setKey: what our last restore read back

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
		c, err := iptables.New() // IPv4, waits for the xtables lock (--wait)
		if err != nil {
			return nil, fmt.Errorf("setting up iptables: %w; install the iptables package", err)
		}
		ipt = c
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

// Run calls Ensure at once and then every ResyncInterval (and whenever
// SetLease changed the lease) until ctx ends, logging failures and retrying
// at the next tick. It returns nil when ctx ends.
func (k *Keeper) Run(ctx context.Context) error {
	t := time.NewTicker(k.interval)
	defer t.Stop()
	for {
		if err := k.Ensure(ctx); err != nil && ctx.Err() == nil {
			k.log.Error(err, "Failed to keep iptables rules in place; retrying", "interval", k.interval)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case <-k.wake:
		}
	}
}

// Ensure makes the kernel's rules match Rules for the current lease. For
// each of our chains it creates the chain if missing; if any rule is missing,
// extra or out of order it flushes the chain and appends the whole set in
// order; and if the jump from FORWARD or POSTROUTING is missing it inserts it
// at position 1 (an existing jump stays where it is). With IPMasq off it
// removes any jump to FLANNEL-POSTRTG from POSTROUTING and deletes the chain.
// Calling it again with nothing changed changes nothing. Both tables are
// handled even if one fails; the errors are joined.
func (k *Keeper) Ensure(ctx context.Context) error {
	k.ensureMu.Lock()
	defer k.ensureMu.Unlock()
	k.mu.Lock()
	lease := k.lease
	k.mu.Unlock()

	errFwd := k.ensureSet(ctx, forwardSet(k.network))
	var errMasq error
	if k.ipMasq {
		errMasq = k.ensureSet(ctx, masqSet(k.network, lease))
	} else {
		errMasq = k.removeMasq(ctx)
	}
	return errors.Join(errFwd, errMasq)
}

func setKey(s chainSet) string { return s.table + " " + s.chain }

// ensureSet puts one chain and its jump in place.
func (k *Keeper) ensureSet(ctx context.Context, s chainSet) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("ensuring chain %s %s: %w", s.table, s.chain, err)
	}
	reason, err := k.chainDrift(s)
	if err != nil {
		return fmt.Errorf("checking chain %s %s: %w", s.table, s.chain, err)
	}
	restored := false
	defer func() {
		if restored {
			k.restores.Add(1)
			metrics.IPTablesRestores.Inc()
		}
	}()
	if reason != "" {
		if err := k.restoreChain(s); err != nil {
			return fmt.Errorf("restoring chain %s %s: %w", s.table, s.chain, err)
		}
		restored = true
		k.log.Info("Restored iptables chain", "table", s.table, "chain", s.chain, "reason", reason, "rules", len(s.rules))
	}
	ok, err := k.ipt.Exists(s.table, s.parent, s.jump...)
	if err != nil {
		return fmt.Errorf("checking jump from %s %s to %s: %w", s.table, s.parent, s.chain, err)
	}
	if !ok {
		if err := k.ipt.Insert(s.table, s.parent, 1, s.jump...); err != nil {
			return fmt.Errorf("inserting jump from %s %s to %s: %w", s.table, s.parent, s.chain, err)
		}
		restored = true
		k.log.Info("Restored iptables jump", "table", s.table, "from", s.parent, "to", s.chain)
	}
	return nil
}

// chainDrift returns why the chain must be restored, or "" if it is in place.
func (k *Keeper) chainDrift(s chainSet) (string, error) {
	ok, err := k.ipt.ChainExists(s.table, s.chain)
	if err != nil {
		return "", err
	}
	if !ok {
		return "chain missing", nil
	}
	listing, err := k.ipt.List(s.table, s.chain)
	if err != nil {
		return "", err
	}
	if chainMatches(listing, s.chain, s.rules) {
		return "", nil
	}
	// An iptables version that prints rules differently from how we write
	// them would otherwise cause a restore at every check: accept exactly
	// what it printed after our last restore of these same rules.
	if r, ok := k.rendered[setKey(s)]; ok && r.rules == rulesKey(s.rules) && slices.Equal(r.listing, listing) {
		return "", nil
	}
	return "rules missing, extra or out of order", nil
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

// restoreChain creates or flushes the chain and appends the rules in order.
func (k *Keeper) restoreChain(s chainSet) error {
	key := setKey(s)
	delete(k.rendered, key)
	if err := k.ipt.ClearChain(s.table, s.chain); err != nil {
		return err
	}
	for _, r := range s.rules {
		if err := k.ipt.Append(s.table, s.chain, r...); err != nil {
			return err
		}
	}
	// Remember how iptables prints what we just wrote (see chainDrift). A
	// failed read only loses that shortcut.
	if listing, err := k.ipt.List(s.table, s.chain); err == nil {
		k.rendered[key] = rendering{rules: rulesKey(s.rules), listing: listing}
	}
	return nil
}

// removeMasq deletes every jump from nat POSTROUTING to FLANNEL-POSTRTG
// (whatever its comment) and then the chain itself.
func (k *Keeper) removeMasq(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("removing chain %s %s: %w", TableNAT, ChainMasquerade, err)
	}
	listing, err := k.ipt.List(TableNAT, chainNATPostrouting)
	if err != nil {
		return fmt.Errorf("listing %s %s: %w", TableNAT, chainNATPostrouting, err)
	}
	removed := false
	for _, line := range listing {
		s, ok := appendedSpec(line, chainNATPostrouting)
		if !ok || !jumpsTo(s, ChainMasquerade) {
			continue
		}
		// Deleting by rulespec, not by position, so a rule someone else
		// inserted meanwhile cannot be hit.
		if err := k.ipt.Delete(TableNAT, chainNATPostrouting, s...); err != nil {
			return fmt.Errorf("deleting jump from %s %s to %s: %w", TableNAT, chainNATPostrouting, ChainMasquerade, err)
		}
		removed = true
	}
	ok, err := k.ipt.ChainExists(TableNAT, ChainMasquerade)
	if err != nil {
		return fmt.Errorf("checking chain %s %s: %w", TableNAT, ChainMasquerade, err)
	}
	if ok {
		if err := k.ipt.ClearChain(TableNAT, ChainMasquerade); err != nil {
			return fmt.Errorf("flushing chain %s %s: %w", TableNAT, ChainMasquerade, err)
		}
		if err := k.ipt.DeleteChain(TableNAT, ChainMasquerade); err != nil {
			return fmt.Errorf("deleting chain %s %s: %w", TableNAT, ChainMasquerade, err)
		}
		removed = true
	}
	if removed {
		k.restores.Add(1)
		metrics.IPTablesRestores.Inc()
		k.log.Info("Removed iptables masquerade rules left from an earlier run", "table", TableNAT, "chain", ChainMasquerade, "reason", "ip-masq is off")
	}
	return nil
}
