package network

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/klog/v2"
	"sigs.k8s.io/knftables"

	"github.com/flanneld-go/flanneld/internal/metrics"
)

// DefaultResyncInterval is used when Options.ResyncInterval is zero; it is
// flannel's --iptables-resync default.
const DefaultResyncInterval = 5 * time.Second

// Options configures a Keeper. At least one family must be given: Network
// and Lease for IPv4, IPv6Network and IPv6Lease for IPv6 (dual stack: both;
// IPv6-only: leave Network and Lease zero).
type Options struct {
	// Network is the IPv4 flannel network (the config's Network), e.g.
	// 10.5.0.0/16. Host bits are ignored. The zero value means no IPv4
	// rules (an IPv6-only network).
	Network netip.Prefix
	// Lease is this node's IPv4 lease subnet, e.g. 10.5.34.0/24. Required
	// with Network, and inside it. It can be changed later with SetLease.
	Lease netip.Prefix
	// IPv6Network is the IPv6 flannel network (the config's IPv6Network),
	// e.g. fc00::/48. The zero value means no IPv6 rules.
	IPv6Network netip.Prefix
	// IPv6Lease is this node's IPv6 lease subnet, e.g. fc00:0:0:22::/64.
	// Required with IPv6Network, and inside it. SetLease changes it too.
	IPv6Lease netip.Prefix
	// IPMasq installs the masquerade rules (--ip-masq). When false, a
	// masquerade chain and jumps to it left by an earlier run are removed.
	IPMasq bool
	// MasqRandomFully gives the MASQUERADE rules --random-fully (nftables:
	// masquerade fully-random), flannel v0.28's default, where iptables
	// has it (1.6.2 and later).
	MasqRandomFully bool
	// NoForwardRules leaves out the forward chain and its jump
	// (--iptables-forward-rules=false); ones left by an earlier run are
	// removed.
	NoForwardRules bool
	// NFTables keeps the rules in the nftables tables "ip flannel-ipv4" and
	// "ip6 flannel-ipv6" (the config's EnableNFTables) instead of
	// iptables/ip6tables chains. Either way, the first Ensure removes what
	// the other mode left from an earlier run (Run does, with
	// CleanupInRun).
	NFTables bool
	// CleanupInRun leaves the removal of an earlier run's leftovers to Run,
	// right after the first Ensure that succeeds, so that the first Ensure
	// (which a node waits for before it is ready) only installs the rules:
	// the removal lists the other mode's rules (ip6tables-save, nft) and
	// takes some tens of milliseconds.
	CleanupInRun bool
	// ResyncInterval is how often Run checks the rules; zero means
	// DefaultResyncInterval.
	ResyncInterval time.Duration
	// Logger receives Run's errors and a line for each restore; the zero
	// value means klog.Background().
	Logger klog.Logger

	// Tests replace the tools: when any of these is set, the Keeper uses
	// exactly these, and a nil one counts as a tool not installed. When
	// none is set, the binaries are found on PATH.
	ipt  iptablesAPI                                                              // iptables-save/-restore
	ip6t iptablesAPI                                                              // ip6tables-save/-restore
	nft  func(family knftables.Family, table string) (knftables.Interface, error) // nft
}

// familyKeeper keeps the rules of one family in place.
type familyKeeper interface {
	ensure(ctx context.Context, lease netip.Prefix) error
}

// family indexes the per-family state of a Keeper.
type family int

const (
	ipv4 family = iota
	ipv6
)

func (f family) String() string { return [...]string{"IPv4", "IPv6"}[f] }

// Keeper installs flanneld's forward and masquerade rules, for IPv4, IPv6
// or both, with iptables or nftables, and keeps them in place. Its methods
// are safe for concurrent use.
//
// The lease subnets can change while it runs (SetLease); the networks,
// IPMasq and the mode cannot: to switch them, construct a new Keeper, whose
// first Ensure installs the new rules and removes what is no longer
// wanted. Nothing is removed when a Keeper stops: the rules stay in place
// for the next run of the daemon to find.
type Keeper struct {
	log      klog.Logger
	interval time.Duration
	network  netip.Prefix // IPv4 network; zero without IPv4
	network6 netip.Prefix // IPv6 network; zero without IPv6
	set      Set

	keepers [2]familyKeeper // by family; nil for a family not configured
	cleanup []cleanupStep   // the other mode's leftovers, removed once

	mu     sync.Mutex // guards leases
	leases [2]netip.Prefix

	ensureMu sync.Mutex // serialises Ensure; guards lastOK and cleaned
	lastOK   time.Time  // end of the last Ensure that succeeded
	cleaned  bool       // cleanup has succeeded
	// deferCleanup is Options.CleanupInRun.
	deferCleanup bool

	restores atomic.Uint64
	wake     chan struct{} // tells Run a lease changed
}

// cleanupStep removes one set of leftovers; it reports whether there were any.
type cleanupStep struct {
	what   string
	remove func(ctx context.Context) (bool, error)
}

// New validates opts and returns a Keeper. It installs nothing: call Ensure
// or Run.
func New(opts Options) (*Keeper, error) {
	has4, has6 := opts.Network.IsValid(), opts.IPv6Network.IsValid()
	if !has4 && !has6 {
		return nil, fmt.Errorf("invalid iptables setup: no network given; set the config's Network (IPv4) and/or IPv6Network")
	}
	if has4 && !opts.Network.Addr().Is4() {
		return nil, fmt.Errorf("invalid iptables setup: network %q is not an IPv4 prefix; set the config's Network to e.g. 10.5.0.0/16", opts.Network)
	}
	if has6 && (!opts.IPv6Network.Addr().Is6() || opts.IPv6Network.Addr().Is4In6()) {
		return nil, fmt.Errorf("invalid iptables setup: IPv6 network %q is not an IPv6 prefix; set the config's IPv6Network to e.g. fc00::/48", opts.IPv6Network)
	}
	k := &Keeper{
		network:  opts.Network.Masked(),
		network6: opts.IPv6Network.Masked(),
		set:      Set{NoForward: opts.NoForwardRules, IPMasq: opts.IPMasq, RandomFully: opts.MasqRandomFully},
		wake:     make(chan struct{}, 1),

		deferCleanup: opts.CleanupInRun,
	}
	if !has4 {
		k.network = netip.Prefix{}
	}
	if !has6 {
		k.network6 = netip.Prefix{}
	}
	for f, lease := range [2]netip.Prefix{opts.Lease, opts.IPv6Lease} {
		if !k.networkOf(family(f)).IsValid() {
			continue
		}
		l, err := k.checkLease(lease)
		if err != nil {
			return nil, err
		}
		k.leases[f] = l
	}
	if opts.ResyncInterval < 0 {
		return nil, fmt.Errorf("invalid iptables setup: resync interval %v is negative; use a positive interval", opts.ResyncInterval)
	}
	k.interval = opts.ResyncInterval
	if k.interval == 0 {
		k.interval = DefaultResyncInterval
	}
	k.log = opts.Logger
	if k.log.GetSink() == nil {
		k.log = klog.Background()
	}

	t := findTools(opts)
	for _, f := range []family{ipv4, ipv6} {
		network := k.networkOf(f)
		family, table := nftTable(f == ipv6)
		connect := func() (knftables.Interface, error) { return t.nft(family, table) }
		switch {
		case network.IsValid() && opts.NFTables:
			if !t.nftFound {
				return nil, fmt.Errorf("setting up nftables: nft not found; install the nftables package (nft 1.0.1 or later) or turn EnableNFTables off")
			}
			k.keepers[f] = newNFTKeeper(connect, f == ipv6, k.log, network, k.set, &k.restores)
		case network.IsValid():
			ipt := t.ipt[f]
			if ipt == nil {
				return nil, fmt.Errorf("setting up %s: %s not found; install the iptables package (it provides %[2]s-save and %[2]s-restore)", f, progIPT(f))
			}
			k.keepers[f] = newIPTKeeper(ipt, f == ipv6, k.log, network, k.set, &k.restores)
		}
		// Leftovers: iptables chains unless we keep them, our nftables
		// table unless we keep it. Without the tool there is nothing to
		// remove them with.
		if !network.IsValid() || opts.NFTables {
			if ipt := t.ipt[f]; ipt != nil {
				c := newIPTKeeper(ipt, f == ipv6, k.log, network, Set{}, &k.restores)
				k.cleanup = append(k.cleanup, cleanupStep{what: progIPT(f) + " chains", remove: c.removeAll})
			}
		}
		if (!network.IsValid() || !opts.NFTables) && t.nftFound {
			k.cleanup = append(k.cleanup, cleanupStep{what: "nftables table " + string(family) + " " + table, remove: func(ctx context.Context) (bool, error) {
				nft, err := connect()
				if err != nil {
					// nft cannot work here (too old, no kernel support),
					// so it cannot have made the table either.
					return false, nil
				}
				removed, err := removeNFTTable(ctx, nft, family, table)
				if removed {
					k.restores.Add(1)
					metrics.IPTablesRestores.Inc()
				}
				return removed, err
			}})
		}
	}
	return k, nil
}

func progIPT(f family) string {
	if f == ipv6 {
		return "ip6tables"
	}
	return "iptables"
}

// tools are the programs a Keeper may run.
type tools struct {
	ipt [2]iptablesAPI // by family; nil when not installed
	// nft connects to a table; knftables.New runs nft twice to check that
	// it works, so it is called at the first Ensure, not in New.
	nft      func(family knftables.Family, table string) (knftables.Interface, error)
	nftFound bool // nft is installed
}

// findTools returns the test's tools, or those found on PATH.
func findTools(opts Options) tools {
	if opts.ipt != nil || opts.ip6t != nil || opts.nft != nil {
		return tools{ipt: [2]iptablesAPI{opts.ipt, opts.ip6t}, nft: opts.nft, nftFound: opts.nft != nil}
	}
	var t tools
	for _, f := range []family{ipv4, ipv6} {
		if e, err := lookIPTables(f == ipv6); err == nil {
			t.ipt[f] = e
		}
	}
	_, err := exec.LookPath("nft")
	t.nftFound = err == nil
	t.nft = func(family knftables.Family, table string) (knftables.Interface, error) {
		return knftables.New(family, table)
	}
	return t
}

func (k *Keeper) networkOf(f family) netip.Prefix {
	if f == ipv6 {
		return k.network6
	}
	return k.network
}

// checkLease validates a lease subnet against the network of its family
// and masks it.
func (k *Keeper) checkLease(lease netip.Prefix) (netip.Prefix, error) {
	if !lease.IsValid() {
		return netip.Prefix{}, fmt.Errorf("invalid iptables setup: lease %q is not a prefix; pass the node's lease subnet, e.g. 10.5.34.0/24", lease)
	}
	f := ipv4
	if lease.Addr().Is6() && !lease.Addr().Is4In6() {
		f = ipv6
	}
	network := k.networkOf(f)
	if !network.IsValid() {
		return netip.Prefix{}, fmt.Errorf("invalid iptables setup: lease %s is %s but no %[2]s network is configured; pass a subnet of the network", lease, f)
	}
	if lease.Addr().Is4In6() || lease.Bits() < network.Bits() || !network.Contains(lease.Addr()) {
		return netip.Prefix{}, fmt.Errorf("invalid iptables setup: lease %s is not inside network %s; pass a subnet of the network", lease, network)
	}
	return lease.Masked(), nil
}

// SetLease changes the lease subnet of the lease's family (IPv4 or IPv6),
// e.g. after the lease was lost and a different subnet acquired. The change
// is applied by the next Ensure; a running Run is woken to do so at once.
func (k *Keeper) SetLease(lease netip.Prefix) error {
	lease, err := k.checkLease(lease)
	if err != nil {
		return err
	}
	f := ipv4
	if lease.Addr().Is6() {
		f = ipv6
	}
	k.mu.Lock()
	changed := k.leases[f] != lease
	k.leases[f] = lease
	k.mu.Unlock()
	if changed {
		select {
		case k.wake <- struct{}{}:
		default:
		}
	}
	return nil
}

// Restores returns how many times Ensure has had to change the kernel's
// rules. In iptables mode: once per chain whose rules or jump it put back
// (the first install counts), and once per table from which it removed a
// chain (a masquerade chain left over while IPMasq is off, or the other
// mode's leftovers). In nftables mode: once per table written or removed.
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
				k.log.Error(err, "Failed to keep the forward and masquerade rules in place; retrying", "interval", k.interval)
			}
		}
		recent = false
		if k.deferCleanup {
			k.ensureMu.Lock()
			k.removeLeftovers(ctx)
			k.ensureMu.Unlock()
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case <-k.wake:
		}
	}
}

// Ensure makes the kernel's rules match the current leases, for each
// configured family (see iptKeeper.ensure and nftKeeper.ensure). A check
// that finds everything in place changes nothing. Until it has once
// succeeded, Ensure then also removes the other mode's leftovers (and those
// of a family not configured); a failure there is logged, not returned, and
// retried by the next Ensure. The families' errors are joined.
func (k *Keeper) Ensure(ctx context.Context) error {
	k.ensureMu.Lock()
	defer k.ensureMu.Unlock()
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("ensuring iptables rules: %w", err)
	}
	k.mu.Lock()
	leases := k.leases
	k.mu.Unlock()
	var errs []error
	for f, fk := range k.keepers {
		if fk == nil {
			continue
		}
		if err := fk.ensure(ctx, leases[f]); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) == 0 {
		k.lastOK = time.Now()
		if !k.deferCleanup {
			k.removeLeftovers(ctx)
		}
	}
	return errors.Join(errs...)
}

// removeLeftovers removes the other mode's (and an unconfigured family's)
// rules once the wanted ones are in, until it has once succeeded. Callers
// hold ensureMu.
func (k *Keeper) removeLeftovers(ctx context.Context) {
	if k.cleaned || k.lastOK.IsZero() {
		return
	}
	k.cleaned = true
	for _, c := range k.cleanup {
		removed, err := c.remove(ctx)
		switch {
		case err != nil:
			k.cleaned = false
			k.log.Error(err, "Failed to remove rules left from an earlier run; retrying at the next check", "what", c.what)
		case removed:
			k.log.Info("Removed rules left from an earlier run", "what", c.what)
		}
	}
}
