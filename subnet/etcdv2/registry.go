// Package etcdv2 keeps the network config and the node leases in etcd's v2
// keys API, in the layout flannel's etcd-v2 era daemons use, so that nodes of
// both can share one keyspace. It is an adapter: subnet.Keyspace on the v2
// client; the lease manager is subnet.EtcdManager.
package etcdv2

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"time"

	client "go.etcd.io/etcd/client/v2"

	"github.com/flanneld-go/flanneld/internal/etcdtls"
	"github.com/flanneld-go/flanneld/subnet"
)

// Options configure New. With v2, a request that fails on one member is
// tried on the next; the endpoints are used as given (the client does not
// replace them with the cluster's advertised URLs). Username and Password
// are sent as HTTP basic auth.
type Options = subnet.EtcdOptions

// Manager is the etcd v2 lease store: subnet.EtcdManager on the v2 keys API.
type Manager struct{ *subnet.EtcdManager }

// New returns a Manager for the etcd cluster of opts. It does not contact
// etcd; the first request does.
func New(opts Options) (*Manager, error) {
	opts, err := opts.WithDefaults()
	var ks subnet.Keyspace
	if err == nil {
		ks, err = NewKeyspace(opts)
	}
	if err != nil {
		return nil, err
	}
	return &Manager{subnet.NewEtcdManager(ks, opts)}, nil
}

// NewKeyspace returns the v2 keys API of opts (defaults applied) as a
// subnet.Keyspace.
func NewKeyspace(opts Options) (subnet.Keyspace, error) {
	tlsCfg, err := etcdtls.Config(opts.CertFile, opts.KeyFile, opts.CAFile)
	if err != nil {
		return nil, err
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
	// One call may try every member in turn.
	return &keyspace{api: client.NewKeysAPI(c), timeout: opts.RequestTimeout * time.Duration(len(opts.Endpoints)+1)}, nil
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

// flatError makes a multi-member failure one line and an authorization
// failure subnet.ErrAccessDenied.
func flatError(err error) error {
	var ce *client.ClusterError
	switch {
	case errors.As(err, &ce):
		return &clusterError{errs: ce.Errors}
	case etcdCode(err) == client.ErrorCodeUnauthorized:
		return subnet.Denied(err)
	}
	return err
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

// call runs fn bounded by the keyspace's timeout.
func call(ctx context.Context, timeout time.Duration, fn func(ctx context.Context) (*client.Response, error)) (*client.Response, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	return fn(ctx)
}
