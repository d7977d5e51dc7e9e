// Package agent runs one node's lifecycle: wait for the network config,
// acquire a lease, hand it to the backend, publish subnet.env, keep the
// iptables rules in place, and then follow the other nodes' leases and renew
// our own until the context ends.
package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"runtime/debug"
	"sync"
	"time"

	"github.com/vishvananda/netns"
	"k8s.io/klog/v2"
	"k8s.io/utils/clock"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/internal/metrics"
	"github.com/flanneld-go/flanneld/pkg/nlbatch"
	"github.com/flanneld-go/flanneld/subnet"
)

// RuleSet is what the forward and masquerade rules of a node depend on.
type RuleSet struct {
	// Network and Lease are the IPv4 network and own subnet; invalid
	// without IPv4.
	Network, Lease netip.Prefix
	// IPv6Network and IPv6Lease are their IPv6 counterparts; invalid
	// without IPv6.
	IPv6Network, IPv6Lease netip.Prefix
	// IPMasq adds the masquerade rules; NFTables keeps the rules in
	// nftables instead of iptables (the config's EnableNFTables).
	IPMasq, NFTables bool
}

// Rules keeps the forward and masquerade rules of one lease in place.
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
	Rules func(RuleSet) (Rules, error)
	// RenewMargin is how long before expiry the lease is renewed (60 min).
	RenewMargin time.Duration
	// RenewRetry is the wait after a failed renewal (1 min).
	RenewRetry time.Duration
	// AcquireRetry is the first wait after a failed acquisition; it doubles
	// up to 30 s (500 ms).
	AcquireRetry time.Duration
	// RulesRetry is the first wait after a failed install of the rules; it
	// doubles up to 30 s (1 s).
	RulesRetry time.Duration
	// RouteResync is how often the backend re-checks the kernel (10 s).
	RouteResync time.Duration
	// Nexthops makes backends install routes through nexthop objects.
	Nexthops bool
	// Coalesce is how long lease events are gathered before one Apply (20 ms).
	Coalesce time.Duration
	// KernelEvents is the network namespace whose kernel events are
	// watched, so that what the backend owns is repaired as soon as it is
	// removed (netns.None() for the process's own, else the namespace of
	// Netlink); nil watches none: repairs wait for the resync.
	KernelEvents *netns.NsHandle
	// RepairDelay is how long after a kernel event the Apply that repairs
	// it runs, unless another event comes first (5 ms); RepairMax bounds
	// how long a stream of events postpones it (250 ms: deleting 10,000
	// routes takes the kernel about that long).
	RepairDelay, RepairMax time.Duration
	// RepairRetry is the first wait after a failed Apply; it doubles up
	// to RouteResync (100 ms).
	RepairRetry time.Duration
	// OnReady is called once, after subnet.env is written and the rules are
	// installed. Optional.
	OnReady func()
	// OnNotReady is called with the reason each time the first install of
	// the rules fails (and will be retried). Optional.
	OnNotReady func(reason string)
	// OnLease is called with each lease this node holds (the first and any
	// re-acquired one). Optional.
	OnLease func(subnet.Lease)
	// OnApply is called after each Apply with the config, the overlay MTU,
	// the own lease and the admitted remote leases (a view: copy what is
	// kept). It must not block. Optional.
	OnApply func(cfg *subnet.Config, mtu int, own subnet.Lease, remote []subnet.Lease)
	// Logger receives the daemon's logs (klog.Background()).
	Logger *klog.Logger
	// Clock is the time every timer of the daemon runs on (the real clock).
	Clock clock.WithTicker
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
	if o.RepairDelay == 0 {
		o.RepairDelay = 5 * time.Millisecond
	}
	if o.RepairMax == 0 {
		o.RepairMax = 250 * time.Millisecond
	}
	if o.RepairRetry == 0 {
		o.RepairRetry = 100 * time.Millisecond
	}
	if o.Logger == nil {
		l := klog.Background()
		o.Logger = &l
	}
	if o.AcquireRetry == 0 {
		o.AcquireRetry = 500 * time.Millisecond
	}
	if o.RulesRetry == 0 {
		o.RulesRetry = time.Second
	}
	if o.Clock == nil {
		o.Clock = clock.RealClock{}
	}
}

// maxRetry bounds the back-off of acquisitions and rule installs.
const maxRetry = 30 * time.Second

// node is the state Run owns; only Run's goroutine (the owner loop) touches
// it. Store I/O and rule installs run in goroutines it starts, whose results
// come back on channels the loop selects on.
type node struct {
	o      Options
	log    klog.Logger
	cfg    *subnet.Config
	be     backend.Backend
	attrs  subnet.LeaseAttrs
	mtu    int
	lease  subnet.Lease
	leases *leaseSet // every admitted lease, own included
	adm    *admission

	store  storeState
	rules  rulesState
	repair repairState

	envWritten bool
	ready      bool   // OnReady was called
	cfgSeen    string // state and detail of the stored config last reported

	wg sync.WaitGroup // the goroutines Run started
}

// Run runs the node until ctx ends, then returns nil. Kernel state (routes,
// devices, rules) is left in place so that a restart does not interrupt
// traffic. Errors before the first lease is programmed are returned; after
// that, errors are logged and retried.
func Run(ctx context.Context, o Options) error {
	o.defaults()
	n := &node{o: o, log: *o.Logger, leases: newLeaseSet(), cfgSeen: "current\x00"}
	n.store.results = make(chan storeResult)
	n.rules.status = make(chan error)
	// On return: stop the goroutines (cancel), then wait for them.
	defer n.wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer n.stopRules()

	cfg, err := o.Manager.GetNetworkConfig(ctx)
	if err != nil {
		return ctxOr(ctx, fmt.Errorf("getting network config: %w", err))
	}
	n.cfg = cfg
	metrics.SetNetworkConfig("current")
	n.log.Info("Network config", "network", cfg.Network, "subnetLen", cfg.SubnetLen,
		"subnetMin", cfg.SubnetMin, "subnetMax", cfg.SubnetMax, "backend", cfg.BackendType)

	switch {
	case cfg.EnableIPv4 && !o.Ext.PublicIP.Is4():
		return fmt.Errorf("the network config enables IPv4 but interface %s has no IPv4 address; give it one or choose another with --iface", o.Ext.Iface.Name)
	case cfg.EnableIPv6 && !o.Ext.PublicIPv6.Is6():
		return fmt.Errorf("the network config enables IPv6 but the interface has no IPv6 address: %s", o.Ext.MissingIPv6())
	}
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
	n.attrs = subnet.LeaseAttrs{PublicIP: o.Ext.PublicIP, BackendType: subnet.WireBackendType(cfg.BackendType), BackendData: pub.BackendData}
	if cfg.EnableIPv6 {
		n.attrs.PublicIPv6, n.attrs.BackendV6Data = o.Ext.PublicIPv6, pub.BackendV6Data
	}
	if !cfg.EnableIPv4 {
		n.attrs.PublicIP, n.attrs.BackendData = netip.IPv4Unspecified(), nil // as flannel writes an IPv6-only lease
	}
	n.adm = newAdmission(cfg, n.attrs.PublicIP, n.attrs.PublicIPv6, n.log)
	n.watchKernel(ctx, pub.Owned)

	lease, err := n.acquire(ctx, n.previousSubnet())
	if err != nil {
		return ctxOr(ctx, err)
	}
	n.setLease(*lease)
	// The rules depend only on the network and the lease: they are
	// installed while the backend is programmed.
	if err := n.startRules(ctx); err != nil {
		return ctxOr(ctx, err)
	}

	events := make(chan []subnet.Event, 64)
	werr := make(chan error, 1)
	n.goRun(func() { werr <- o.Manager.WatchLeases(ctx, events) })
	configs := make(chan subnet.ConfigUpdate, 1)
	n.goRun(func() {
		if err := o.Manager.WatchConfig(ctx, configs); err != nil && ctx.Err() == nil {
			n.log.Error(err, "Watching the network config stopped")
		}
	})

	// Program the kernel from the first snapshot, never from an empty set:
	// an empty set would remove the routes a previous run left in place.
	select {
	case <-ctx.Done():
		return nil
	case err := <-werr:
		return ctxOr(ctx, fmt.Errorf("watching leases: %w", err))
	case batch := <-events:
		if n.update(batch) {
			n.store.lost = true
		}
	}
	if err := n.apply(ctx, "start"); err != nil {
		return ctxOr(ctx, fmt.Errorf("programming %s backend: %w", cfg.BackendType, err))
	}
	if err := n.writeEnv(); err != nil {
		return ctxOr(ctx, err)
	}
	n.maybeReady()
	if n.leases.len() >= burstEvents {
		debug.FreeOSMemory()
	}
	return n.loop(ctx, events, werr, configs)
}

// goRun runs f in a goroutine that Run waits for before it returns.
func (n *node) goRun(f func()) {
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		f()
	}()
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

// maybeReady calls OnReady once subnet.env is written and the rules are in.
func (n *node) maybeReady() {
	if n.ready || !n.envWritten || !n.rules.installed {
		return
	}
	n.ready = true
	if n.o.OnReady != nil {
		n.o.OnReady()
	}
	n.log.Info("Ready", "subnet", n.lease.Subnet, "ipv6Subnet", n.lease.IPv6Subnet, "publicIP", n.o.Ext.PublicIP, "leases", n.leases.len())
}

// apply hands the current lease set to the backend; cause says what asked
// for it (a label of metrics.Reconciles).
func (n *node) apply(ctx context.Context, cause string) error {
	metrics.Reconciles.WithLabelValues(cause).Inc()
	start := time.Now()
	remote := n.remotes()
	n.repair.writing(true)
	err := n.be.Apply(ctx, n.lease, remote)
	n.repair.writing(false)
	metrics.ReconcileDuration.Observe(time.Since(start).Seconds())
	if n.o.OnApply != nil {
		n.o.OnApply(n.cfg, n.mtu, n.lease, remote)
	}
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
func (n *node) remotes() []subnet.Lease { return n.leases.except(n.lease.Key()) }

// previousSubnet is the lease of the previous subnet file, if it is for
// this network config: the subnets to ask for again.
func (n *node) previousSubnet() subnet.Lease {
	env, err := subnet.ReadEnv(n.o.SubnetFile)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return subnet.Lease{}
	case err != nil:
		n.log.Info("Ignoring the previous subnet file; a new subnet will be chosen", "reason", err)
		return subnet.Lease{}
	}
	var prev subnet.Lease
	if n.cfg.EnableIPv4 && env.Network == n.cfg.Network {
		prev.Subnet = env.Subnet
	}
	if n.cfg.EnableIPv6 && env.IPv6Network == n.cfg.IPv6Network {
		prev.IPv6Subnet = env.IPv6Subnet
	}
	if !prev.Subnet.IsValid() && !prev.IPv6Subnet.IsValid() {
		n.log.Info("Previous subnet file is for another network; a new subnet will be chosen", "file", n.o.SubnetFile, "network", env.Network, "ipv6Network", env.IPv6Network)
	}
	return prev
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

func (n *node) writeEnv() error {
	env := subnet.Env{MTU: n.mtu, IPMasq: n.o.IPMasq}
	if n.cfg.EnableIPv4 {
		env.Network, env.Subnet = n.cfg.Network, n.lease.Subnet
	}
	if n.cfg.EnableIPv6 {
		env.IPv6Network, env.IPv6Subnet = n.cfg.IPv6Network, n.lease.IPv6Subnet
	}
	if err := subnet.WriteEnv(n.o.SubnetFile, env); err != nil {
		return err
	}
	n.envWritten = true
	return nil
}
