// Package daemon runs one node's lifecycle: wait for the network config,
// acquire a lease, hand it to the backend, publish subnet.env, keep the
// iptables rules in place, and then follow the other nodes' leases and renew
// our own until the context ends.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"runtime/debug"
	"time"

	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/internal/metrics"
	"github.com/flanneld-go/flanneld/pkg/nlbatch"
	"github.com/flanneld-go/flanneld/subnet"
)

// Rules keeps the iptables rules of one lease in place.
type Rules interface {
	// Ensure installs the rule set now.
	Ensure(ctx context.Context) error
	// Run re-checks the rule set periodically until ctx ends.
	Run(ctx context.Context) error
}

// Options configures Run. Each zero value has a documented default.
type Options struct {
	// Manager is the lease store.
	Manager subnet.Manager
	// Ext is the external interface and the address published in the lease.
	Ext backend.ExternalInterface
	// Netlink is the handle backends program the kernel with; nil means the
	// process's network namespace.
	Netlink *nlbatch.Handle
	// SubnetFile is where subnet.env is written and read back from.
	SubnetFile string
	// IPMasq is published as FLANNEL_IPMASQ and passed to Rules.
	IPMasq bool
	// Rules builds the rule keeper for a lease; nil installs no rules.
	Rules func(network, lease netip.Prefix, ipMasq bool) (Rules, error)
	// RenewMargin is how long before expiry the lease is renewed (60 min).
	RenewMargin time.Duration
	// RenewRetry is the wait after a failed renewal (1 min).
	RenewRetry time.Duration
	// RouteResync is how often the backend re-checks the kernel (10 s).
	RouteResync time.Duration
	// Nexthops makes backends install routes through nexthop objects.
	Nexthops bool
	// Coalesce is how long lease events are gathered before one Apply (20 ms).
	Coalesce time.Duration
	// OnReady is called once, after subnet.env is written and the rules are
	// installed. Optional.
	OnReady func()
	// OnLease is called with each lease this node holds (the first and any
	// re-acquired one). Optional.
	OnLease func(subnet.Lease)
	// Logger receives the daemon's logs (klog.Background()).
	Logger *klog.Logger
	// Now is the clock (time.Now).
	Now func() time.Time
}

func (o *Options) defaults() {
	if o.RenewMargin == 0 {
		o.RenewMargin = time.Hour
	}
	if o.RenewRetry == 0 {
		o.RenewRetry = time.Minute
	}
	if o.RouteResync == 0 {
		o.RouteResync = 10 * time.Second
	}
	if o.Coalesce == 0 {
		o.Coalesce = 20 * time.Millisecond
	}
	if o.Logger == nil {
		l := klog.Background()
		o.Logger = &l
	}
	if o.Now == nil {
		o.Now = time.Now
	}
}

// node is the state Run owns; only Run's goroutine touches it.
type node struct {
	o       Options
	log     klog.Logger
	cfg     *subnet.Config
	be      backend.Backend
	attrs   subnet.LeaseAttrs
	mtu     int
	lease   subnet.Lease
	leases  *leaseSet       // every valid lease, own included
	skipped map[string]bool // bad lease values already logged

	rulesCancel context.CancelFunc
	rulesDone   chan struct{}
}

// Run runs the node until ctx ends, then returns nil. Kernel state (routes,
// devices, rules) is left in place so that a restart does not interrupt
// traffic. Errors before the node is ready are returned; after that, errors
// are logged and retried.
func Run(ctx context.Context, o Options) error {
	o.defaults()
	n := &node{o: o, log: *o.Logger, leases: newLeaseSet(), skipped: map[string]bool{}}
	defer n.stopRules()

	cfg, err := o.Manager.GetNetworkConfig(ctx)
	if err != nil {
		return ctxOr(ctx, fmt.Errorf("getting network config: %w", err))
	}
	n.cfg = cfg
	n.log.Info("Network config", "network", cfg.Network, "subnetLen", cfg.SubnetLen,
		"subnetMin", cfg.SubnetMin, "subnetMax", cfg.SubnetMax, "backend", cfg.BackendType)

	be, err := backend.New(cfg.BackendType, backend.Options{Ext: o.Ext, Config: cfg, Netlink: o.Netlink, Nexthops: o.Nexthops, Logger: n.log.WithName(cfg.BackendType)})
	if err != nil {
		return err
	}
	n.be = be
	defer be.Close()
	pub, err := be.Init(ctx)
	if err != nil {
		return ctxOr(ctx, fmt.Errorf("starting %s backend: %w", cfg.BackendType, err))
	}
	n.mtu = pub.MTU
	n.attrs = subnet.LeaseAttrs{PublicIP: o.Ext.PublicIP, BackendType: cfg.BackendType, BackendData: pub.BackendData}

	lease, err := n.acquire(ctx, n.previousSubnet())
	if err != nil {
		return ctxOr(ctx, err)
	}
	n.setLease(*lease)
	// The rules depend only on the network and the lease: install them
	// while the backend is programmed.
	rulesIn, err := n.startRules(ctx)
	if err != nil {
		return ctxOr(ctx, err)
	}

	events := make(chan []subnet.Event, 64)
	wctx, wcancel := context.WithCancel(ctx)
	werr := make(chan error, 1)
	wdone := make(chan struct{})
	go func() {
		defer close(wdone)
		werr <- o.Manager.WatchLeases(wctx, events)
	}()
	// Wait on wdone, not werr: loop may already have taken the error.
	defer func() { wcancel(); <-wdone }()

	// Program the kernel from the first snapshot, never from an empty set:
	// an empty set would remove the routes a previous run left in place.
	select {
	case <-ctx.Done():
		return nil
	case batch := <-events:
		n.update(batch)
	}
	if err := n.apply(ctx); err != nil {
		return ctxOr(ctx, fmt.Errorf("programming %s backend: %w", cfg.BackendType, err))
	}
	if err := n.writeEnv(); err != nil {
		return ctxOr(ctx, err)
	}
	if err := n.awaitRules(ctx, rulesIn); err != nil {
		return ctxOr(ctx, err)
	}
	if o.OnReady != nil {
		o.OnReady()
	}
	n.log.Info("Ready", "subnet", n.lease.Subnet, "publicIP", o.Ext.PublicIP, "leases", n.leases.len())
	if n.leases.len() >= burstEvents {
		debug.FreeOSMemory()
	}
	return n.loop(ctx, events, werr)
}

// burstEvents is the size of a burst of lease events (or of the first set)
// after which the memory its processing used is handed back to the kernel
// at once (debug.FreeOSMemory: one garbage collection), rather than over
// minutes by the runtime: a daemon that read 10,000 leases at start then
// holds about 10 MB less.
const burstEvents = 1000

func ctxOr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return nil
	}
	return err
}

func (n *node) loop(ctx context.Context, events <-chan []subnet.Event, werr <-chan error) error {
	renew := time.NewTimer(n.renewDelay())
	defer renew.Stop()
	resync := time.NewTicker(n.o.RouteResync)
	defer resync.Stop()
	var coalesce <-chan time.Time // non-nil while an Apply is pending
	pending := 0                  // lease events since the last Apply
	apply := func() {
		coalesce = nil
		if err := n.apply(ctx); err != nil && ctx.Err() == nil {
			n.log.Error(err, "Programming the backend failed; retrying at the next resync")
		}
		if pending >= burstEvents {
			debug.FreeOSMemory()
		}
		pending = 0
	}
	for {
		select {
		case <-ctx.Done():
			n.log.Info("Stopping; routes, devices and rules stay in place")
			return nil
		case err := <-werr:
			return ctxOr(ctx, fmt.Errorf("watching leases: %w", err))
		case batch := <-events:
			pending += len(batch)
			if n.update(batch) {
				n.reacquire(ctx)
				renew.Reset(n.renewDelay())
				apply()
				continue
			}
			if coalesce == nil {
				coalesce = time.After(n.o.Coalesce)
			}
		case <-coalesce:
			apply()
		case <-resync.C:
			apply()
		case <-renew.C:
			err := n.o.Manager.RenewLease(ctx, &n.lease)
			switch {
			case err == nil:
				metrics.LeaseRenewals.WithLabelValues("ok").Inc()
				metrics.LeaseExpiration.Set(expiry(n.lease))
				n.log.V(1).Info("Renewed lease", "subnet", n.lease.Subnet, "expires", n.lease.Expiration)
				renew.Reset(n.renewDelay())
			case errors.Is(err, subnet.ErrLeaseLost):
				metrics.LeaseRenewals.WithLabelValues("lost").Inc()
				n.log.Info("Own lease is gone; acquiring again", "subnet", n.lease.Subnet, "reason", err)
				n.reacquire(ctx)
				renew.Reset(n.renewDelay())
				apply()
			case ctx.Err() == nil:
				metrics.LeaseRenewals.WithLabelValues("error").Inc()
				n.log.Error(err, "Renewing lease failed; retrying", "in", n.o.RenewRetry)
				renew.Reset(n.o.RenewRetry)
			}
		}
	}
}

// renewDelay is the wait until the next renewal; a reservation never expires.
func (n *node) renewDelay() time.Duration {
	if n.lease.Reservation() {
		return 1<<63 - 1
	}
	return max(n.lease.Expiration.Sub(n.o.Now())-n.o.RenewMargin, 0)
}

// update folds a batch of events into the lease set. It reports whether our
// own lease was removed or taken by another node.
func (n *node) update(batch []subnet.Event) (lost bool) {
	n.leases.reserve(len(batch))
	for _, ev := range batch {
		l := ev.Lease
		if ev.Type == subnet.EventRemoved {
			n.leases.remove(l.Subnet)
			if l.Subnet == n.lease.Subnet {
				n.log.Info("Own lease was removed from etcd", "subnet", l.Subnet)
				lost = true
			}
			continue
		}
		if !n.cfg.Network.Contains(l.Subnet.Addr()) || l.Subnet.Bits() != n.cfg.SubnetLen {
			key := l.Subnet.String() + " " + l.Attrs.PublicIP.String()
			if !n.skipped[key] {
				n.skipped[key] = true
				n.log.Info("Skipping a lease that does not fit the network config; remove it from etcd",
					"subnet", l.Subnet, "publicIP", l.Attrs.PublicIP, "network", n.cfg.Network, "subnetLen", n.cfg.SubnetLen)
			}
			n.leases.remove(l.Subnet)
			continue
		}
		n.leases.put(l)
		if l.Subnet == n.lease.Subnet && l.Attrs.PublicIP != n.attrs.PublicIP {
			n.log.Info("Own subnet is now leased by another node", "subnet", l.Subnet, "publicIP", l.Attrs.PublicIP)
			lost = true
		}
	}
	return lost
}

// apply hands the current lease set to the backend.
func (n *node) apply(ctx context.Context) error {
	start := time.Now()
	err := n.be.Apply(ctx, n.lease, n.remotes())
	metrics.ReconcileDuration.Observe(time.Since(start).Seconds())
	metrics.Leases.Set(float64(n.leases.len()))
	if err != nil {
		metrics.ReconcileErrors.Inc()
	}
	return err
}

func expiry(l subnet.Lease) float64 {
	if l.Reservation() {
		return 0
	}
	return float64(l.Expiration.Unix())
}

// remotes is every lease but our own: a view of the lease set, which
// backends neither keep nor change.
func (n *node) remotes() []subnet.Lease { return n.leases.except(n.lease.Subnet) }

func (n *node) previousSubnet() netip.Prefix {
	env, err := subnet.ReadEnv(n.o.SubnetFile)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return netip.Prefix{}
	case err != nil:
		n.log.Info("Ignoring the previous subnet file; a new subnet will be chosen", "reason", err)
		return netip.Prefix{}
	case env.Network != n.cfg.Network:
		n.log.Info("Previous subnet file is for another network; a new subnet will be chosen", "file", n.o.SubnetFile, "network", env.Network)
		return netip.Prefix{}
	}
	return env.Subnet
}

// acquire obtains a lease, retrying transient errors with back-off until
// ctx ends. A full range is returned as an error.
func (n *node) acquire(ctx context.Context, prev netip.Prefix) (*subnet.Lease, error) {
	wait := 500 * time.Millisecond
	for {
		l, err := n.o.Manager.AcquireLease(ctx, n.cfg, n.attrs, prev)
		if err == nil {
			n.log.Info("Acquired lease", "subnet", l.Subnet, "reservation", l.Reservation(), "expires", l.Expiration)
			return l, nil
		}
		if errors.Is(err, subnet.ErrNoFreeSubnets) || ctx.Err() != nil {
			return nil, fmt.Errorf("acquiring lease: %w", err)
		}
		n.log.Error(err, "Acquiring lease failed; retrying", "in", wait)
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(wait):
		}
		wait = min(wait*2, 30*time.Second)
	}
}

// reacquire replaces a lost lease, preferring the same subnet, and
// re-announces it. It keeps trying until ctx ends.
func (n *node) reacquire(ctx context.Context) {
	for ctx.Err() == nil {
		l, err := n.acquire(ctx, n.lease.Subnet)
		if err != nil {
			if ctx.Err() == nil {
				n.log.Error(err, "Re-acquiring lease failed; retrying in 30s")
				select {
				case <-ctx.Done():
				case <-time.After(30 * time.Second):
				}
			}
			continue
		}
		changed := l.Subnet != n.lease.Subnet
		n.setLease(*l)
		if changed {
			n.log.Info("Lease moved to a new subnet", "subnet", l.Subnet)
			if err := n.publish(ctx); err != nil {
				n.log.Error(err, "Publishing the new lease failed")
			}
		}
		return
	}
}

func (n *node) setLease(l subnet.Lease) {
	metrics.LeaseAcquisitions.Inc()
	metrics.LeaseExpiration.Set(expiry(l))
	n.lease = l
	n.leases.put(l)
	if n.o.OnLease != nil {
		n.o.OnLease(l)
	}
}

// publish writes subnet.env and (re)starts the rule keeper for the lease,
// returning once both are in place.
func (n *node) publish(ctx context.Context) error {
	rulesIn, err := n.startRules(ctx)
	if err != nil {
		return err
	}
	if err := n.writeEnv(); err != nil {
		return err
	}
	return n.awaitRules(ctx, rulesIn)
}

func (n *node) writeEnv() error {
	env := subnet.Env{Network: n.cfg.Network, Subnet: n.lease.Subnet, MTU: n.mtu, IPMasq: n.o.IPMasq}
	return subnet.WriteEnv(n.o.SubnetFile, env)
}

// startRules (re)starts the rule keeper for the current lease: a goroutine
// installs the rules, reports the result on the returned channel (nil
// without Options.Rules) and, if that succeeded, keeps them in place until
// stopRules.
func (n *node) startRules(ctx context.Context) (<-chan error, error) {
	if n.o.Rules == nil {
		return nil, nil
	}
	n.stopRules()
	r, err := n.o.Rules(n.cfg.Network, n.lease.Subnet, n.o.IPMasq)
	if err != nil {
		return nil, fmt.Errorf("setting up iptables rules: %w", err)
	}
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	installed := make(chan error, 1)
	n.rulesCancel, n.rulesDone = cancel, done
	go func() {
		defer close(done)
		err := r.Ensure(rctx)
		installed <- err
		if err != nil {
			return
		}
		if err := r.Run(rctx); err != nil && rctx.Err() == nil {
			n.log.Error(err, "Keeping iptables rules in place stopped")
		}
	}()
	return installed, nil
}

// awaitRules waits for the first install started by startRules.
func (n *node) awaitRules(ctx context.Context, installed <-chan error) error {
	if installed == nil {
		return nil
	}
	select {
	case err := <-installed:
		if err != nil {
			return fmt.Errorf("installing iptables rules: %w", err)
		}
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (n *node) stopRules() {
	if n.rulesCancel != nil {
		n.rulesCancel()
		<-n.rulesDone
		n.rulesCancel = nil
	}
}
