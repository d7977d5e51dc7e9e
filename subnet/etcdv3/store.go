package etcdv3

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"

	"github.com/flanneld-go/flanneld/subnet"
)

// store is the part of the etcd v3 client the manager uses; tests wrap it to
// count or hold calls. *clientv3.Client implements it.
type store interface {
	Get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error)
	Txn(ctx context.Context) clientv3.Txn
	Grant(ctx context.Context, ttl int64) (*clientv3.LeaseGrantResponse, error)
	KeepAliveOnce(ctx context.Context, id clientv3.LeaseID) (*clientv3.LeaseKeepAliveResponse, error)
	Revoke(ctx context.Context, id clientv3.LeaseID) (*clientv3.LeaseRevokeResponse, error)
	Watch(ctx context.Context, key string, opts ...clientv3.OpOption) clientv3.WatchChan
	// ActiveConnection is the gRPC connection, whose state changes tell a
	// reconnection.
	ActiveConnection() *grpc.ClientConn
}

// connector makes the client on first use: with a username, creating it
// authenticates, which needs a reachable member; a member that is down at
// start is then an error of the first request, retried like any other.
type connector struct {
	dial func(ctx context.Context) (store, func() error, error)
	// diagnose says why no endpoint answers, or nil (see diagnose).
	diagnose func(ctx context.Context) error

	mu     sync.Mutex
	st     store
	close  func() error
	closed bool
}

var errClosed = errors.New("etcd lease manager is closed")

func (c *connector) get(ctx context.Context) (store, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, errClosed
	}
	if c.st != nil {
		return c.st, nil
	}
	st, closeFn, err := c.dial(ctx)
	if err != nil {
		return nil, err
	}
	c.st, c.close = st, closeFn
	return st, nil
}

func (c *connector) shutdown() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	if c.close == nil {
		return nil
	}
	err := c.close()
	c.st, c.close = nil, nil
	return err
}

// newConnector returns the connector of opts (already defaulted), or the
// error of a bad TLS option.
func newConnector(opts *Options) (*connector, error) {
	tlsCfg, err := ClientTLS(*opts)
	if err != nil {
		return nil, err
	}
	endpoints := append([]string(nil), opts.Endpoints...)
	return &connector{
		dial:     dialer(opts, tlsCfg),
		diagnose: func(ctx context.Context) error { return diagnose(ctx, endpoints, tlsCfg) },
	}, nil
}

// dialer returns the function that makes the v3 client of opts.
func dialer(opts *Options, tlsCfg *tls.Config) func(ctx context.Context) (store, func() error, error) {
	endpoints := append([]string(nil), opts.Endpoints...)
	user, pass, timeout := opts.Username, opts.Password, opts.RequestTimeout
	return func(ctx context.Context) (store, func() error, error) {
		c, err := clientv3.New(clientv3.Config{
			Endpoints:   endpoints,
			TLS:         tlsCfg,
			Username:    user,
			Password:    pass,
			DialTimeout: timeout, // bounds the authentication at creation
			// A member that stops answering is noticed by gRPC keepalive
			// instead of by a watch that waits for ever.
			DialKeepAliveTime:    30 * time.Second,
			DialKeepAliveTimeout: timeout,
			// The client's own logger would print the endpoints' errors
			// on every retry; the manager logs what matters.
			Logger: zap.NewNop(),
			// gRPC's default reconnect back-off grows to two minutes:
			// after a long etcd outage the watch would resume that late.
			// Like the v2 manager, try again at least every second.
			DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
				Backoff:           grpcbackoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
				MinConnectTimeout: timeout,
			})},
		})
		if err != nil {
			return nil, nil, fmt.Errorf("connecting to etcd: %w", err)
		}
		return c, c.Close, nil
	}
}

// authError reports whether err is etcd refusing the client's identity or
// rights, which retrying does not fix.
func authError(err error) bool {
	for _, e := range []error{rpctypes.ErrPermissionDenied, rpctypes.ErrAuthFailed, rpctypes.ErrUserEmpty, rpctypes.ErrUserNotFound, rpctypes.ErrInvalidAuthMgmt} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// IsAccessDenied reports whether err is etcd refusing the client's identity
// or rights (wrong password, missing permission), which retrying does not
// fix.
func IsAccessDenied(err error) bool { return errors.Is(err, subnet.ErrAccessDenied) || authError(err) }
