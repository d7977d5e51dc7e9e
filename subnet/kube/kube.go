// Package kube is the lease store of --kube-subnet-mgr: the Kubernetes API.
// The network config is a file (a ConfigMap mounted into the DaemonSet),
// the lease is this node's spec.podCIDR (assigned by kube-controller-manager
// with --allocate-node-cidrs), and the node publishes its backend data as
// annotations through a strategic-merge patch of its status, exactly as
// flannel does, so that nodes of both daemons share one cluster.
package kube

import (
	"context"
	"errors"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/subnet"
)

// DefaultNetConfigPath is flannel's --net-config-path default.
const DefaultNetConfigPath = "/etc/kube-flannel/net-conf.json"

// DefaultAnnotationPrefix is flannel's --kube-annotation-prefix default.
const DefaultAnnotationPrefix = "flannel.alpha.coreos.com"

// ErrPodCIDROutsideNetwork: the node's podCIDR lies outside Network (or
// IPv6Network). Its errors also match subnet.ErrInvalidConfig: the config
// file and the cluster's --cluster-cidr disagree, which a retry cannot mend.
var ErrPodCIDROutsideNetwork = errors.New("node podCIDR is outside the network")

// Options configures a Manager.
type Options struct {
	// Config says how to reach the API server (see RESTConfig).
	Config *rest.Config
	// NodeName is this node's name (see NodeName).
	NodeName string
	// NetConfigPath is the network config file; DefaultNetConfigPath when
	// empty.
	NetConfigPath string
	// AnnotationPrefix prefixes the node annotations;
	// DefaultAnnotationPrefix when empty.
	AnnotationPrefix string
	// PollInterval is how often a missing config file or an empty podCIDR
	// is looked at again; 1 s when zero.
	PollInterval time.Duration
	// ConfigInterval is how often WatchConfig re-reads the config file;
	// 10 s when zero.
	ConfigInterval time.Duration
	// Now is the clock of the NetworkUnavailable condition; time.Now when
	// nil.
	Now func() time.Time
	// KeepNetworkUnavailable leaves the node's NetworkUnavailable condition
	// alone (--set-node-network-unavailable=false); by default the status
	// patch sets it False, as flannel v0.28 does.
	KeepNetworkUnavailable bool
	// Logger receives the manager's logs; klog's default when nil.
	Logger *klog.Logger
}

// Manager implements subnet.Manager on the Kubernetes API.
type Manager struct {
	client   *client
	node     string
	path     string
	keys     annotations
	poll     time.Duration
	cfgEvery time.Duration
	now      func() time.Time
	log      klog.Logger
	// noCondition is Options.KeepNetworkUnavailable.
	noCondition bool
}

var _ subnet.Manager = (*Manager)(nil)

// New checks o and returns a Manager. It does not contact the API server.
func New(o Options) (*Manager, error) {
	if o.Config == nil {
		return nil, errors.New("kube: Options.Config is nil")
	}
	if o.NodeName == "" {
		return nil, errors.New("kube: Options.NodeName is empty")
	}
	if o.NetConfigPath == "" {
		o.NetConfigPath = DefaultNetConfigPath
	}
	if o.AnnotationPrefix == "" {
		o.AnnotationPrefix = DefaultAnnotationPrefix
	}
	keys, err := newAnnotations(o.AnnotationPrefix)
	if err != nil {
		return nil, err
	}
	c, err := newClient(o.Config)
	if err != nil {
		return nil, err
	}
	m := &Manager{client: c, node: o.NodeName, path: o.NetConfigPath, keys: keys,
		poll: o.PollInterval, cfgEvery: o.ConfigInterval, now: o.Now, noCondition: o.KeepNetworkUnavailable}
	if m.poll <= 0 {
		m.poll = time.Second
	}
	if m.cfgEvery <= 0 {
		m.cfgEvery = 10 * time.Second
	}
	if m.now == nil {
		m.now = time.Now
	}
	if o.Logger != nil {
		m.log = *o.Logger
	} else {
		m.log = klog.Background().WithName("kube")
	}
	m.log = m.log.WithValues("node", m.node)
	return m, nil
}

// sleep waits d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) error {
	if !subnet.Sleep(ctx, d) {
		return ctx.Err()
	}
	return nil
}
