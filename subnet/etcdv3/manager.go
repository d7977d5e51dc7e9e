package etcdv3

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/subnet"
)

// LeaseTTL is the TTL of the etcd lease a lease key is attached to.
const LeaseTTL = 24 * time.Hour

// maxAcquireAttempts bounds how often AcquireLease starts over after losing
// a race for a subnet to another node.
const maxAcquireAttempts = 10

// errContention is returned when AcquireLease lost the race for a subnet
// maxAcquireAttempts times in a row; calling it again is the remedy.
var errContention = errors.New("other nodes kept taking the chosen subnets first")

// Manager is the etcd v3 lease store. It implements subnet.Manager and is
// safe for use by several goroutines.
type Manager struct {
	conn        *connector
	prefix      string
	callTimeout time.Duration
	log         klog.Logger

	// Time and chance are inputs, so that tests can shorten them.
	now           func() time.Time
	configRetry   time.Duration // wait between reads of a missing config
	checkInterval time.Duration // quiet-watch check of the store's revision
	// checkOnReconnect checks the store when the client reconnects; a
	// test turns it off to see the quiet-watch check alone.
	checkOnReconnect bool
	minBackoff       time.Duration        // first wait after a failed request
	maxBackoff       time.Duration        // longest wait between failed requests
	intn             func(n int) int      // random choice among free subnets
	jitter           func() time.Duration // pause after losing a subnet race

	// listing is the subnets prefix as the last acquisition read it, kept
	// for the first WatchLeases to start from instead of reading it again.
	// Once a watch has started nothing is kept.
	listing struct {
		sync.Mutex
		watched bool
		resp    *clientv3.GetResponse
	}
}

var _ subnet.Manager = (*Manager)(nil)

// New returns a Manager for the etcd cluster of opts. It does not contact
// etcd; the first request does. Close releases the client.
func New(opts Options) (*Manager, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	conn, err := newConnector(&opts)
	if err != nil {
		return nil, err
	}
	opts.Logger.V(1).Info("etcd v3 client configured", "endpoints", opts.Endpoints, "prefix", opts.Prefix, "username", opts.Username, "tls", opts.CertFile != "" || opts.CAFile != "")
	return newManager(conn, opts), nil
}

// newManager uses conn; opts must have its defaults applied.
func newManager(conn *connector, opts Options) *Manager {
	return &Manager{
		conn:             conn,
		prefix:           opts.Prefix,
		callTimeout:      opts.RequestTimeout * 2,
		log:              opts.Logger,
		now:              time.Now,
		configRetry:      time.Second,
		checkInterval:    time.Minute,
		checkOnReconnect: true,
		minBackoff:       100 * time.Millisecond,
		maxBackoff:       time.Second,
		intn:             rand.IntN,
		jitter:           func() time.Duration { return rand.N(50 * time.Millisecond) },
	}
}

// Close ends the connection to etcd; watches end with an error. It is
// idempotent.
func (m *Manager) Close() error { return m.conn.shutdown() }

func (m *Manager) configKey() string { return m.prefix + "/config" }

// subnetsDir is the prefix of the lease keys, with its trailing slash.
func (m *Manager) subnetsDir() string { return m.prefix + "/subnets/" }
func (m *Manager) leaseKey(l subnet.Lease) string {
	return m.subnetsDir() + ip.LeaseKey(l.Subnet, l.IPv6Subnet)
}

// call runs fn with the client, bounded by callTimeout, and counts its
// failure as op.
func (m *Manager) call(ctx context.Context, op string, fn func(ctx context.Context, st store) error) error {
	cctx, cancel := context.WithTimeout(ctx, m.callTimeout)
	defer cancel()
	st, err := m.conn.get(cctx)
	if err == nil {
		err = fn(cctx, st)
	}
	countError(ctx, op, err) // a timed-out call counts; a cancelled caller does not
	if err != nil && ctx.Err() == nil && cctx.Err() != nil && m.conn.diagnose != nil {
		// Timed out, most likely waiting for a connection: say why.
		if why := m.conn.diagnose(ctx); why != nil {
			err = fmt.Errorf("no etcd endpoint answers (%v): %w", why, err)
		}
	}
	return err
}

func (m *Manager) get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	var resp *clientv3.GetResponse
	err := m.call(ctx, "get", func(ctx context.Context, st store) error {
		var err error
		resp, err = st.Get(ctx, key, opts...)
		return err
	})
	return resp, err
}

func (m *Manager) txnResp(ctx context.Context, cmp []clientv3.Cmp, ops ...clientv3.Op) (*clientv3.TxnResponse, error) {
	var out *clientv3.TxnResponse
	err := m.call(ctx, "txn", func(ctx context.Context, st store) error {
		resp, err := st.Txn(ctx).If(cmp...).Then(ops...).Commit()
		out = resp
		return err
	})
	return out, err
}

func (m *Manager) txn(ctx context.Context, cmp []clientv3.Cmp, ops ...clientv3.Op) (bool, error) {
	var ok bool
	err := m.call(ctx, "txn", func(ctx context.Context, st store) error {
		resp, err := st.Txn(ctx).If(cmp...).Then(ops...).Commit()
		if err == nil {
			ok = resp.Succeeded
		}
		return err
	})
	return ok, err
}

// keepAlive refreshes the etcd lease id once and returns when it now
// expires and whether it was granted for less than LeaseTTL (a lease copied
// by flannel-migrate-v3 with the TTL it had left, or written by hand): such
// a lease would need renewing again at once, so the key moves to a new one.
func (m *Manager) keepAlive(ctx context.Context, id clientv3.LeaseID) (exp time.Time, short bool, err error) {
	var ttl int64
	err = m.call(ctx, "keepalive", func(ctx context.Context, st store) error {
		resp, err := st.KeepAliveOnce(ctx, id)
		if err == nil {
			ttl = resp.TTL
		}
		return err
	})
	return m.now().Add(time.Duration(ttl) * time.Second), ttl < int64(LeaseTTL/time.Second), err
}

// grant grants a new etcd lease of LeaseTTL into g, unless g holds one.
func (m *Manager) grant(ctx context.Context, g *grant) error {
	if g.id != 0 {
		return nil
	}
	err := m.call(ctx, "grant", func(ctx context.Context, st store) error {
		r, err := st.Grant(ctx, int64(LeaseTTL/time.Second))
		if err == nil {
			g.id, g.expires = r.ID, m.now().Add(time.Duration(r.TTL)*time.Second)
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("granting an etcd lease: %w", err)
	}
	return nil
}

// GetNetworkConfig implements subnet.Manager.
func (m *Manager) GetNetworkConfig(ctx context.Context) (*subnet.Config, error) {
	key := m.configKey()
	lastReason := ""
	for {
		resp, err := m.get(ctx, key)
		if err == nil && len(resp.Kvs) > 0 {
			cfg, err := subnet.ParseConfig(resp.Kvs[0].Value)
			if err != nil {
				return nil, subnet.ConfigErrorAt(key, err)
			}
			return cfg, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if authError(err) {
			return nil, fmt.Errorf("reading network config at %s: etcd refused access (%w); check the etcd username, password and client certificate", key, err)
		}
		reason := "waiting for the network config to be written"
		if err != nil {
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

// AcquireLease implements subnet.Manager. A new key is created with one
// transaction that succeeds only if the key does not exist, attached to an
// etcd lease granted for it; the granted lease is reused across attempts
// and revoked if none succeeds.
func (m *Manager) AcquireLease(ctx context.Context, cfg *subnet.Config, attrs subnet.LeaseAttrs, prev subnet.Lease) (*subnet.Lease, error) {
	if err := subnet.CheckAttrs(cfg, attrs); err != nil {
		return nil, fmt.Errorf("acquiring lease: %w", err)
	}
	raw, err := attrs.Marshal()
	if err != nil {
		return nil, fmt.Errorf("acquiring lease: encoding lease value: %w", err)
	}
	var g grant
	defer m.revokeUnused(ctx, &g)
	for range maxAcquireAttempts {
		lease, err := m.tryAcquire(ctx, cfg, attrs, string(raw), prev, &g)
		if err != nil {
			return nil, fmt.Errorf("acquiring lease: %w", err)
		}
		if lease != nil {
			m.keepOwn(m.leaseKey(*lease), raw, !lease.Reservation())
			return lease, nil
		}
		if !subnet.Sleep(ctx, m.jitter()) {
			return nil, ctx.Err()
		}
	}
	return nil, fmt.Errorf("acquiring lease: %w (%d attempts)", errContention, maxAcquireAttempts)
}

// grant is an etcd lease granted for a new key and not yet used.
type grant struct {
	id      clientv3.LeaseID
	expires time.Time
}

// revokeUnused revokes g if no key took it, so it does not linger for a day.
func (m *Manager) revokeUnused(ctx context.Context, g *grant) {
	if g.id == 0 {
		return
	}
	err := m.call(context.WithoutCancel(ctx), "revoke", func(ctx context.Context, st store) error {
		_, err := st.Revoke(ctx, g.id)
		return err
	})
	if err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		m.log.V(1).Info("Revoking an unused etcd lease failed; it expires by itself", "lease", int64(g.id), "err", err.Error())
	}
}

// tryAcquire makes one attempt; a nil lease and nil error mean another node
// changed the key under us and the caller should start over.
func (m *Manager) tryAcquire(ctx context.Context, cfg *subnet.Config, attrs subnet.LeaseAttrs, value string, prev subnet.Lease, g *grant) (*subnet.Lease, error) {
	dir := m.subnetsDir()
	resp, err := m.get(ctx, dir, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("listing %s: %w", dir, err)
	}
	m.keepListing(resp)
	alloc := newAllocation(cfg, dir, resp.Kvs)

	if own, ok := alloc.own(cfg, attrs); ok {
		return m.reuse(ctx, own, attrs, value, g)
	}

	l, ok := alloc.choose(cfg, prev, m.intn)
	if !ok {
		return nil, subnet.ErrNoFreeSubnets
	}
	if err := m.grant(ctx, g); err != nil {
		return nil, err
	}
	key := m.leaseKey(l)
	created, err := m.txnResp(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.Version(key), "=", 0)},
		clientv3.OpPut(key, value, clientv3.WithLease(g.id)))
	if err != nil {
		return nil, fmt.Errorf("creating lease %s: %w", l.Key(), err)
	}
	if !created.Succeeded {
		return nil, nil
	}
	g.id = 0 // taken by the key
	if cfg.EnableIPv6 || alloc.dual {
		// Keys that differ only in their IPv6 (or IPv4) part can claim the
		// same subnet at once; the older key keeps it.
		won, err := m.firstClaim(ctx, key, created.Header.Revision, l)
		if err != nil || !won {
			return nil, err
		}
	}
	l.Attrs, l.Expiration = attrs, g.expires
	return &l, nil
}

// firstClaim lists the subnets prefix after our key (created at revision)
// and reports whether no older key claims a subnet of l. A later claim
// loses: its key is deleted (only if it is still the one we wrote) and the
// caller starts over.
func (m *Manager) firstClaim(ctx context.Context, key string, revision int64, l subnet.Lease) (bool, error) {
	resp, err := m.get(ctx, m.subnetsDir(), clientv3.WithPrefix())
	if err != nil {
		return false, fmt.Errorf("listing %s: %w", m.subnetsDir(), err)
	}
	for _, kv := range resp.Kvs {
		name := string(kv.Key)
		if name == key || kv.CreateRevision > revision {
			continue
		}
		if subnet.ClaimsOf(name[strings.LastIndexByte(name, '/')+1:], l) {
			_, err := m.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(key), "=", revision)}, clientv3.OpDelete(key))
			if err != nil {
				return false, fmt.Errorf("giving up lease %s to %s: %w", l.Key(), name, err)
			}
			return false, nil
		}
	}
	return true, nil
}

// reuse makes own, the key holding our PublicIP, hold value: a reservation
// stays without etcd lease; a lease key keeps its etcd lease, refreshed, or
// moves to a new one (g) when its lease was granted short.
func (m *Manager) reuse(ctx context.Context, own entry, attrs subnet.LeaseAttrs, value string, g *grant) (*subnet.Lease, error) {
	key := string(own.kv.Key)
	l := &subnet.Lease{Subnet: own.subnet, IPv6Subnet: own.subnet6, Attrs: attrs}
	put, unchanged := clientv3.OpPut(key, value), string(own.kv.Value) == value
	moved := false
	if own.kv.Lease != 0 {
		id := clientv3.LeaseID(own.kv.Lease)
		exp, short, err := m.keepAlive(ctx, id)
		switch {
		case errors.Is(err, rpctypes.ErrLeaseNotFound):
			return nil, nil // it expired just now, and the key with it
		case err != nil:
			return nil, fmt.Errorf("refreshing the etcd lease of %s: %w", own.subnet, err)
		case short:
			if err := m.grant(ctx, g); err != nil {
				return nil, err
			}
			id, exp, unchanged, moved = g.id, g.expires, false, true
		}
		l.Expiration = exp
		put = clientv3.OpPut(key, value, clientv3.WithLease(id))
	}
	if unchanged {
		return l, nil
	}
	// Only if nobody changed the key since we listed it.
	ok, err := m.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(key), "=", own.kv.ModRevision)}, put)
	switch {
	case err != nil:
		return nil, fmt.Errorf("updating lease %s: %w", own.subnet, err)
	case !ok:
		return nil, nil
	}
	if moved {
		g.id = 0 // taken by the key
	}
	return l, nil
}

// keepListing stores a listing of the subnets prefix for the first watch,
// unless one has started.
func (m *Manager) keepListing(resp *clientv3.GetResponse) {
	m.listing.Lock()
	defer m.listing.Unlock()
	if !m.listing.watched {
		m.listing.resp = resp
	}
}

// keepOwn adds the key AcquireLease wrote to the kept listing, so that the
// first watch knows the own lease from its start: a store wiped before the
// watch saw the key written still reports it removed (and the daemon
// writes it again).
func (m *Manager) keepOwn(key string, value []byte, leased bool) {
	m.listing.Lock()
	defer m.listing.Unlock()
	resp := m.listing.resp
	if m.listing.watched || resp == nil {
		return
	}
	c := *resp
	kvs := make([]*mvccpb.KeyValue, 0, len(c.Kvs)+1)
	for _, kv := range c.Kvs {
		if string(kv.Key) != key {
			kvs = append(kvs, kv)
		}
	}
	own := &mvccpb.KeyValue{Key: []byte(key), Value: value, ModRevision: c.Header.Revision}
	if leased {
		own.Lease = 1 // only "attached to a lease" is read
	}
	c.Kvs = append(kvs, own)
	m.listing.resp = &c
}

// takeListing returns the kept listing, if any, and stops keeping them.
func (m *Manager) takeListing() *clientv3.GetResponse {
	m.listing.Lock()
	defer m.listing.Unlock()
	resp := m.listing.resp
	m.listing.resp, m.listing.watched = nil, true
	return resp
}

// RenewLease implements subnet.Manager: one read of the key, then one
// keep-alive of the etcd lease it is attached to (none for a reservation).
func (m *Manager) RenewLease(ctx context.Context, lease *subnet.Lease) error {
	key := m.leaseKey(*lease)
	resp, err := m.get(ctx, key)
	if err != nil {
		return fmt.Errorf("renewing lease %s: %w", lease.Subnet, err)
	}
	if len(resp.Kvs) == 0 {
		return fmt.Errorf("renewing lease %s: %w: the key was deleted or expired", lease.Subnet, subnet.ErrLeaseLost)
	}
	kv := resp.Kvs[0]
	if !holds(kv, lease.Attrs) {
		return fmt.Errorf("renewing lease %s: %w: the key now holds another value", lease.Subnet, subnet.ErrLeaseLost)
	}
	if kv.Lease == 0 {
		lease.Expiration = time.Time{}
		return nil
	}
	exp, short, err := m.keepAlive(ctx, clientv3.LeaseID(kv.Lease))
	switch {
	case errors.Is(err, rpctypes.ErrLeaseNotFound):
		return fmt.Errorf("renewing lease %s: %w: its etcd lease expired", lease.Subnet, subnet.ErrLeaseLost)
	case err != nil:
		return fmt.Errorf("renewing lease %s: %w", lease.Subnet, err)
	case short:
		if exp, err = m.moveToNewLease(ctx, kv); err != nil {
			return fmt.Errorf("renewing lease %s: %w", lease.Subnet, err)
		}
	}
	lease.Expiration = exp
	return nil
}

// moveToNewLease attaches kv's key, unchanged, to a new etcd lease of
// LeaseTTL and returns when that expires. The old lease is left to expire:
// other keys may be attached to it.
func (m *Manager) moveToNewLease(ctx context.Context, kv *mvccpb.KeyValue) (time.Time, error) {
	var g grant
	defer m.revokeUnused(ctx, &g)
	if err := m.grant(ctx, &g); err != nil {
		return time.Time{}, err
	}
	key := string(kv.Key)
	ok, err := m.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(key), "=", kv.ModRevision)},
		clientv3.OpPut(key, string(kv.Value), clientv3.WithLease(g.id)))
	switch {
	case err != nil:
		return time.Time{}, fmt.Errorf("moving %s to a new etcd lease: %w", key, err)
	case !ok:
		return time.Time{}, fmt.Errorf("moving %s to a new etcd lease: the key changed meanwhile; retrying later", key)
	}
	exp := g.expires
	g.id = 0
	return exp, nil
}

// holds reports whether kv is a lease of publicIP.
func holds(kv *mvccpb.KeyValue, attrs subnet.LeaseAttrs) bool {
	a, err := subnet.ParseLeaseAttrs(kv.Value)
	return err == nil && a.PublicIP == attrs.PublicIP && a.PublicIPv6 == attrs.PublicIPv6
}

// ConfigExists reports whether the config key exists in the v3 keyspace,
// with one read; it does not wait.
func (m *Manager) ConfigExists(ctx context.Context) (bool, error) {
	resp, err := m.get(ctx, m.configKey(), clientv3.WithCountOnly())
	if err != nil {
		return false, err
	}
	return resp.Count > 0, nil
}

// ClientTLS is the TLS config the manager would use for opts: nil when no
// TLS file is given.
func ClientTLS(opts Options) (*tls.Config, error) { return tlsConfig(&opts) }
