package kube

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"

	"github.com/flanneld-go/flanneld/subnet"
)

// WatchLeases follows the Nodes with an informer and sends lease events
// until ctx ends. A node is a lease when it has <prefix>/kube-subnet-manager
// "true" and a podCIDR. The first batch is every such node, all Added (sent
// even when there is none); then a changed lease is Added, and a node
// deleted (or no longer a lease) is Removed. A node whose annotations do
// not parse is logged once per distinct problem and skipped. The informer
// keeps of each Node only its name, podCIDR and the lease annotations. The
// API connection is re-established by the informer itself.
func (m *Manager) WatchLeases(ctx context.Context, events chan<- []subnet.Event) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	w := &watcher{m: m, dirty: map[string]struct{}{}, kick: make(chan struct{}, 1),
		reported: map[string]subnet.Lease{}, bad: map[string]string{}}
	var o outage
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
			return untilAnswered(ctx, m, &o, func() (runtime.Object, error) { return m.listSlim(ctx, opts) })
		},
		WatchFuncWithContext: func(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
			return untilAnswered(ctx, m, &o, func() (watch.Interface, error) { return m.client.watchNodes(ctx, opts) })
		},
	}
	store, ctrl := cache.NewInformerWithOptions(cache.InformerOptions{
		ListerWatcher: lw,
		ObjectType:    &v1.Node{},
		Handler: cache.ResourceEventHandlerFuncs{
			AddFunc:    w.touch,
			UpdateFunc: func(_, obj any) { w.touch(obj) },
			DeleteFunc: w.touch,
		},
		Transform: m.slimNode,
	})
	w.store = store
	done := make(chan struct{})
	go func() { defer close(done); ctrl.RunWithContext(ctx) }()
	defer func() { cancel(); <-done }()

	// Polled more often than cache.WaitForCacheSync does (100 ms): the
	// first batch is what a starting daemon waits for.
	began := time.Now()
	for !ctrl.HasSynced() {
		if err := sleep(ctx, 5*time.Millisecond); err != nil {
			return err
		}
	}
	// The first batch is the whole store; what was touched until now is in
	// it.
	w.takeDirty()
	keys := store.ListKeys()
	first := w.collect(keys)
	if first == nil {
		first = []subnet.Event{}
	}
	m.log.Info("Listed the nodes", "nodes", len(keys), "leases", len(first), "took", time.Since(began).Round(time.Millisecond))
	if err := send(ctx, events, first); err != nil {
		return err
	}
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-w.kick:
		}
		if batch := w.collect(w.takeDirty()); len(batch) > 0 {
			if err := send(ctx, events, batch); err != nil {
				return err
			}
		}
	}
}

func send(ctx context.Context, events chan<- []subnet.Event, batch []subnet.Event) error {
	return subnet.SendEvents(ctx, events, batch)
}

// outage is the state of the informer's list and watch requests while the
// API server does not answer.
type outage struct {
	bo       subnet.Backoff
	failures int
}

// untilAnswered calls fn until the API server answers (a result or an API
// error, which the informer handles) or ctx ends, waiting the stores'
// back-off, at most a second, between tries. client-go's reflector would
// back off by itself, for up to 30 s and more with jitter, and so come back
// that late after a short outage of the API server (issue 17 §3b).
func untilAnswered[T any](ctx context.Context, m *Manager, o *outage, fn func() (T, error)) (T, error) {
	o.bo.Min, o.bo.Max = 100*time.Millisecond, time.Second
	for {
		v, err := fn()
		var status apierrors.APIStatus
		if err == nil || errors.As(err, &status) || ctx.Err() != nil {
			if o.failures > 0 && ctx.Err() == nil {
				m.log.Info("The Kubernetes API server answers again; watching nodes", "failedAttempts", o.failures)
			}
			o.failures = 0
			o.bo.Reset()
			return v, err
		}
		if o.failures++; o.failures == 1 {
			m.log.Error(err, "The Kubernetes API server does not answer; retrying every second at most")
		}
		if !subnet.Sleep(ctx, o.bo.Next()) {
			return v, err
		}
	}
}

// listPage is the number of Nodes one list request returns.
const listPage = 500

// listSlim lists the Nodes page by page and keeps only the watchedNode of
// each, so that a list of thousands of nodes is never decoded whole (an API
// server that streams the initial state to the informer, WatchList, does
// not call it). It reads the latest state (ResourceVersion ""), which
// paging requires; the informer watches on from the list's version.
func (m *Manager) listSlim(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
	opts.ResourceVersion, opts.ResourceVersionMatch, opts.Limit = "", "", listPage
	out := &watchedNodeList{}
	for {
		page, err := m.client.listNodes(ctx, opts)
		if err != nil {
			return nil, err
		}
		if out.Items == nil {
			n := len(page.Items)
			if rest := page.RemainingItemCount; rest != nil && *rest > 0 {
				n += int(*rest)
			}
			out.Items = make([]*watchedNode, 0, n)
		}
		for i := range page.Items {
			out.Items = append(out.Items, m.watchedNode(&page.Items[i]))
		}
		out.ResourceVersion = page.ResourceVersion
		if page.Continue == "" {
			return out, nil
		}
		opts.Continue = page.Continue
	}
}

// slimNode is the informer's transform: a Node becomes its watchedNode, so
// that memory does not grow with the size of node status (images,
// conditions, addresses) or of other annotations.
func (m *Manager) slimNode(obj any) (any, error) {
	if n, ok := obj.(*v1.Node); ok {
		return m.watchedNode(n), nil
	}
	// A watchedNode already (listed by listSlim, or passed again when the
	// informer replaces its store), or a tombstone of one.
	return obj, nil
}

// watchedNode is what the informer keeps of a Node: its name and, when it
// is marked as a lease and has a podCIDR, the podCIDRs and the values of
// the lease annotations. It embeds ObjectMeta, with only Name set, so that
// client-go's queue and store key it as the Node it stands for.
type watchedNode struct {
	metav1.ObjectMeta
	podCIDRs []string // spec.podCIDRs, else spec.podCIDR; none when not a lease

	backendType, backendData, backendV6Data string
	publicIP, publicIPv6                    string
	hasPublicIP, hasPublicIPv6              bool // the annotation is present (perhaps "")
}

func (m *Manager) watchedNode(n *v1.Node) *watchedNode {
	w := &watchedNode{ObjectMeta: metav1.ObjectMeta{Name: n.Name}}
	a, k := n.Annotations, m.keys
	if a[k.subnetManager] != "true" {
		return w
	}
	w.podCIDRs = specPodCIDRs(n)
	if len(w.podCIDRs) == 0 {
		return w
	}
	w.backendType, w.backendData, w.backendV6Data = a[k.backendType], a[k.backendData], a[k.backendV6Data]
	w.publicIP, w.hasPublicIP = a[k.publicIP]
	w.publicIPv6, w.hasPublicIPv6 = a[k.publicIPv6]
	return w
}

// isLease reports whether the node is marked as a lease
// (<prefix>/kube-subnet-manager "true") and has a podCIDR.
func (w *watchedNode) isLease() bool { return len(w.podCIDRs) > 0 }

// GetObjectKind is a watchedNode's kind: none (it never goes on the wire).
func (w *watchedNode) GetObjectKind() schema.ObjectKind { return schema.EmptyObjectKind }

// DeepCopyObject makes watchedNode a runtime.Object, as the items of a
// list given to the informer are.
func (w *watchedNode) DeepCopyObject() runtime.Object {
	c := *w
	w.ObjectMeta.DeepCopyInto(&c.ObjectMeta)
	c.podCIDRs = slices.Clone(w.podCIDRs)
	return &c
}

// watchedNodeList is the list listSlim gives the informer.
type watchedNodeList struct {
	metav1.ListMeta
	Items []*watchedNode
}

func (l *watchedNodeList) GetObjectKind() schema.ObjectKind { return schema.EmptyObjectKind }

func (l *watchedNodeList) DeepCopyObject() runtime.Object {
	c := &watchedNodeList{Items: make([]*watchedNode, len(l.Items))}
	l.ListMeta.DeepCopyInto(&c.ListMeta)
	for i, n := range l.Items {
		c.Items[i] = n.DeepCopyObject().(*watchedNode)
	}
	return c
}

// watcher turns informer notifications into lease events. The informer's
// handler only marks node names dirty; the WatchLeases goroutine reads
// their current state from the store and compares it with what it last
// reported, so a burst of updates to one node is one event and the handler
// never blocks on the daemon.
type watcher struct {
	m     *Manager
	store cache.Store

	mu    sync.Mutex
	dirty map[string]struct{}
	kick  chan struct{}

	// Owned by the WatchLeases goroutine.
	reported map[string]subnet.Lease // node name → lease last sent as Added
	bad      map[string]string       // node name → problem already logged
}

func (w *watcher) touch(obj any) {
	key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj)
	if err != nil {
		return
	}
	w.mu.Lock()
	w.dirty[key] = struct{}{}
	w.mu.Unlock()
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

func (w *watcher) takeDirty() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	keys := make([]string, 0, len(w.dirty))
	for k := range w.dirty {
		keys = append(keys, k)
	}
	clear(w.dirty)
	return keys
}

// collect compares the named nodes' current leases with those reported and
// returns the events between them.
func (w *watcher) collect(keys []string) []subnet.Event {
	var batch []subnet.Event
	for _, key := range keys {
		var (
			lease subnet.Lease
			ok    bool
		)
		if obj, exists, _ := w.store.GetByKey(key); exists {
			lease, ok = w.lease(obj.(*watchedNode))
		} else {
			delete(w.bad, key)
		}
		old, had := w.reported[key]
		switch {
		case ok && had && sameLease(old, lease):
		case ok:
			if had && old.Key() != lease.Key() {
				batch = append(batch, subnet.Event{Type: subnet.EventRemoved, Lease: old})
			}
			w.reported[key] = lease
			batch = append(batch, subnet.Event{Type: subnet.EventAdded, Lease: lease})
		case had:
			delete(w.reported, key)
			batch = append(batch, subnet.Event{Type: subnet.EventRemoved, Lease: old})
		}
	}
	return batch
}

// sameLease reports whether b is a as the stores' watchers compare leases:
// the same subnets and the same summary.
func sameLease(a, b subnet.Lease) bool {
	return a.Subnet == b.Subnet && a.IPv6Subnet == b.IPv6Subnet && subnet.SummarizeLease(a) == subnet.SummarizeLease(b)
}

// lease reads a node's lease. A node that is not a lease (no
// kube-subnet-manager "true" or no podCIDR) is not ok, silently; one whose
// podCIDR or annotations do not parse is not ok and logged once.
func (w *watcher) lease(n *watchedNode) (subnet.Lease, bool) {
	if !n.isLease() {
		delete(w.bad, n.Name)
		return subnet.Lease{}, false
	}
	l, err := parseNodeLease(w.m.keys, n)
	if err != nil {
		if w.bad[n.Name] != err.Error() {
			w.bad[n.Name] = err.Error()
			w.m.log.Info("Skipping a node whose lease annotations are invalid; fix its annotations", "peer", n.Name, "reason", err)
		}
		return subnet.Lease{}, false
	}
	delete(w.bad, n.Name)
	return l, true
}

// parseNodeLease reads the lease of a node that is marked as one: its IPv4
// part when it has an IPv4 podCIDR and a public-ip, its IPv6 part when it
// has an IPv6 podCIDR and a public-ipv6 (as a node publishes the families
// its config enables). A node with neither is an error. keys name the
// annotations in errors.
func parseNodeLease(keys annotations, n *watchedNode) (subnet.Lease, error) {
	v4, v6, err := parsePodCIDRs(n.podCIDRs)
	if err != nil {
		return subnet.Lease{}, err
	}
	l := subnet.Lease{Attrs: subnet.LeaseAttrs{BackendType: n.backendType}}
	if s := n.publicIP; v4.IsValid() && n.hasPublicIP {
		ip, err := netip.ParseAddr(s)
		if err != nil || !ip.Is4() {
			return subnet.Lease{}, fmt.Errorf("annotation %s=%q is not an IPv4 address", keys.publicIP, s)
		}
		if l.Attrs.BackendData, err = backendData(keys.backendData, n.backendData); err != nil {
			return subnet.Lease{}, err
		}
		l.Subnet, l.Attrs.PublicIP = v4, ip
	}
	if s := n.publicIPv6; v6.IsValid() && n.hasPublicIPv6 {
		ip, err := netip.ParseAddr(s)
		if err != nil || !ip.Is6() || ip.Is4In6() {
			return subnet.Lease{}, fmt.Errorf("annotation %s=%q is not an IPv6 address", keys.publicIPv6, s)
		}
		if l.Attrs.BackendV6Data, err = backendData(keys.backendV6Data, n.backendV6Data); err != nil {
			return subnet.Lease{}, err
		}
		l.IPv6Subnet, l.Attrs.PublicIPv6 = v6, ip
	}
	if !l.Subnet.IsValid() && !l.IPv6Subnet.IsValid() {
		if v4.IsValid() || !v6.IsValid() {
			return subnet.Lease{}, fmt.Errorf("podCIDR %s has no %s annotation", v4, keys.publicIP)
		}
		return subnet.Lease{}, fmt.Errorf("IPv6 podCIDR %s has no %s annotation", v6, keys.publicIPv6)
	}
	if !l.Subnet.IsValid() {
		// An IPv6-only lease, as flannel reads it (see subnet.Lease.Key).
		l.Attrs.PublicIP = netip.IPv4Unspecified()
	}
	return l, nil
}

// backendData is the JSON of a backend-data annotation, nil for none.
func backendData(key, value string) ([]byte, error) {
	d := bytes.TrimSpace([]byte(value))
	if len(d) == 0 || bytes.Equal(d, []byte("null")) {
		return nil, nil
	}
	if !json.Valid(d) {
		return nil, fmt.Errorf("annotation %s=%q is not JSON", key, value)
	}
	return d, nil
}
