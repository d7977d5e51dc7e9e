package etcdv2

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"path"
	"strings"
	"sync"
	"time"

	client "go.etcd.io/etcd/client/v2"
	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/subnet"
)

// LeaseTTL is the TTL of a lease key, set on creation and on each renewal.
const LeaseTTL = 24 * time.Hour

// maxAcquireAttempts bounds how often AcquireLease starts over after losing
// a race for a subnet to another node.
const maxAcquireAttempts = 10

// errContention is returned when AcquireLease lost the race for a subnet
// maxAcquireAttempts times in a row; calling it again is the remedy.
var errContention = errors.New("other nodes kept taking the chosen subnets first")

// Manager is the etcd v2 lease store. It implements subnet.Manager and is
// safe for use by several goroutines.
type Manager struct {
	api         keysAPI
	prefix      string
	callTimeout time.Duration
	log         klog.Logger

	// Time and chance are inputs, so that tests can shorten them.
	configRetry time.Duration        // wait between reads of a missing config
	pollTimeout time.Duration        // longest single watch long poll
	minBackoff  time.Duration        // first wait after a failed request
	maxBackoff  time.Duration        // longest wait between failed requests
	intn        func(n int) int      // random choice among free subnets
	jitter      func() time.Duration // pause after losing a subnet race

	// listing is the subnets directory as the last acquisition read it,
	// kept for the first WatchLeases to start from instead of reading it
	// again (at start-up, with thousands of leases, that read is a large
	// part of the time to ready). Once a watch has started nothing is kept.
	listing struct {
		sync.Mutex
		watched bool
		root    *client.Node // nil: the directory does not exist
		index   uint64
		ok      bool
	}
}

// keepListing stores a listing of the subnets directory for the first
// watch, unless one has started.
func (m *Manager) keepListing(root *client.Node, index uint64) {
	m.listing.Lock()
	defer m.listing.Unlock()
	if !m.listing.watched {
		m.listing.root, m.listing.index, m.listing.ok = root, index, true
	}
}

// keepOwn adds the key AcquireLease wrote to the kept listing, so that the
// first watch knows the own lease from its start: a store wiped before the
// watch saw the key written still reports it removed (and the daemon
// writes it again).
func (m *Manager) keepOwn(key, value string) {
	m.listing.Lock()
	defer m.listing.Unlock()
	if m.listing.watched || !m.listing.ok {
		return
	}
	root := &client.Node{Key: m.subnetsDir(), Dir: true}
	if m.listing.root != nil {
		c := *m.listing.root
		root = &c
	}
	nodes := make(client.Nodes, 0, len(root.Nodes)+1)
	for _, n := range root.Nodes {
		if n.Key != key {
			nodes = append(nodes, n)
		}
	}
	root.Nodes = append(nodes, &client.Node{Key: key, Value: value, ModifiedIndex: m.listing.index})
	m.listing.root = root
}

// takeListing returns the kept listing, if any, and stops keeping them.
func (m *Manager) takeListing() (root *client.Node, index uint64, ok bool) {
	m.listing.Lock()
	defer m.listing.Unlock()
	root, index, ok = m.listing.root, m.listing.index, m.listing.ok
	m.listing.root, m.listing.ok, m.listing.watched = nil, false, true
	return root, index, ok
}

var _ subnet.Manager = (*Manager)(nil)

// New returns a Manager for the etcd cluster of opts. It does not contact
// etcd; the first request does.
func New(opts Options) (*Manager, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	api, err := newKeysAPI(&opts)
	if err != nil {
		return nil, err
	}
	return newManager(api, opts), nil
}

// newManager wraps api; opts must have its defaults applied.
func newManager(api keysAPI, opts Options) *Manager {
	return &Manager{
		api:         api,
		prefix:      opts.Prefix,
		callTimeout: opts.RequestTimeout * time.Duration(len(opts.Endpoints)+1),
		log:         opts.Logger,
		configRetry: time.Second,
		pollTimeout: time.Minute,
		minBackoff:  100 * time.Millisecond,
		maxBackoff:  time.Second, // as flannel: watches resume within ~1 s of etcd coming back
		intn:        rand.IntN,
		jitter:      func() time.Duration { return rand.N(50 * time.Millisecond) },
	}
}

func (m *Manager) configKey() string  { return m.prefix + "/config" }
func (m *Manager) subnetsDir() string { return m.prefix + "/subnets" }
func (m *Manager) leaseKey(l subnet.Lease) string {
	return m.subnetsDir() + "/" + ip.LeaseKey(l.Subnet, l.IPv6Subnet)
}

// get and set bound one call to the cluster (every member tried) and make
// a multi-member failure one line.
func (m *Manager) get(ctx context.Context, key string, opts *client.GetOptions) (*client.Response, error) {
	ctx, cancel := context.WithTimeout(ctx, m.callTimeout)
	defer cancel()
	resp, err := m.api.Get(ctx, key, opts)
	return resp, flatError(err)
}

func (m *Manager) set(ctx context.Context, key, value string, opts *client.SetOptions) (*client.Response, error) {
	ctx, cancel := context.WithTimeout(ctx, m.callTimeout)
	defer cancel()
	resp, err := m.api.Set(ctx, key, value, opts)
	return resp, flatError(err)
}

// clusterError is client.ClusterError on one line, keeping the member
// errors reachable by errors.Is and errors.As.
type clusterError struct{ errs []error }

func (e *clusterError) Error() string {
	var b strings.Builder
	b.WriteString("no etcd member answered")
	for _, err := range e.errs {
		b.WriteString("; ")
		b.WriteString(strings.TrimSpace(err.Error()))
	}
	return b.String()
}

func (e *clusterError) Unwrap() []error { return e.errs }

func flatError(err error) error {
	var ce *client.ClusterError
	if errors.As(err, &ce) {
		return &clusterError{errs: ce.Errors}
	}
	return err
}

// GetNetworkConfig implements subnet.Manager.
func (m *Manager) GetNetworkConfig(ctx context.Context) (*subnet.Config, error) {
	key := m.configKey()
	lastReason := ""
	for {
		resp, err := m.get(ctx, key, &client.GetOptions{Quorum: true})
		if err == nil {
			if resp.Node == nil || resp.Node.Dir {
				return nil, fmt.Errorf("%w at %s: it is a directory; store the JSON config as the value of this key", subnet.ErrInvalidConfig, key)
			}
			cfg, err := subnet.ParseConfig([]byte(resp.Node.Value))
			if err != nil {
				return nil, subnet.ConfigErrorAt(key, err)
			}
			return cfg, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		code := etcdCode(err)
		if code == client.ErrorCodeUnauthorized {
			return nil, fmt.Errorf("reading network config at %s: etcd refused access (%w); check the etcd username, password and client certificate", key, err)
		}
		reason := "waiting for the network config to be written"
		if code != client.ErrorCodeKeyNotFound {
			reason = "reading the network config failed: " + err.Error()
		}
		if reason != lastReason {
			m.log.Info("Network config not available yet; retrying every "+m.configRetry.String(), "key", key, "reason", reason)
			lastReason = reason
		}
		if !subnet.Sleep(ctx, m.configRetry) {
			return nil, ctx.Err()
		}
	}
}

// AcquireLease implements subnet.Manager.
func (m *Manager) AcquireLease(ctx context.Context, cfg *subnet.Config, attrs subnet.LeaseAttrs, prev subnet.Lease) (*subnet.Lease, error) {
	if err := subnet.CheckAttrs(cfg, attrs); err != nil {
		return nil, fmt.Errorf("acquiring lease: %w", err)
	}
	raw, err := attrs.Marshal()
	if err != nil {
		return nil, fmt.Errorf("acquiring lease: encoding lease value: %w", err)
	}
	value := string(raw)
	for range maxAcquireAttempts {
		lease, err := m.tryAcquire(ctx, cfg, attrs, value, prev)
		if err != nil {
			return nil, fmt.Errorf("acquiring lease: %w", err)
		}
		if lease != nil {
			m.keepOwn(m.leaseKey(*lease), value)
			return lease, nil
		}
		if !subnet.Sleep(ctx, m.jitter()) {
			return nil, ctx.Err()
		}
	}
	return nil, fmt.Errorf("acquiring lease: %w (%d attempts)", errContention, maxAcquireAttempts)
}

// tryAcquire makes one attempt; a nil lease and nil error mean another node
// changed the subnets directory under us and the caller should start over.
func (m *Manager) tryAcquire(ctx context.Context, cfg *subnet.Config, attrs subnet.LeaseAttrs, value string, prev subnet.Lease) (*subnet.Lease, error) {
	dir := m.subnetsDir()
	resp, err := m.get(ctx, dir, &client.GetOptions{Recursive: true, Quorum: true})
	var root *client.Node
	switch {
	case err == nil:
		root = resp.Node
		m.keepListing(root, resp.Index)
	case etcdCode(err) == client.ErrorCodeKeyNotFound:
		var e client.Error
		if errors.As(err, &e) {
			m.keepListing(nil, e.Index)
		}
	default:
		return nil, fmt.Errorf("listing %s: %w", dir, err)
	}
	alloc := newAllocation(cfg, dir, root)

	if own, ok := alloc.own(cfg, attrs); ok {
		l := own.lease()
		l.Attrs = attrs
		reservation := own.node.Expiration == nil
		if reservation && own.node.Value == value {
			return &l, nil
		}
		// PrevIndex: only if nobody changed the key since we listed it.
		opts := &client.SetOptions{PrevExist: client.PrevExist, PrevIndex: own.node.ModifiedIndex}
		if !reservation {
			opts.TTL = LeaseTTL
		}
		r, err := m.set(ctx, m.leaseKey(l), value, opts)
		switch code := etcdCode(err); {
		case err == nil:
			return leaseFrom(l, r.Node), nil
		case code == client.ErrorCodeKeyNotFound || code == client.ErrorCodeTestFailed:
			return nil, nil
		default:
			return nil, fmt.Errorf("updating lease %s: %w", l.Key(), err)
		}
	}

	l, ok := alloc.choose(cfg, prev, m.intn)
	if !ok {
		return nil, subnet.ErrNoFreeSubnets
	}
	l.Attrs = attrs
	key := m.leaseKey(l)
	r, err := m.set(ctx, key, value, &client.SetOptions{PrevExist: client.PrevNoExist, TTL: LeaseTTL})
	switch code := etcdCode(err); {
	case err == nil:
	case code == client.ErrorCodeNodeExist:
		return nil, nil
	default:
		return nil, fmt.Errorf("creating lease %s: %w", l.Key(), err)
	}
	if cfg.EnableIPv6 || alloc.dual {
		// Keys that differ only in their IPv6 (or IPv4) part can claim the
		// same subnet at once; the older key keeps it.
		won, err := m.firstClaim(ctx, key, r.Node.CreatedIndex, l)
		if err != nil || !won {
			return nil, err
		}
	}
	return leaseFrom(l, r.Node), nil
}

// firstClaim lists the subnets directory after our key (created at index)
// and reports whether no older key claims a subnet of l. A later claim
// loses: its key is deleted (only if it is still the one we wrote) and the
// caller starts over.
func (m *Manager) firstClaim(ctx context.Context, key string, index uint64, l subnet.Lease) (bool, error) {
	resp, err := m.get(ctx, m.subnetsDir(), &client.GetOptions{Recursive: true, Quorum: true})
	if err != nil {
		return false, fmt.Errorf("listing %s: %w", m.subnetsDir(), err)
	}
	for _, n := range flatten(resp.Node) {
		if n.Key == key || n.CreatedIndex > index {
			continue
		}
		if subnet.ClaimsOf(path.Base(n.Key), l) {
			dctx, cancel := context.WithTimeout(ctx, m.callTimeout)
			_, err := m.api.Delete(dctx, key, &client.DeleteOptions{PrevIndex: index})
			cancel()
			if err != nil && etcdCode(err) == 0 {
				return false, fmt.Errorf("giving up lease %s to %s: %w", l.Key(), n.Key, err)
			}
			return false, nil
		}
	}
	return true, nil
}

func leaseFrom(l subnet.Lease, n *client.Node) *subnet.Lease {
	if n != nil && n.Expiration != nil {
		l.Expiration = *n.Expiration
	}
	return &l
}

// RenewLease implements subnet.Manager. A lease with TTL costs one
// compare-and-swap; a reservation one read.
func (m *Manager) RenewLease(ctx context.Context, lease *subnet.Lease) error {
	key := m.leaseKey(*lease)
	if lease.Reservation() {
		resp, err := m.get(ctx, key, nil)
		switch {
		case etcdCode(err) == client.ErrorCodeKeyNotFound:
			return fmt.Errorf("renewing lease %s: %w: the reservation was deleted", lease.Subnet, subnet.ErrLeaseLost)
		case err != nil:
			return fmt.Errorf("renewing lease %s: %w", lease.Subnet, err)
		}
		attrs, err := subnet.ParseLeaseAttrs([]byte(resp.Node.Value))
		if err != nil || attrs.PublicIP != lease.Attrs.PublicIP {
			return fmt.Errorf("renewing lease %s: %w: the key now holds another value", lease.Subnet, subnet.ErrLeaseLost)
		}
		lease.Expiration = leaseFrom(*lease, resp.Node).Expiration
		return nil
	}

	raw, err := lease.Attrs.Marshal()
	if err != nil {
		return fmt.Errorf("renewing lease %s: encoding lease value: %w", lease.Subnet, err)
	}
	value := string(raw)
	// PrevValue: the key must still hold exactly what we wrote.
	resp, err := m.set(ctx, key, value, &client.SetOptions{PrevExist: client.PrevExist, PrevValue: value, TTL: LeaseTTL})
	switch code := etcdCode(err); {
	case err == nil:
	case code == client.ErrorCodeKeyNotFound:
		return fmt.Errorf("renewing lease %s: %w: the key was deleted or expired", lease.Subnet, subnet.ErrLeaseLost)
	case code == client.ErrorCodeTestFailed:
		return fmt.Errorf("renewing lease %s: %w: the key now holds another value", lease.Subnet, subnet.ErrLeaseLost)
	default:
		return fmt.Errorf("renewing lease %s: %w", lease.Subnet, err)
	}
	lease.Expiration = leaseFrom(*lease, resp.Node).Expiration
	return nil
}
