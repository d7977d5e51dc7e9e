// Package etcdapi chooses between the etcd v2 and v3 lease managers
// (--etcd-api): a fixed choice, or auto, which looks for the network config
// in the v3 keyspace first, then in the v2 one (if the server serves v2),
// and waits for either while there is none.
package etcdapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/internal/metrics"
	"github.com/flanneld-go/flanneld/subnet"
	"github.com/flanneld-go/flanneld/subnet/etcdv2"
	"github.com/flanneld-go/flanneld/subnet/etcdv3"
)

// The values of --etcd-api.
const (
	Auto = "auto"
	V2   = "v2"
	V3   = "v3"
)

// Options configure New; the etcd fields mean what they mean in
// etcdv3.Options and etcdv2.Options.
type Options struct {
	// API is Auto, V2 or V3; empty means Auto.
	API                       string
	Endpoints                 []string
	CertFile, KeyFile, CAFile string
	Username, Password        string
	Prefix                    string
	// Logger receives the choice and the managers' logs; the zero Logger
	// means klog.Background().
	Logger klog.Logger
}

// Manager is the lease manager of the chosen API. With Auto the choice is
// made by the first call (the daemon's GetNetworkConfig), which waits until
// the config exists in either keyspace; later calls use the same manager.
type Manager struct {
	opts  Options
	log   klog.Logger
	retry time.Duration

	v3 *etcdv3.Manager
	v2 *etcdv2.Manager
	// probeV2 reads the config key with the v2 API; served is false when
	// the server answers that it has no v2 API.
	probeV2 func(ctx context.Context) (served, exists bool, err error)

	sem    chan struct{} // held while choosing
	mu     sync.Mutex
	chosen subnet.Manager
	api    string
}

var _ subnet.Manager = (*Manager)(nil)

// ParseAPI checks a --etcd-api value.
func ParseAPI(s string) (string, error) {
	switch s {
	case "", Auto:
		return Auto, nil
	case V2, V3:
		return s, nil
	}
	return "", fmt.Errorf("--etcd-api %q is not an etcd API: use auto, v2 or v3", s)
}

// New makes the managers the choice needs; it contacts no server.
func New(opts Options) (*Manager, error) {
	api, err := ParseAPI(opts.API)
	if err != nil {
		return nil, err
	}
	if opts.Logger.GetSink() == nil {
		opts.Logger = klog.Background()
	}
	m := &Manager{opts: opts, log: opts.Logger, retry: time.Second, sem: make(chan struct{}, 1)}
	if api != V2 {
		m.v3, err = etcdv3.New(etcdv3.Options{Endpoints: opts.Endpoints, CertFile: opts.CertFile, KeyFile: opts.KeyFile, CAFile: opts.CAFile,
			Username: opts.Username, Password: opts.Password, Prefix: opts.Prefix, Logger: opts.Logger})
		if err != nil {
			return nil, err
		}
	}
	if api != V3 {
		m.v2, err = etcdv2.New(etcdv2.Options{Endpoints: opts.Endpoints, CertFile: opts.CertFile, KeyFile: opts.KeyFile, CAFile: opts.CAFile,
			Username: opts.Username, Password: opts.Password, Prefix: opts.Prefix, Logger: opts.Logger})
		if err != nil {
			return nil, err
		}
	}
	switch api {
	case V2:
		m.use(V2, m.v2, "--etcd-api=v2")
	case V3:
		m.use(V3, m.v3, "--etcd-api=v3")
	default:
		probe, err := newV2Probe(opts)
		if err != nil {
			return nil, err
		}
		m.probeV2 = probe
	}
	return m, nil
}

// API returns the API in use, "" while auto has not chosen yet.
func (m *Manager) API() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.api
}

// use records the choice, logs it and sets the metric.
func (m *Manager) use(api string, mgr subnet.Manager, why string) {
	m.mu.Lock()
	m.chosen, m.api = mgr, api
	m.mu.Unlock()
	metrics.EtcdAPI.WithLabelValues(api).Set(1)
	m.log.Info("Using the etcd "+api+" API", "reason", why, "prefix", m.prefix())
}

func (m *Manager) prefix() string {
	if m.opts.Prefix == "" {
		return etcdv3.DefaultPrefix
	}
	return strings.TrimRight(m.opts.Prefix, "/")
}

// manager returns the chosen manager, choosing first if need be.
func (m *Manager) manager(ctx context.Context) (subnet.Manager, error) {
	m.mu.Lock()
	mgr := m.chosen
	m.mu.Unlock()
	if mgr != nil {
		return mgr, nil
	}
	select {
	case m.sem <- struct{}{}:
		defer func() { <-m.sem }()
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	m.mu.Lock()
	mgr = m.chosen
	m.mu.Unlock()
	if mgr != nil {
		return mgr, nil
	}
	return m.choose(ctx)
}

// choose looks for the config key in v3, then v2, each second until one
// has it.
func (m *Manager) choose(ctx context.Context) (subnet.Manager, error) {
	key := m.prefix() + "/config"
	lastWait := ""
	for {
		in3, err3 := m.v3.ConfigExists(ctx)
		served2, in2, err2 := m.probeV2(ctx)
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if etcdv3.IsAccessDenied(err3) {
			return nil, fmt.Errorf("reading network config at %s: etcd refused access (%w); check the etcd username, password and client certificate", key, err3)
		}
		if errors.Is(err2, errV2Refused) && !in3 {
			return nil, fmt.Errorf("reading network config at %s: %w; check the etcd username, password and client certificate", key, err2)
		}
		switch {
		case in3 && in2:
			m.log.Info("The network config exists in both the etcd v3 and v2 keyspaces; using v3. Nodes on v2 do not see this node's lease: run them with --etcd-api=v3 (flannel-migrate-v3 copies v2 leases), then delete the v2 keys", "key", key)
			m.use(V3, m.v3, "config in both keyspaces, v3 preferred")
			return m.v3, nil
		case in3:
			m.use(V3, m.v3, "config found in the v3 keyspace")
			return m.v3, nil
		case in2 && err3 == nil:
			m.use(V2, m.v2, "config found in the v2 keyspace only")
			m.dropV3()
			return m.v2, nil
		}
		why := "neither keyspace holds it yet"
		switch {
		case err3 != nil:
			why = "reading it with the v3 API failed (etcd 2.x has no v3 API: run with --etcd-api v2): " + err3.Error()
		case err2 != nil:
			why = "reading it with the v2 API failed: " + err2.Error()
		case !served2:
			why = "the v3 keyspace does not hold it and the server has no v2 API"
		}
		if why != lastWait {
			m.log.Info("Waiting for the network config in etcd (v3 or v2 keyspace); retrying every "+m.retry.String(), "key", key, "reason", why)
			lastWait = why
		}
		t := time.NewTimer(m.retry)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		}
	}
}

// GetNetworkConfig implements subnet.Manager; with auto it first waits for
// the config in either keyspace and chooses the API.
func (m *Manager) GetNetworkConfig(ctx context.Context) (*subnet.Config, error) {
	mgr, err := m.manager(ctx)
	if err != nil {
		return nil, err
	}
	return mgr.GetNetworkConfig(ctx)
}

// AcquireLease implements subnet.Manager.
func (m *Manager) AcquireLease(ctx context.Context, cfg *subnet.Config, attrs subnet.LeaseAttrs, prev subnet.Lease) (*subnet.Lease, error) {
	mgr, err := m.manager(ctx)
	if err != nil {
		return nil, err
	}
	return mgr.AcquireLease(ctx, cfg, attrs, prev)
}

// RenewLease implements subnet.Manager.
func (m *Manager) RenewLease(ctx context.Context, lease *subnet.Lease) error {
	mgr, err := m.manager(ctx)
	if err != nil {
		return err
	}
	return mgr.RenewLease(ctx, lease)
}

// WatchLeases implements subnet.Manager.
func (m *Manager) WatchLeases(ctx context.Context, events chan<- []subnet.Event) error {
	mgr, err := m.manager(ctx)
	if err != nil {
		return err
	}
	return mgr.WatchLeases(ctx, events)
}

// WatchConfig implements subnet.Manager.
func (m *Manager) WatchConfig(ctx context.Context, updates chan<- subnet.ConfigUpdate) error {
	mgr, err := m.manager(ctx)
	if err != nil {
		return err
	}
	return mgr.WatchConfig(ctx, updates)
}

// Close releases the v3 client, if any.
func (m *Manager) Close() error {
	m.mu.Lock()
	v3 := m.v3
	m.v3 = nil
	m.mu.Unlock()
	if v3 != nil {
		return v3.Close()
	}
	return nil
}

// dropV3 closes the v3 client once auto has chosen v2: it would keep a gRPC
// connection to etcd, with its goroutines and buffers, for nothing.
func (m *Manager) dropV3() {
	if err := m.Close(); err != nil {
		m.log.V(2).Info("Closing the unused etcd v3 client failed", "err", err)
	}
}

// errV2Refused is the v2 probe's error when etcd refuses the credentials.
var errV2Refused = errors.New("etcd refused access")

// newV2Probe returns a function that reads <prefix>/config through the v2
// keys API of the first endpoint that answers. An etcd answer (the key, or
// error 100 "key not found") means v2 is served; a plain 404 means it is not.
func newV2Probe(opts Options) (func(ctx context.Context) (served, exists bool, err error), error) {
	tlsCfg, err := etcdv3.ClientTLS(etcdv3.Options{CertFile: opts.CertFile, KeyFile: opts.KeyFile, CAFile: opts.CAFile})
	if err != nil {
		return nil, err
	}
	endpoints := opts.Endpoints
	if len(endpoints) == 0 {
		endpoints = etcdv3.DefaultEndpoints
	}
	prefix := etcdv3.DefaultPrefix
	if opts.Prefix != "" {
		prefix = strings.TrimRight(opts.Prefix, "/")
	}
	hc := &http.Client{
		Transport: &http.Transport{
			Proxy:               nil,
			DialContext:         (&net.Dialer{Timeout: etcdv3.DefaultRequestTimeout}).DialContext,
			TLSClientConfig:     tlsCfg,
			TLSHandshakeTimeout: etcdv3.DefaultRequestTimeout,
		},
		Timeout: etcdv3.DefaultRequestTimeout,
	}
	user, pass := opts.Username, opts.Password
	return func(ctx context.Context) (bool, bool, error) {
		var lastErr error
		for _, ep := range endpoints {
			u := strings.TrimRight(ep, "/") + "/v2/keys" + (&url.URL{Path: prefix + "/config"}).EscapedPath() + "?quorum=true"
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
			if err != nil {
				lastErr = err
				continue
			}
			if user != "" {
				req.SetBasicAuth(user, pass)
			}
			resp, err := hc.Do(req)
			if err != nil {
				lastErr = fmt.Errorf("reading %s with the v2 API: %w", prefix+"/config", err)
				continue
			}
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
			resp.Body.Close()
			var e struct {
				ErrorCode int `json:"errorCode"`
			}
			jsonErr := json.Unmarshal(body, &e)
			switch {
			case resp.StatusCode == http.StatusOK:
				return true, true, nil
			case jsonErr == nil && e.ErrorCode == 100: // key not found
				return true, false, nil
			case resp.StatusCode == http.StatusNotFound:
				return false, false, nil
			case resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden:
				return true, false, fmt.Errorf("%w: reading %s with the v2 API: HTTP %d", errV2Refused, prefix+"/config", resp.StatusCode)
			default:
				lastErr = fmt.Errorf("reading %s with the v2 API: HTTP %d", prefix+"/config", resp.StatusCode)
			}
		}
		return false, false, lastErr
	}, nil
}
