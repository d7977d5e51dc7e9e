// Package backend holds the contract every data-path backend implements, the
// registry backends add themselves to, and the one reconcile primitive
// (reconcile.go) every table a backend owns goes through: routes (through
// RouteReconciler), addresses (ReconcileAddrs), and the backends' own
// tables (vxlan's neighbours and fdb entries, udp's peers).
package backend

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sort"
	"strings"
	"sync"

	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/pkg/nlbatch"
	"github.com/flanneld-go/flanneld/subnet"
)

// ErrUnknownType is returned by New for a backend name nobody registered.
var ErrUnknownType = errors.New("unknown backend type")

// ExternalInterface is the host interface that carries overlay traffic.
type ExternalInterface struct {
	// Iface is the interface (name, index, MTU).
	Iface *net.Interface
	// IfaceAddr is its IPv4 address, used as the local tunnel endpoint.
	IfaceAddr netip.Addr
	// PublicIP is the address published in the lease (--public-ip, else
	// IfaceAddr).
	PublicIP netip.Addr
	// IfaceAddrV6 is its IPv6 address (the local tunnel endpoint of IPv6
	// overlays) and PublicIPv6 the one published (--public-ipv6, else
	// IfaceAddrV6); both invalid when the overlay has no IPv6.
	IfaceAddrV6 netip.Addr
	PublicIPv6  netip.Addr
	// NoIPv6 says why IfaceAddrV6 is invalid, as the interface choice found
	// (e.g. "interface eth0 has no global IPv6 address; the IPv6 default
	// route is on eth1: ..."); backends that need IPv6 put it in their error.
	NoIPv6 string
}

// MissingIPv6 is the end of an error line for an interface without an IPv6
// address: NoIPv6 if known, else a generic remedy.
func (e ExternalInterface) MissingIPv6() string {
	if e.NoIPv6 != "" {
		return e.NoIPv6
	}
	name := "the external interface"
	if e.Iface != nil {
		name = e.Iface.Name
	}
	return "give " + name + " a global IPv6 address or choose another interface with --iface"
}

// Options is what a backend constructor gets.
type Options struct {
	// Ext is the external interface.
	Ext ExternalInterface
	// Config is the network config; Config.Backend holds the backend's own
	// keys as raw JSON.
	Config *subnet.Config
	// Netlink is the handle used to program the kernel; nil means the
	// process's network namespace.
	Netlink *nlbatch.Handle
	// Nexthops makes the backend install its routes through nexthop
	// objects (see RouteReconciler.UseNexthops).
	Nexthops bool
	// Logger receives the backend's logs.
	Logger klog.Logger
}

// Publish is what a backend contributes to its node's lease and subnet.env.
type Publish struct {
	// BackendData is published in the lease (e.g. vxlan's VtepMAC); may be
	// nil.
	BackendData json.RawMessage
	// BackendV6Data is its IPv6 counterpart (vxlan's IPv6 VtepMAC); nil
	// without IPv6.
	BackendV6Data json.RawMessage
	// MTU is FLANNEL_MTU.
	MTU int
	// Owned is the kernel state the backend programs, so that the daemon
	// repairs it as soon as a kernel event removes or alters it (see
	// backend/kwatch); zero means no kernel events are watched.
	Owned Owned
}

// Owned names what a backend owns in the kernel, declaratively: the
// daemon's kernel event watcher ignores events about anything else.
type Owned struct {
	// Devices are the links the backend creates and keeps (flannel.1,
	// flannel-v6.1, flannel0): deleted, set down, re-created by someone
	// else, their MAC or MTU changed, their addresses, neighbours or fdb
	// entries removed.
	Devices []string
	// ExtIndex is the external interface (0: none): going down or up, or
	// losing or regaining an address, drops or allows the routes through it.
	ExtIndex int
	// Prefixes are the networks (Network, IPv6Network) whose main-table
	// routes the backend owns: one of them deleted.
	Prefixes []netip.Prefix
}

// Backend is a data path. Apply is declarative: it may be called again with
// the same leases, and each call makes the host match exactly that set.
type Backend interface {
	// Init validates the backend's config keys, creates what does not depend
	// on the lease (devices, sockets) and returns what to publish. It is
	// called once, before the lease is acquired.
	Init(ctx context.Context) (Publish, error)
	// Apply configures the host for the own lease and programs the kernel
	// (routes, neighbours, ...) for exactly the remote leases given; entries
	// this backend owns for leases not in the set are removed. The caller
	// admits the leases (valid subnet of the network, not this node's, of
	// this backend type); the backend checks only its own data. Safe to call from one
	// goroutine at a time. Apply neither changes remote nor keeps it after
	// it returns (it is a view of the caller's lease set).
	Apply(ctx context.Context, own subnet.Lease, remote []subnet.Lease) error
	// Close stops the backend's goroutines and closes its sockets. Routes
	// and devices stay in place so that a restart does not interrupt
	// traffic. Idempotent.
	Close() error
}

// Factory builds a backend.
type Factory func(Options) (Backend, error)

var (
	mu        sync.Mutex
	factories = map[string]Factory{}
)

// Register adds a backend type; backends call it from init. Registering a
// name twice panics (a programming error).
func Register(name string, f Factory) {
	mu.Lock()
	defer mu.Unlock()
	if _, dup := factories[name]; dup {
		panic("backend: " + name + " registered twice")
	}
	factories[name] = f
}

// Types lists the registered backend names, sorted.
func Types() []string {
	mu.Lock()
	defer mu.Unlock()
	names := make([]string, 0, len(factories))
	for n := range factories {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// New builds the backend registered as name.
func New(name string, opts Options) (Backend, error) {
	mu.Lock()
	f, ok := factories[name]
	mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("%w %q: use one of %s", ErrUnknownType, name, strings.Join(Types(), ", "))
	}
	// Factory errors name their backend ("vxlan backend: VNI 0 is ...").
	return f(opts)
}
