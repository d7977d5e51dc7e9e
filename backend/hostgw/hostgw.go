// Package hostgw is the host-gw backend: no encapsulation, a plain route to
// each remote node's subnet via that node's address on the shared network:
//
//	<remote subnet> via <remote PublicIP> dev <external interface>
//
// It works only when every node's PublicIP is on a network directly
// connected to the external interface (one L2 segment).
package hostgw

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/internal/metrics"
	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/pkg/nlbatch"
	"github.com/flanneld-go/flanneld/subnet"
)

// Type is the backend's name in the network config (Backend.Type).
const Type = "host-gw"

// ErrPublicIP is returned by Init when the public IP is not the external
// interface's own address: other nodes route to it as a next hop on the
// shared segment, so it must be the address that segment reaches us at.
var ErrPublicIP = errors.New("host-gw needs the public IP to be the external interface's address")

func init() {
	backend.Register(Type, func(opts backend.Options) (backend.Backend, error) {
		if opts.Netlink != nil {
			return newHostGW(opts, opts.Netlink)
		}
		h, err := nlbatch.NewHandle()
		if err != nil {
			return nil, fmt.Errorf("host-gw backend: %w", err)
		}
		b, err := newHostGW(opts, h)
		if err != nil {
			h.Close()
			return nil, err
		}
		b.owned = h
		return b, nil
	})
}

// netlinkHandle is the part of *nlbatch.Handle the backend uses.
type netlinkHandle interface {
	backend.RouteNetlink
	AddrList(link netlink.Link, family int) ([]netlink.Addr, error)
}

type hostGW struct {
	ext    backend.ExternalInterface
	config *subnet.Config
	nl     netlinkHandle
	owned  *nlbatch.Handle // opened by the factory, closed by Close
	log    klog.Logger
	routes *backend.RouteReconciler

	// Reused by each Apply.
	desired []backend.Route
	// noted holds the leases skipped by the last Apply and why, so that a
	// lease is logged once when it starts being skipped, not on every Apply.
	noted, skipped map[netip.Prefix]string
}

func newHostGW(opts backend.Options, nl netlinkHandle) (*hostGW, error) {
	if opts.Ext.Iface == nil {
		return nil, errors.New("no external interface given")
	}
	if opts.Config == nil {
		return nil, errors.New("no network config given")
	}
	return &hostGW{
		ext:     opts.Ext,
		config:  opts.Config,
		nl:      nl,
		log:     opts.Logger,
		routes:  newReconciler(nl, opts),
		noted:   map[netip.Prefix]string{},
		skipped: map[netip.Prefix]string{},
	}, nil
}

func newReconciler(nl netlinkHandle, opts backend.Options) *backend.RouteReconciler {
	r := backend.NewRouteReconciler(nl, opts.Config.Network, opts.Ext.Iface.Index)
	r.UseNexthops(opts.Nexthops)
	return r
}

// Init checks the config and the interface and returns the MTU to publish:
// the external interface's own, as nothing is encapsulated. host-gw has no
// config keys of its own; unknown keys are ignored.
func (b *hostGW) Init(ctx context.Context) (backend.Publish, error) {
	if len(b.config.Backend) > 0 {
		var keys map[string]json.RawMessage
		if err := json.Unmarshal(b.config.Backend, &keys); err != nil {
			return backend.Publish{}, fmt.Errorf("reading host-gw config: Backend is not a JSON object (%v); write it like {\"Type\":\"host-gw\"}", err)
		}
	}
	name := b.ext.Iface.Name
	if !b.ext.IfaceAddr.Is4() {
		return backend.Publish{}, fmt.Errorf("interface %s has no IPv4 address; host-gw needs one (choose another with --iface)", name)
	}
	if b.ext.PublicIP != b.ext.IfaceAddr {
		return backend.Publish{}, fmt.Errorf("%w: --public-ip %s is not %s, the address of %s; drop --public-ip, set it to %s, or use the vxlan backend",
			ErrPublicIP, b.ext.PublicIP, b.ext.IfaceAddr, name, b.ext.IfaceAddr)
	}
	if b.ext.Iface.MTU <= 0 {
		return backend.Publish{}, fmt.Errorf("interface %s reports MTU %d; host-gw publishes the interface MTU, so it must be positive", name, b.ext.Iface.MTU)
	}
	return backend.Publish{MTU: b.ext.Iface.MTU}, nil
}

// Apply routes each remote host-gw lease via its PublicIP on the external
// interface and removes the routes of leases no longer given. A lease that
// cannot be routed (another backend type, outside Network, a PublicIP not on
// a directly connected network) is skipped and logged once; it does not stop
// the others.
func (b *hostGW) Apply(ctx context.Context, own subnet.Lease, remote []subnet.Lease) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	connected, err := b.connected()
	if err != nil {
		return err
	}

	b.desired = b.desired[:0]
	clear(b.skipped)
	for i := range remote {
		l := &remote[i]
		if l.Subnet.Overlaps(own.Subnet) {
			continue // our own lease is routed locally, never via anyone
		}
		if reason := b.check(l, connected); reason != "" {
			b.skip(l.Subnet, reason)
			continue
		}
		b.desired = append(b.desired, backend.Route{Dst: l.Subnet, Gw: l.Attrs.PublicIP, LinkIndex: b.ext.Iface.Index})
	}
	b.noted, b.skipped = b.skipped, b.noted

	c, err := b.routes.Reconcile(own.Subnet, b.desired)
	metrics.Programmed.WithLabelValues(Type, "route").Set(float64(len(b.desired) - c.Failed))
	if c.Any() {
		b.log.Info("Reconciled host-gw routes", "routes", len(b.desired), "added", c.Added, "updated", c.Updated, "removed", c.Removed, "failed", c.Failed)
	}
	if err != nil {
		return fmt.Errorf("programming host-gw routes: %w", err)
	}
	return nil
}

// check returns why lease l cannot be routed, or "".
func (b *hostGW) check(l *subnet.Lease, connected []netip.Prefix) string {
	n := b.config.Network
	if !ip.Contains(n, l.Subnet) || l.Subnet.Bits() == n.Bits() {
		return fmt.Sprintf("it is outside Network %s", n)
	}
	gw := l.Attrs.PublicIP
	if !gw.Is4() {
		return "it has no IPv4 PublicIP"
	}
	if gw == b.ext.IfaceAddr {
		return fmt.Sprintf("its PublicIP %s is this node's own address", gw)
	}
	for _, p := range connected {
		if p.Contains(gw) {
			return ""
		}
	}
	return fmt.Sprintf("its PublicIP %s is not on a network directly connected to %s (%v); host-gw needs all nodes on one L2 segment, use vxlan otherwise",
		gw, b.ext.Iface.Name, connected)
}

// skip records that a lease is skipped, logging it if it was not skipped
// for the same reason by the previous Apply.
func (b *hostGW) skip(p netip.Prefix, reason string) {
	b.skipped[p] = reason
	if b.noted[p] != reason {
		b.log.Info("Ignoring lease", "subnet", p, "reason", reason)
	}
}

// connected returns the networks directly connected to the external
// interface: the prefixes of its IPv4 addresses (the peer's, for a
// point-to-point address).
func (b *hostGW) connected() ([]netip.Prefix, error) {
	link := &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: b.ext.Iface.Index, Name: b.ext.Iface.Name}}
	addrs, err := b.nl.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("listing the addresses of %s: %w", b.ext.Iface.Name, err)
	}
	var nets []netip.Prefix
	for _, a := range addrs {
		n := a.IPNet
		if n == nil {
			continue
		}
		if a.Peer != nil {
			n = a.Peer // a /32 peer is one reachable host
		} else if ones, _ := n.Mask.Size(); ones == 32 {
			continue // a /32 address connects no network
		}
		if p, ok := ip.FromIPNet(n); ok {
			nets = append(nets, p)
		}
	}
	return nets, nil
}

// Close closes the netlink handle the backend opened, if any; routes stay
// so that a restart does not interrupt traffic. Idempotent.
func (b *hostGW) Close() error {
	if b.owned != nil {
		b.owned.Close()
		b.owned = nil
	}
	return nil
}
