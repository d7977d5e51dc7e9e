// Package etcdv3 keeps the network config and the node leases in etcd's v3
// keyspace, in the layout of flannel v0.15 and later (one key per lease,
// attached to an etcd lease), so that nodes of both can share one cluster,
// and so that the daemon runs against etcd 3.6 and later, which have no v2
// API. It is an adapter: subnet.Keyspace on the v3 client; the lease
// manager is subnet.EtcdManager.
package etcdv3

import (
	"crypto/tls"

	"github.com/flanneld-go/flanneld/internal/etcdtls"
	"github.com/flanneld-go/flanneld/subnet"
)

// Defaults of Options.
const (
	DefaultPrefix         = subnet.DefaultEtcdPrefix
	DefaultRequestTimeout = subnet.DefaultEtcdRequestTimeout
)

// DefaultEndpoints are the client URLs used when Options.Endpoints is empty.
var DefaultEndpoints = subnet.DefaultEtcdEndpoints

// Options configure New. With v3 the client balances over the endpoints
// and moves to another member when one fails.
type Options = subnet.EtcdOptions

// Manager is the etcd v3 lease store: subnet.EtcdManager on the v3 client.
type Manager struct {
	*subnet.EtcdManager
	conn *connector
}

// New returns a Manager for the etcd cluster of opts. It does not contact
// etcd; the first request does. Close releases the client.
func New(opts Options) (*Manager, error) {
	opts, err := opts.WithDefaults()
	if err != nil {
		return nil, err
	}
	ks, err := newKeyspace(opts)
	if err != nil {
		return nil, err
	}
	opts.Logger.V(1).Info("etcd v3 client configured", "endpoints", opts.Endpoints, "prefix", opts.Prefix, "username", opts.Username, "tls", opts.CertFile != "" || opts.CAFile != "")
	return &Manager{subnet.NewEtcdManager(ks, opts), ks.conn}, nil
}

// NewKeyspace returns the v3 client of opts (defaults applied) as a
// subnet.Keyspace, and the function that closes it.
func NewKeyspace(opts Options) (subnet.Keyspace, func() error, error) {
	ks, err := newKeyspace(opts)
	if err != nil {
		return nil, nil, err
	}
	return ks, ks.conn.shutdown, nil
}

// Close ends the connection to etcd; watches end with an error. It is
// idempotent.
func (m *Manager) Close() error { return m.conn.shutdown() }

// ClientTLS is the TLS config the manager would use for opts: nil when no
// TLS file is given.
func ClientTLS(opts Options) (*tls.Config, error) {
	return etcdtls.Config(opts.CertFile, opts.KeyFile, opts.CAFile)
}
