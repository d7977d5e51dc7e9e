// Package etcdv3 keeps the network config and the node leases in etcd's v3
// keyspace, in the layout of flannel v0.15 and later (one key per lease,
// attached to an etcd lease), so that nodes of both can share one cluster,
// and so that the daemon runs against etcd 3.6 and later, which have no v2
// API.
package etcdv3

import (
	"crypto/tls"
	"fmt"
	"net/url"
	"strings"
	"time"

	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/internal/etcdtls"
)

// Defaults of Options.
const (
	DefaultPrefix         = "/coreos.com/network"
	DefaultRequestTimeout = 5 * time.Second
)

// DefaultEndpoints are the client URLs used when Options.Endpoints is empty,
// the same as flannel's.
var DefaultEndpoints = []string{"http://127.0.0.1:4001", "http://127.0.0.1:2379"}

// Options configure New.
type Options struct {
	// Endpoints are the client URLs of the etcd members, for example
	// "https://10.0.0.1:2379". The client balances over them and moves to
	// another member when one fails. Empty means DefaultEndpoints.
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
	// Prefix is the key prefix holding config and subnets/; empty means
	// DefaultPrefix.
	Prefix string
	// RequestTimeout bounds one request (and the connection plus
	// authentication that precede the first one); watches are not bound by
	// it. Zero means DefaultRequestTimeout.
	RequestTimeout time.Duration
	// Logger receives the manager's logs; the zero Logger means
	// klog.Background().
	Logger klog.Logger
}

// withDefaults returns a copy of opts with the defaults filled in, the
// prefix normalised ("/a/b/" → "/a/b") and the endpoints checked.
func (opts Options) withDefaults() (Options, error) {
	if len(opts.Endpoints) == 0 {
		opts.Endpoints = DefaultEndpoints
	}
	opts.Endpoints = append([]string(nil), opts.Endpoints...)
	for _, ep := range opts.Endpoints {
		u, err := url.Parse(ep)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return opts, fmt.Errorf("invalid etcd endpoint %q: write it like http://127.0.0.1:2379 or https://etcd1:2379", ep)
		}
	}
	if opts.Prefix == "" {
		opts.Prefix = DefaultPrefix
	}
	if !strings.HasPrefix(opts.Prefix, "/") {
		return opts, fmt.Errorf("invalid etcd prefix %q: it must start with /, like %s", opts.Prefix, DefaultPrefix)
	}
	opts.Prefix = strings.TrimRight(opts.Prefix, "/")
	if opts.Prefix == "" {
		return opts, fmt.Errorf("invalid etcd prefix \"/\": use a directory such as %s", DefaultPrefix)
	}
	if opts.RequestTimeout <= 0 {
		opts.RequestTimeout = DefaultRequestTimeout
	}
	if opts.Logger.GetSink() == nil {
		opts.Logger = klog.Background()
	}
	return opts, nil
}

func tlsConfig(opts *Options) (*tls.Config, error) {
	return etcdtls.Config(opts.CertFile, opts.KeyFile, opts.CAFile)
}
