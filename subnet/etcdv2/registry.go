// Package etcdv2 keeps the network config and the node leases in etcd's v2
// keys API, in the layout flannel's etcd-v2 era daemons use, so that nodes of
// both can share one keyspace.
package etcdv2

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	client "go.etcd.io/etcd/client/v2"
	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/internal/metrics"

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
	// "https://10.0.0.1:2379". A request that fails on one member is tried
	// on the next, so the daemon keeps working while a member is down. The
	// list is used as given (the client does not replace it with the
	// cluster's advertised URLs). Empty means DefaultEndpoints.
	Endpoints []string
	// CertFile and KeyFile are the PEM client certificate and key for TLS
	// client authentication; both or neither.
	CertFile string
	KeyFile  string
	// CAFile is the PEM bundle that verifies the members' certificates;
	// empty means the system roots.
	CAFile string
	// Username and Password are sent as HTTP basic auth when Username is
	// set. They are never logged.
	Username string
	Password string
	// Prefix is the key directory holding config and subnets/; empty means
	// DefaultPrefix.
	Prefix string
	// RequestTimeout bounds one request to one member (connect, TLS,
	// response header); watches are long polls and are not bound by it.
	// Zero means DefaultRequestTimeout.
	RequestTimeout time.Duration
	// Logger receives the manager's logs; the zero Logger means
	// klog.Background().
	Logger klog.Logger
}

// keysAPI is the part of the etcd v2 KeysAPI the manager uses; tests wrap it
// to count or break calls.
type keysAPI interface {
	Get(ctx context.Context, key string, opts *client.GetOptions) (*client.Response, error)
	Set(ctx context.Context, key, value string, opts *client.SetOptions) (*client.Response, error)
	Delete(ctx context.Context, key string, opts *client.DeleteOptions) (*client.Response, error)
	Watcher(key string, opts *client.WatcherOptions) client.Watcher
}

// newKeysAPI builds the v2 client for opts (already defaulted).
func newKeysAPI(opts *Options) (keysAPI, error) {
	tlsCfg, err := etcdtls.Config(opts.CertFile, opts.KeyFile, opts.CAFile)
	if err != nil {
		return nil, err
	}
	for _, ep := range opts.Endpoints {
		u, err := url.Parse(ep)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, fmt.Errorf("invalid etcd endpoint %q: write it like http://127.0.0.1:2379 or https://etcd1:2379", ep)
		}
	}
	dialer := &net.Dialer{Timeout: opts.RequestTimeout, KeepAlive: 30 * time.Second}
	tr := &http.Transport{
		DialContext:         dialer.DialContext,
		TLSClientConfig:     tlsCfg,
		TLSHandshakeTimeout: opts.RequestTimeout,
		MaxIdleConnsPerHost: 4,
		IdleConnTimeout:     90 * time.Second,
	}
	c, err := client.New(client.Config{
		Endpoints:               opts.Endpoints,
		Transport:               tr,
		Username:                opts.Username,
		Password:                opts.Password,
		HeaderTimeoutPerRequest: opts.RequestTimeout,
	})
	if err != nil {
		return nil, fmt.Errorf("creating etcd client: %w", err)
	}
	return countingKeys{client.NewKeysAPI(c)}, nil
}

// countingKeys counts failed requests in metrics.EtcdErrors. Expected
// answers (key not found, compare failed, key exists, index cleared) and
// cancelled requests are not failures.
type countingKeys struct{ keysAPI }

func (k countingKeys) Get(ctx context.Context, key string, opts *client.GetOptions) (*client.Response, error) {
	r, err := k.keysAPI.Get(ctx, key, opts)
	countError(ctx, "get", err)
	return r, err
}

func (k countingKeys) Set(ctx context.Context, key, value string, opts *client.SetOptions) (*client.Response, error) {
	r, err := k.keysAPI.Set(ctx, key, value, opts)
	countError(ctx, "set", err)
	return r, err
}

func countError(ctx context.Context, op string, err error) {
	if err == nil || ctx.Err() != nil {
		return
	}
	switch etcdCode(err) {
	case client.ErrorCodeKeyNotFound, client.ErrorCodeTestFailed, client.ErrorCodeNodeExist, client.ErrorCodeEventIndexCleared:
		return
	}
	metrics.EtcdErrors.WithLabelValues(op).Inc()
}

// withDefaults returns a copy of opts with the defaults filled in and the
// prefix normalised ("/a/b/" → "/a/b").
func (opts Options) withDefaults() (Options, error) {
	if len(opts.Endpoints) == 0 {
		opts.Endpoints = DefaultEndpoints
	}
	opts.Endpoints = append([]string(nil), opts.Endpoints...)
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

// etcdCode returns the etcd error code of err, or 0 when err is not an
// error answered by etcd (a connection failure, a cancelled context...).
func etcdCode(err error) int {
	var e client.Error
	if errors.As(err, &e) {
		return e.Code
	}
	return 0
}
