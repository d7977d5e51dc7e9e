// Package hostgw is the host-gw backend: no encapsulation, a plain route to
// each remote node's subnet via that node's address on the shared network:
//
//	<remote subnet> via <remote PublicIP> dev <external interface>
//
// It works only when every node's PublicIP is on a network directly
// connected to the external interface (one L2 segment).
//
// With EnableIPv6 it also routes each remote lease's IPv6 subnet via its
// PublicIPv6, which must likewise be on an IPv6 network of the external
// interface:
//
//	<remote IPv6 subnet> via <remote PublicIPv6> dev <external interface>
//
// IPv6-only (EnableIPv4 false) installs only those.
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
	// routes keeps the IPv4 routes (nil when the config disables IPv4),
	// routes6 the IPv6 ones (nil without EnableIPv6).
	routes, routes6 *backend.RouteReconciler

	// Reused by each Apply.
	desired, desired6 []nlbatch.Route
	// noted holds the leases skipped by the last Apply and why, so that a
	// lease is logged once when it starts being skipped, not on every Apply.
	noted, skipped map[skipKey]string
}

// skipKey names a lease skipped by one family's routes.
type skipKey struct {
	subnet netip.Prefix
	v6     bool
}

func newHostGW(opts backend.Options, nl netlinkHandle) (*hostGW, error) {
	if opts.Ext.Iface == nil {
		return nil, errors.New("no external interface given")
	}
	if opts.Config == nil {
		return nil, errors.New("no network config given")
	}
	b := &hostGW{
		ext:     opts.Ext,
		config:  opts.Config,
		nl:      nl,
		log:     opts.Logger,
		noted:   map[skipKey]string{},
		skipped: map[skipKey]string{},
	}
	// IPv4 unless the config enables only IPv6 (a Config literal that
	// enables neither means IPv4, as before dual stack).
	if opts.Config.EnableIPv4 || !opts.Config.EnableIPv6 {
		b.routes = newReconciler(nl, opts, opts.Config.Network)
	}
	if opts.Config.EnableIPv6 {
		if !opts.Config.IPv6Network.Addr().Is6() {
			return nil, errors.New("EnableIPv6 is set but IPv6Network is missing")
		}
		b.routes6 = newReconciler(nl, opts, opts.Config.IPv6Network)
	}
	return b, nil
}

func newReconciler(nl netlinkHandle, opts backend.Options, network netip.Prefix) *backend.RouteReconciler {
	r := backend.NewRouteReconciler(nl, network, opts.Ext.Iface.Index)
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
	if b.routes != nil {
		if !b.ext.IfaceAddr.Is4() {
			return backend.Publish{}, fmt.Errorf("interface %s has no IPv4 address; host-gw needs one (choose another with --iface)", name)
		}
		if b.ext.PublicIP != b.ext.IfaceAddr {
			return backend.Publish{}, fmt.Errorf("%w: --public-ip %s is not %s, the address of %s; drop --public-ip, set it to %s, or use the vxlan backend",
				ErrPublicIP, b.ext.PublicIP, b.ext.IfaceAddr, name, b.ext.IfaceAddr)
		}
	}
	if b.routes6 != nil {
		if !b.ext.IfaceAddrV6.Is6() || b.ext.IfaceAddrV6.Is4In6() {
			return backend.Publish{}, fmt.Errorf("EnableIPv6 is set but interface %s has no global IPv6 address; host-gw needs one (%s)", name, b.ext.MissingIPv6())
		}
		if b.ext.PublicIPv6 != b.ext.IfaceAddrV6 {
			return backend.Publish{}, fmt.Errorf("%w: --public-ipv6 %s is not %s, the IPv6 address of %s; drop --public-ipv6, set it to %s, or use the vxlan backend",
				ErrPublicIP, b.ext.PublicIPv6, b.ext.IfaceAddrV6, name, b.ext.IfaceAddrV6)
		}
	}
	if b.ext.Iface.MTU <= 0 {
		return backend.Publish{}, fmt.Errorf("interface %s reports MTU %d; host-gw publishes the interface MTU, so it must be positive", name, b.ext.Iface.MTU)
	}
	owned := backend.Owned{ExtIndex: b.ext.Iface.Index}
	if b.routes != nil {
		owned.Prefixes = append(owned.Prefixes, b.config.Network.Masked())
	}
	if b.routes6 != nil {
		owned.Prefixes = append(owned.Prefixes, b.config.IPv6Network.Masked())
	}
	return backend.Publish{MTU: b.ext.Iface.MTU, Owned: owned}, nil
}

// Apply routes each remote lease via its PublicIP on the external interface
// (and, with IPv6, its IPv6 subnet via its PublicIPv6) and removes the
// routes of leases no longer given. The leases are admitted by the caller;
// one whose PublicIP is not on a network directly connected to the external
// interface cannot be routed and is skipped and logged once. A failure of
// one family does not stop the other.
func (b *hostGW) Apply(ctx context.Context, own subnet.Lease, remote []subnet.Lease) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	clear(b.skipped)
	var errs []error
	programmed := 0
	if b.routes != nil {
		n, err := b.apply(false, own, remote)
		programmed += n
		if err != nil {
			errs = append(errs, err)
		}
	}
	if b.routes6 != nil {
		n, err := b.apply(true, own, remote)
		programmed += n
		if err != nil {
			errs = append(errs, err)
		}
	}
	b.noted, b.skipped = b.skipped, b.noted
	metrics.Programmed.WithLabelValues(Type, "route").Set(float64(programmed))
	return errors.Join(errs...)
}

// apply reconciles one family's routes and returns how many are in place.
func (b *hostGW) apply(v6 bool, own subnet.Lease, remote []subnet.Lease) (int, error) {
	connected, err := b.connected(v6)
	if err != nil {
		return 0, err
	}
	desired, routes, ownSubnet, family := &b.desired, b.routes, own.Subnet, "IPv4"
	if v6 {
		desired, routes, ownSubnet, family = &b.desired6, b.routes6, own.IPv6Subnet, "IPv6"
	}
	*desired = (*desired)[:0]
	for i := range remote {
		l := &remote[i]
		sn, gw := l.Subnet, l.Attrs.PublicIP
		if v6 {
			sn, gw = l.IPv6Subnet, l.Attrs.PublicIPv6
		}
		if !sn.IsValid() {
			continue // a lease without this family (IPv6 among IPv4 nodes)
		}
		if reason := b.unreachable(v6, gw, connected); reason != "" {
			b.skip(skipKey{sn, v6}, reason)
			continue
		}
		*desired = append(*desired, nlbatch.Route{Dst: sn, Gw: gw, LinkIndex: b.ext.Iface.Index})
	}

	c, err := routes.Reconcile(ownSubnet, *desired)
	if c.Any() {
		b.log.Info("Reconciled host-gw routes", "family", family, "routes", len(*desired), "added", c.Added, "updated", c.Updated, "removed", c.Removed, "failed", c.Failed)
	}
	if err != nil {
		return len(*desired) - c.Failed, fmt.Errorf("programming host-gw %s routes: %w", family, err)
	}
	return len(*desired), nil
}

// unreachable returns why gw, a lease's PublicIP (PublicIPv6), is no next
// hop of the external interface, or "".
func (b *hostGW) unreachable(v6 bool, gw netip.Addr, connected []netip.Prefix) string {
	for _, p := range connected {
		if p.Contains(gw) {
			return ""
		}
	}
	pubKey := "PublicIP"
	if v6 {
		pubKey = "PublicIPv6"
	}
	return fmt.Sprintf("its %s %s is not on a network directly connected to %s (%v); host-gw needs all nodes on one L2 segment, use vxlan otherwise",
		pubKey, gw, b.ext.Iface.Name, connected)
}

// skip records that a lease is skipped, logging it if it was not skipped
// for the same reason by the previous Apply.
func (b *hostGW) skip(k skipKey, reason string) {
	b.skipped[k] = reason
	if b.noted[k] != reason {
		b.log.Info("Ignoring lease", "subnet", k.subnet, "reason", reason)
	}
}

// connected returns the networks directly connected to the external
// interface: the prefixes of its addresses of one family (the peer's, for a
// point-to-point address; IPv6 link-local ones excepted).
func (b *hostGW) connected(v6 bool) ([]netip.Prefix, error) {
	link := &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: b.ext.Iface.Index, Name: b.ext.Iface.Name}}
	family, hostBits := netlink.FAMILY_V4, 32
	if v6 {
		family, hostBits = netlink.FAMILY_V6, 128
	}
	addrs, err := b.nl.AddrList(link, family)
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
		} else if ones, _ := n.Mask.Size(); ones == hostBits {
			continue // a /32 address connects no network
		}
		if p, ok := ip.PrefixFromIPNet(n); ok && !p.Addr().IsLinkLocalUnicast() {
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
