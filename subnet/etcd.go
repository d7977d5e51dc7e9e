package subnet

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/url"
	"strings"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/internal/metrics"
)

// Defaults of EtcdOptions, the same as flannel's.
const (
	DefaultEtcdPrefix         = "/coreos.com/network"
	DefaultEtcdRequestTimeout = 5 * time.Second
)

// DefaultEtcdEndpoints are the client URLs used when EtcdOptions.Endpoints is
// empty.
var DefaultEtcdEndpoints = []string{"http://127.0.0.1:4001", "http://127.0.0.1:2379"}

// EtcdLeaseTTL is the TTL of a lease key, set on creation and on each
// renewal (v3: of the etcd lease the key is attached to).
const EtcdLeaseTTL = 24 * time.Hour

// EtcdOptions configure an etcd store, v2 or v3.
type EtcdOptions struct {
	// Endpoints are the client URLs of the etcd members, for example
	// "https://10.0.0.1:2379". A request that fails on one member is tried
	// on another, so the daemon keeps working while a member is down. Empty
	// means DefaultEtcdEndpoints.
	Endpoints []string
	// CertFile and KeyFile are the PEM client certificate and key for TLS
	// client authentication; both or neither.
	CertFile string
	KeyFile  string
	// CAFile is the PEM bundle that verifies the members' certificates;
	// empty means the system roots.
	CAFile string
	// Username and Password authenticate to etcd when Username is set. They
	// are never logged.
	Username string
	Password string
	// Prefix is the key directory holding config and subnets/; empty means
	// DefaultEtcdPrefix.
	Prefix string
	// RequestTimeout bounds one request to one member (connection, TLS,
	// authentication, answer); watches are not bound by it. Zero means
	// DefaultEtcdRequestTimeout.
	RequestTimeout time.Duration
	// Logger receives the manager's logs; the zero Logger means
	// klog.Background().
	Logger klog.Logger
}

// WithDefaults returns a copy of opts with the defaults filled in, the
// prefix normalised ("/a/b/" → "/a/b") and the endpoints checked.
func (opts EtcdOptions) WithDefaults() (EtcdOptions, error) {
	if len(opts.Endpoints) == 0 {
		opts.Endpoints = DefaultEtcdEndpoints
	}
	opts.Endpoints = append([]string(nil), opts.Endpoints...)
	for _, ep := range opts.Endpoints {
		u, err := url.Parse(ep)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return opts, fmt.Errorf("invalid etcd endpoint %q: write it like http://127.0.0.1:2379 or https://etcd1:2379", ep)
		}
	}
	if opts.Prefix == "" {
		opts.Prefix = DefaultEtcdPrefix
	}
	if !strings.HasPrefix(opts.Prefix, "/") {
		return opts, fmt.Errorf("invalid etcd prefix %q: it must start with /, like %s", opts.Prefix, DefaultEtcdPrefix)
	}
	opts.Prefix = strings.TrimRight(opts.Prefix, "/")
	if opts.Prefix == "" {
		return opts, fmt.Errorf("invalid etcd prefix \"/\": use a directory such as %s", DefaultEtcdPrefix)
	}
	if opts.RequestTimeout <= 0 {
		opts.RequestTimeout = DefaultEtcdRequestTimeout
	}
	if opts.Logger.GetSink() == nil {
		opts.Logger = klog.Background()
	}
	return opts, nil
}

// EtcdManager is the lease manager of an etcd store, over its Keyspace
// adapter: the network config, allocation, acquisition, renewal,
// reservations and the watches live here once for v2 and v3. It implements
// Manager and is safe for use by several goroutines.
type EtcdManager struct {
	ks     Keyspace
	prefix string
	log    klog.Logger

	// Time and chance are inputs, so that tests can shorten them.
	now           func() time.Time
	configRetry   time.Duration        // wait between reads of a missing config
	checkInterval time.Duration        // a quiet watch looks at the store's revision this often
	minBackoff    time.Duration        // first wait after a failed request
	maxBackoff    time.Duration        // longest wait between failed requests
	intn          func(n int) int      // random choice among free subnets
	jitter        func() time.Duration // pause after losing a subnet race

	// listing is the subnets prefix as the last acquisition read it, kept
	// for the first WatchLeases to start from instead of reading it again
	// (at start-up, with thousands of leases, that read is a large part of
	// the time to ready). Once a watch has started nothing is kept.
	listing struct {
		sync.Mutex
		watched, ok bool
		kvs         []KV
		rev         Rev
	}
}

var _ Manager = (*EtcdManager)(nil)

// NewEtcdManager returns the lease manager of ks, whose keys are under
// opts.Prefix (opts has its defaults applied).
func NewEtcdManager(ks Keyspace, opts EtcdOptions) *EtcdManager {
	return &EtcdManager{
		ks:            counted{ks},
		prefix:        opts.Prefix,
		log:           opts.Logger,
		now:           time.Now,
		configRetry:   time.Second,
		checkInterval: time.Minute,
		minBackoff:    100 * time.Millisecond,
		// As flannel: watches resume within about a second of etcd
		// answering again.
		maxBackoff: time.Second,
		intn:       rand.IntN,
		jitter:     func() time.Duration { return rand.N(50 * time.Millisecond) },
	}
}

// ConfigKey is the key of the network config.
func (m *EtcdManager) ConfigKey() string { return m.prefix + "/config" }

// subnetsDir is the prefix of the lease keys, with its trailing slash.
func (m *EtcdManager) subnetsDir() string { return m.prefix + "/subnets/" }

// ConfigExists reports whether the config key exists, with one read; it
// does not wait.
func (m *EtcdManager) ConfigExists(ctx context.Context) (bool, error) {
	kv, _, err := m.ks.Get(ctx, m.ConfigKey())
	return kv != nil || errors.Is(err, ErrDirectory), ignore(err, ErrDirectory)
}

func ignore(err, target error) error {
	if errors.Is(err, target) {
		return nil
	}
	return err
}

// GetNetworkConfig implements Manager.
func (m *EtcdManager) GetNetworkConfig(ctx context.Context) (*Config, error) {
	key := m.ConfigKey()
	lastReason := ""
	for {
		kv, _, err := m.ks.Get(ctx, key)
		switch {
		case err == nil && kv != nil:
			cfg, err := ParseConfig(kv.Value)
			if err != nil {
				return nil, ConfigErrorAt(key, err)
			}
			return cfg, nil
		case ctx.Err() != nil:
			return nil, ctx.Err()
		case errors.Is(err, ErrDirectory):
			return nil, directoryConfig(key)
		case errors.Is(err, ErrAccessDenied):
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
		if !Sleep(ctx, m.configRetry) {
			return nil, ctx.Err()
		}
	}
}

func directoryConfig(key string) error {
	return fmt.Errorf("%w at %s: it is a directory; store the JSON config as the value of this key", ErrInvalidConfig, key)
}

// keepListing stores a listing of the subnets prefix for the first watch,
// unless one has started.
func (m *EtcdManager) keepListing(kvs []KV, rev Rev) {
	m.listing.Lock()
	defer m.listing.Unlock()
	if !m.listing.watched {
		m.listing.kvs, m.listing.rev, m.listing.ok = kvs, rev, true
	}
}

// keepOwn adds the key AcquireLease wrote to the kept listing, so that the
// first watch knows the own lease from its start: a store wiped before the
// watch saw the key written still reports it removed (and the daemon
// writes it again).
func (m *EtcdManager) keepOwn(own KV) {
	m.listing.Lock()
	defer m.listing.Unlock()
	if m.listing.watched || !m.listing.ok {
		return
	}
	kvs := make([]KV, 0, len(m.listing.kvs)+1)
	for _, kv := range m.listing.kvs {
		if kv.Key != own.Key {
			kvs = append(kvs, kv)
		}
	}
	m.listing.kvs = append(kvs, own)
}

// takeListing returns the kept listing, if any, and stops keeping them.
func (m *EtcdManager) takeListing() (kvs []KV, rev Rev, ok bool) {
	m.listing.Lock()
	defer m.listing.Unlock()
	kvs, rev, ok = m.listing.kvs, m.listing.rev, m.listing.ok
	m.listing.kvs, m.listing.ok, m.listing.watched = nil, false, true
	return kvs, rev, ok
}

// counted counts the failed requests of a Keyspace in metrics.EtcdErrors;
// a cancelled caller's are not failures, nor is a compacted watch.
type counted struct{ ks Keyspace }

func count(ctx context.Context, op string, err error) {
	if err != nil && ctx.Err() == nil && !errors.Is(err, ErrCompacted) && !errors.Is(err, ErrDirectory) {
		metrics.EtcdErrors.WithLabelValues(op).Inc()
	}
}

func (c counted) Get(ctx context.Context, key string) (*KV, Rev, error) {
	kv, rev, err := c.ks.Get(ctx, key)
	count(ctx, "get", err)
	return kv, rev, err
}

func (c counted) List(ctx context.Context, prefix string) ([]KV, Rev, error) {
	kvs, rev, err := c.ks.List(ctx, prefix)
	count(ctx, "get", err)
	return kvs, rev, err
}

func (c counted) Create(ctx context.Context, key string, value []byte, ttl time.Duration) (KV, bool, error) {
	kv, ok, err := c.ks.Create(ctx, key, value, ttl)
	count(ctx, "create", err)
	return kv, ok, err
}

func (c counted) Update(ctx context.Context, kv KV, value []byte, ttl time.Duration) (KV, bool, error) {
	kv, ok, err := c.ks.Update(ctx, kv, value, ttl)
	count(ctx, "update", err)
	return kv, ok, err
}

func (c counted) Delete(ctx context.Context, kv KV) error {
	err := c.ks.Delete(ctx, kv)
	count(ctx, "delete", err)
	return err
}

func (c counted) Watch(ctx context.Context, prefix string, after int64) Watch {
	return countedWatch{c.ks.Watch(ctx, prefix, after)}
}

type countedWatch struct{ w Watch }

func (c countedWatch) Next(ctx context.Context) ([]Change, Rev, error) {
	chs, rev, err := c.w.Next(ctx)
	count(ctx, "watch", err)
	return chs, rev, err
}

// SendEvents sends evs on events unless ctx ends first.
func SendEvents(ctx context.Context, events chan<- []Event, evs []Event) error {
	select {
	case events <- evs:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
