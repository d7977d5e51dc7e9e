// Package vxlan is the vxlan backend: a VXLAN device flannel.<VNI> and, per
// remote lease, a permanent neighbour, an fdb entry and an onlink route, the
// way flannel v0.10 programs them, so that nodes of both daemons reach each
// other (see WIRE.md).
//
// What the backend owns, and so removes when no lease wants it (also the
// leftovers of a previous run, at the first Apply):
//   - on flannel.<VNI>: every IPv4 address but the own lease's, every
//     permanent IPv4 neighbour, every fdb entry; neighbours the kernel
//     resolved itself are left to it;
//   - in the main table: routes with a gateway to a part of Network (never
//     Network itself nor the own subnet) through flannel.<VNI> or the
//     external interface. The external interface is included even without
//     DirectRouting, so that turning the option off removes its routes.
//
// With DirectRouting, a peer whose PublicIP is on a network of the external
// interface's addresses gets only `<subnet> via <PublicIP> dev <ext>`, and no
// neighbour or fdb entry, as in flannel v0.10; entries left from when it was
// tunnelled are removed.
//
// With EnableIPv6 (flannel v0.28's dual stack) the same is done a second
// time over IPv6: a device flannel-v6.<VNI> whose local address is the
// external interface's IPv6 address (MTU external − 70), its MAC published
// as BackendV6Data, and per remote lease with an IPv6Subnet, a PublicIPv6 and
// a BackendV6Data: neighbour <IPv6 subnet IP> → VtepMAC, fdb VtepMAC → PublicIPv6,
// route <IPv6 subnet> via <IPv6 subnet IP> onlink. It owns on that device and
// in the IPv6 main table what the IPv4 overlay owns on its own (IPv6
// link-local addresses excepted). IPv6-only (EnableIPv4 false) has only
// flannel-v6.<VNI>.
package vxlan

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/pkg/nlbatch"
	"github.com/flanneld-go/flanneld/subnet"
)

func init() {
	backend.Register(backendType, func(o backend.Options) (backend.Backend, error) { return newBackend(o) })
}

// ErrClosed is returned by Init and Apply after Close.
var ErrClosed = errors.New("vxlan backend: closed")

// kernel is everything the backend asks of netlink.
type kernel interface {
	linkNetlink
	neighNetlink
	backend.RouteNetlink
	backend.AddrNetlink
}

// vxlanBackend is the vxlan backend: an IPv4 overlay (the embedded plane,
// on flannel.<VNI>) and, with EnableIPv6, an IPv6 one (flannel-v6.<VNI>).
// Use it from one goroutine at a time.
type vxlanBackend struct {
	cfg   config
	nl    kernel
	owned *nlbatch.Handle // the handle New opened, closed by Close; nil if given
	log   klog.Logger

	closed bool

	// plane is the IPv4 overlay; it is used only when v4 is set.
	plane
	v4 bool
	// v6 is the IPv6 overlay, nil when the config does not enable IPv6.
	v6 *plane
}

// plane is one address family's overlay: its VTEP device and the
// neighbours, fdb entries and routes of the remote leases' subnets of that
// family.
type plane struct {
	v6       bool
	network  netip.Prefix // Network or IPv6Network
	spec     deviceSpec
	nl       kernel
	log      klog.Logger
	direct   bool // DirectRouting
	nexthops bool // routes go through nexthop objects (Options.Nexthops)
	extName  string

	dev *netlink.Vxlan // the device as last ensured; nil before Init
	mac hwAddr         // the published VTEP MAC

	routes    *backend.RouteReconciler
	routeLink int // the device index routes was built for

	want     *desired
	neighTab neighTable
	fdbTab   fdbTable
	neighs   *backend.Reconciler[addr, neighVal]
	fdbs     *backend.Reconciler[hwAddr, fdbVal]
	ignore   map[netip.Prefix]ignored // leases skipped, with the reason logged

	// halfDone holds, by subnet IP, the tunnelled leases of this Apply that
	// could not be programmed completely.
	halfDone map[addr]struct{}
	rollBuf  []nlbatch.Neigh
	errs     []error

	// last counts what the last Apply changed, per kind.
	last stats
}

// stats counts what one Apply changed.
type stats struct {
	Neigh, FDB, Route backend.Changes
	// RolledBack counts leases whose neighbour and fdb entry were removed
	// again because their route could not be installed.
	RolledBack int
}

type ignored struct {
	reason string
	gen    uint64
}

// newBackend checks the options and the vxlan keys of the Backend block and
// opens a netlink socket if none is given; it changes nothing in the kernel.
// Every config error names the key, the value and the rule
// and wraps subnet.ErrInvalidConfig.
//
// The IPv4 overlay is on when the config enables IPv4 (or enables neither
// family, as a Config literal of a test does); the IPv6 one when it enables
// IPv6.
func newBackend(o backend.Options) (*vxlanBackend, error) {
	if o.Config == nil {
		return nil, errors.New("vxlan backend: no network config given")
	}
	cfg, err := parseConfig(o.Config.Backend)
	if err != nil {
		return nil, err
	}
	if o.Ext.Iface == nil || o.Ext.Iface.Index <= 0 {
		return nil, errors.New("vxlan backend: no external interface given")
	}
	v4, v6 := o.Config.EnableIPv4 || !o.Config.EnableIPv6, o.Config.EnableIPv6
	if v4 && !o.Ext.IfaceAddr.Is4() {
		return nil, fmt.Errorf("vxlan backend: external interface %s has no IPv4 address to use as the tunnel endpoint", o.Ext.Iface.Name)
	}
	if v6 && (!o.Ext.IfaceAddrV6.Is6() || o.Ext.IfaceAddrV6.Is4In6()) {
		return nil, fmt.Errorf("vxlan backend: EnableIPv6 is set but external interface %s has no global IPv6 address to use as the tunnel endpoint (%s)", o.Ext.Iface.Name, o.Ext.MissingIPv6())
	}
	if v6 && !o.Config.IPv6Network.Addr().Is6() {
		return nil, errors.New("vxlan backend: EnableIPv6 is set but IPv6Network is missing")
	}
	overhead := encapOverhead
	if v6 {
		overhead = encapOverhead6
	}
	if o.Ext.Iface.MTU-overhead < 68 {
		return nil, fmt.Errorf("vxlan backend: external interface %s MTU %d is too small: VXLAN needs at least %d", o.Ext.Iface.Name, o.Ext.Iface.MTU, 68+overhead)
	}
	var nl kernel = o.Netlink
	var owned *nlbatch.Handle
	if o.Netlink == nil {
		h, err := nlbatch.NewHandle()
		if err != nil {
			return nil, fmt.Errorf("vxlan backend: opening a netlink socket: %w", err)
		}
		nl, owned = h, h
	}
	b := &vxlanBackend{cfg: cfg, nl: nl, owned: owned, log: o.Logger, v4: v4}
	newPlane := func(p *plane, v6 bool) {
		*p = plane{
			v6:       v6,
			network:  o.Config.Network.Masked(),
			nl:       nl,
			log:      o.Logger,
			direct:   cfg.DirectRouting,
			nexthops: o.Nexthops,
			extName:  o.Ext.Iface.Name,
			spec: deviceSpec{
				Name:     deviceName(cfg.VNI, v6),
				VNI:      cfg.VNI,
				Local:    o.Ext.IfaceAddr,
				ExtIndex: o.Ext.Iface.Index,
				Port:     cfg.Port,
				GBP:      cfg.GBP,
				MTU:      o.Ext.Iface.MTU - encapOverhead,
			},
			want:     newDesired(),
			ignore:   map[netip.Prefix]ignored{},
			halfDone: map[addr]struct{}{},
		}
		if v6 {
			p.network = o.Config.IPv6Network.Masked()
			p.spec.Local = o.Ext.IfaceAddrV6
			p.spec.MTU = o.Ext.Iface.MTU - encapOverhead6
		}
		p.neighs = backend.NewReconciler[addr, neighVal](&p.neighTab, compareAddrs, backend.Same[neighVal])
		p.fdbs = backend.NewReconciler[hwAddr, fdbVal](&p.fdbTab, compareMACs, backend.Same[fdbVal])
	}
	newPlane(&b.plane, false)
	if v6 {
		b.v6 = new(plane)
		newPlane(b.v6, true)
	}
	return b, nil
}

// planes returns the overlays in use, IPv4 first.
func (b *vxlanBackend) planes() []*plane {
	ps := make([]*plane, 0, 2)
	if b.v4 {
		ps = append(ps, &b.plane)
	}
	if b.v6 != nil {
		ps = append(ps, b.v6)
	}
	return ps
}

// Init creates flannel.<VNI> (and flannel-v6.<VNI> with IPv6) or adopts
// matching ones, and returns their MACs as BackendData {"VNI":1,"VtepMAC":"..."}
// (and BackendV6Data) with MTU = external MTU − 50 (− 70 over IPv6; the
// smaller one when both).
func (b *vxlanBackend) Init(ctx context.Context) (backend.Publish, error) {
	if b.closed {
		return backend.Publish{}, ErrClosed
	}
	if err := ctx.Err(); err != nil {
		return backend.Publish{}, err
	}
	var pub backend.Publish
	for _, p := range b.planes() {
		if err := p.ensureDevice(); err != nil {
			return backend.Publish{}, err
		}
		data, err := json.Marshal(backendData{VNI: b.cfg.VNI, VtepMAC: p.mac.String()})
		if err != nil {
			return backend.Publish{}, fmt.Errorf("encoding BackendData: %w", err)
		}
		if p.v6 {
			pub.BackendV6Data = data
		} else {
			pub.BackendData = data
		}
		if pub.MTU == 0 || p.spec.MTU < pub.MTU {
			pub.MTU = p.spec.MTU
		}
		pub.Owned.Devices = append(pub.Owned.Devices, p.spec.Name)
		pub.Owned.Prefixes = append(pub.Owned.Prefixes, p.network)
		pub.Owned.ExtIndex = p.spec.ExtIndex
		b.log.Info("VXLAN device ready", "device", p.spec.Name, "vni", p.spec.VNI, "vtepMAC", p.mac.String(),
			"local", p.spec.Local, "dstport", p.spec.Port, "mtu", p.spec.MTU, "directRouting", b.cfg.DirectRouting)
	}
	return pub, nil
}

// ensureDevice makes the device match the spec (recreating it with the same
// MAC if it went away or was changed) and keeps the route reconciler on its
// current index.
func (b *plane) ensureDevice() error {
	dev, replaced, err := ensureDevice(b.nl, b.spec, b.mac)
	if err != nil {
		return err
	}
	if replaced != "" {
		b.log.Info("Replaced a VXLAN device that did not match the config, keeping its MAC", "device", b.spec.Name, "mismatch", replaced)
	}
	mac, err := macOf(dev)
	if err != nil {
		return fmt.Errorf("reading the MAC of %s: %w", b.spec.Name, err)
	}
	if b.dev != nil && mac != b.mac {
		// Someone changed the MAC by hand; peers hold the published one.
		// Putting it back is cheaper than re-publishing the lease.
		if err := b.setMAC(dev, b.mac); err != nil {
			return err
		}
		mac = b.mac
	}
	b.dev, b.mac = dev, mac
	if b.routes == nil || b.routeLink != dev.Index {
		// Routes leave through the device or, with DirectRouting, the
		// external interface. Owning routes on the external interface even
		// without DirectRouting cleans up after the option is turned off.
		b.routes = backend.NewRouteReconciler(b.nl, b.network, dev.Index, b.spec.ExtIndex)
		b.routes.UseNexthops(b.nexthops)
		b.routeLink = dev.Index
	}
	family := uint8(unix.AF_INET)
	if b.v6 {
		family = unix.AF_INET6
	}
	b.neighTab.nl, b.neighTab.link, b.neighTab.family = b.nl, dev.Index, family
	b.fdbTab.nl, b.fdbTab.link = b.nl, dev.Index
	return nil
}

func (b *plane) setMAC(dev *netlink.Vxlan, mac hwAddr) error {
	if err := b.nl.LinkSetHardwareAddr(dev, mac[:]); err != nil {
		return fmt.Errorf("restoring the MAC of %s from %s to the published %s: %w", b.spec.Name, dev.HardwareAddr, mac, err)
	}
	b.log.Info("Restored the published MAC of the VXLAN device", "device", b.spec.Name, "was", dev.HardwareAddr.String(), "vtepMAC", mac.String())
	dev.HardwareAddr = mac[:]
	return nil
}

// Apply brings each device to the own lease (address <subnet IP>/32 on
// flannel.<VNI>, <IPv6 subnet IP>/128 on flannel-v6.<VNI>, up) and makes the
// neighbour, fdb and route entries exactly those of the leases in remote,
// per family; the caller admitted them (valid subnets of the network, not
// this node's, of type vxlan). Each table goes through a backend.Reconciler:
// it reads each table once, sets missing or different entries (neighbours,
// then fdb entries, then routes), removes the entries of leases no longer
// present (routes, then fdb entries, then neighbours), and, for a lease
// whose route fails, takes its neighbour and fdb entry out again. A lease
// whose BackendData is unusable is left out and logged once; it never fails
// the call. A failure of one family does not stop the other.
func (b *vxlanBackend) Apply(ctx context.Context, own subnet.Lease, remote []subnet.Lease) error {
	if b.closed {
		return ErrClosed
	}
	if (b.v4 && b.dev == nil) || (b.v6 != nil && b.v6.dev == nil) {
		return errors.New("vxlan backend: Apply called before Init")
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if b.v4 && (!own.Subnet.Addr().Is4() || !ip.Contains(b.network, own.Subnet)) {
		return fmt.Errorf("applying vxlan leases: own lease %s is not a subnet of Network %s", own.Subnet, b.network)
	}
	if b.v6 != nil && (!own.IPv6Subnet.Addr().Is6() || !ip.Contains(b.v6.network, own.IPv6Subnet)) {
		return fmt.Errorf("applying vxlan leases: own IPv6 lease %s is not a subnet of IPv6Network %s", own.IPv6Subnet, b.v6.network)
	}
	var errs []error
	for _, p := range b.planes() {
		if err := p.apply(own, remote); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("applying vxlan leases: %w", errors.Join(errs...))
	}
	return nil
}

// apply is Apply for one family; its error names the device.
func (b *plane) apply(own subnet.Lease, remote []subnet.Lease) error {
	ownSubnet := own.Subnet
	if b.v6 {
		ownSubnet = own.IPv6Subnet
	}
	if err := b.ensureDevice(); err != nil {
		return err
	}
	bits := 32
	if b.v6 {
		bits = 128
	}
	if _, err := backend.ReconcileAddrs(b.nl, b.dev, netip.PrefixFrom(ownSubnet.Addr(), bits), 0); err != nil {
		return err
	}

	w := world{v6: b.v6, vtep: b.dev.Index, ext: b.spec.ExtIndex, direct: b.direct}
	if b.direct {
		nets, err := b.extNets()
		if err != nil {
			return err
		}
		w.extNets = nets
	}
	b.want.compute(w, remote)
	defer b.release()
	b.logSkips()

	var st stats
	var errs []error
	note := func(what string, err error) {
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", what, err))
		}
	}
	b.neighTab.want = &b.want.neighs
	if err := b.neighs.PlanSet(&b.want.neighs); err != nil {
		return err
	}
	if err := b.fdbs.PlanSet(&b.want.fdbs); err != nil {
		return err
	}
	// Per lease, WIRE.md's order: neighbour, fdb entry, route; a lease whose
	// neighbour or fdb entry fails gets no route, and one whose route fails
	// loses its neighbour and fdb entry again, so that none is left half
	// programmed (the next Apply tries all three again). Everything is set
	// before anything is deleted, and deletions go in the reverse order.
	clear(b.halfDone)
	b.neighs.Add()
	for _, gw := range b.neighs.FailedSets() {
		b.halfDone[gw] = struct{}{}
	}
	b.fdbs.Add()
	if failed := b.fdbs.FailedSets(); len(failed) > 0 {
		macs := make(map[hwAddr]bool, len(failed))
		for _, mac := range failed {
			macs[mac] = true
		}
		for i := range b.want.neighs.Len() {
			if macs[b.want.neighs.Val(i).mac] {
				b.halfDone[b.want.neighs.Key(i)] = struct{}{}
			}
		}
	}

	b.want.leaveOut(b.halfDone)
	routes := b.want.routes.Len()
	var err error
	st.Route, err = b.routes.ReconcileSet(ownSubnet, &b.want.routes)
	note("programming routes", err)
	for _, dst := range b.routes.FailedRoutes() {
		if gw := addrOf(dst.Addr()); backend.Search(&b.want.neighs, gw, compareAddrs) >= 0 {
			b.halfDone[gw] = struct{}{}
		}
	}
	st.RolledBack = len(b.halfDone)
	neighFailed, fdbFailed := b.rollBack()

	b.fdbs.Remove()
	b.neighs.Remove()
	st.FDB, err = b.fdbs.Result()
	note("programming fdb entries", err)
	st.Neigh, err = b.neighs.Result()
	note("programming neighbours", err)
	st.Neigh.Failed += neighFailed
	st.FDB.Failed += fdbFailed

	b.last = st
	if st.Neigh.Any() || st.FDB.Any() || st.Route.Any() {
		b.log.V(1).Info("Programmed vxlan leases", "device", b.spec.Name, "leases", len(remote), "routes", routes,
			"neigh", st.Neigh, "fdb", st.FDB, "route", st.Route, "rolledBack", st.RolledBack)
	}
	if len(errs) > 0 {
		return fmt.Errorf("%s: %w", b.spec.Name, errors.Join(errs...))
	}
	return nil
}

// rollBack removes the neighbour and fdb entry of each tunnelled lease in
// halfDone: the fdb entry as desired, and as it was if the set failed to
// change it. It returns how many deletes failed, per table.
func (b *plane) rollBack() (neighFailed, fdbFailed int) {
	if len(b.halfDone) == 0 {
		return 0, 0
	}
	b.rollBuf = b.rollBuf[:0]
	macs := make(map[hwAddr]bool, len(b.halfDone))
	for gw := range b.halfDone {
		if i := backend.Search(&b.want.neighs, gw, compareAddrs); i >= 0 {
			n := b.want.neighs.Val(i)
			b.rollBuf = append(b.rollBuf, b.neighTab.neigh(gw, n))
			macs[n.mac] = true
		}
	}
	n := len(b.rollBuf)
	for mac := range macs {
		if i := backend.Search(&b.want.fdbs, mac, compareMACs); i >= 0 {
			b.rollBuf = append(b.rollBuf, b.fdbTab.entry(mac, b.want.fdbs.Val(i)))
		}
	}
	b.fdbs.Replacing(func(mac hwAddr, _, have fdbVal) {
		if macs[mac] {
			b.rollBuf = append(b.rollBuf, b.fdbTab.entry(mac, have))
		}
	})
	errs := backend.Results(&b.errs, len(b.rollBuf))
	b.neighTab.delete(b.rollBuf[:n], errs[:n])
	b.fdbTab.delete(b.rollBuf[n:], errs[n:])
	for i, err := range errs {
		if err != nil && !isNotFound(err) {
			if i < n {
				neighFailed++
			} else {
				fdbFailed++
			}
		}
	}
	return neighFailed, fdbFailed
}

// release drops what an apply computed: the desired entries and, after a
// burst, the buffers.
func (b *plane) release() {
	b.want.release()
	b.neighTab.want = nil
	if len(b.halfDone) > keepBuf {
		b.halfDone = map[addr]struct{}{}
	}
	clear(b.halfDone)
	if cap(b.rollBuf) > keepBuf {
		b.rollBuf, b.errs = nil, nil
	}
}

// keepBuf is the largest buffer a plane keeps between Applies.
const keepBuf = 1024

// logSkips logs each lease that cannot be programmed once per reason, not on
// every Apply, and forgets leases that are gone or fixed.
func (b *plane) logSkips() {
	var gen uint64
	for _, v := range b.ignore {
		gen = max(gen, v.gen)
	}
	gen++
	for _, s := range b.want.skips {
		if prev, ok := b.ignore[s.Subnet]; !ok || prev.reason != s.Reason {
			b.log.Info("Ignoring lease", "subnet", s.Subnet, "reason", s.Reason)
		}
		b.ignore[s.Subnet] = ignored{reason: s.Reason, gen: gen}
	}
	for k, v := range b.ignore {
		if v.gen != gen {
			delete(b.ignore, k)
		}
	}
}

// extNets returns the networks the external interface is directly attached
// to (the prefixes of its addresses of the family; IPv6 link-local ones
// excepted).
func (b *plane) extNets() ([]netip.Prefix, error) {
	link := &netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: b.spec.ExtIndex, Name: b.extName}}
	family := netlink.FAMILY_V4
	if b.v6 {
		family = netlink.FAMILY_V6
	}
	addrs, err := b.nl.AddrList(link, family)
	if err != nil {
		return nil, fmt.Errorf("listing addresses of %s: %w", b.extName, err)
	}
	var nets []netip.Prefix
	for _, a := range addrs {
		for _, n := range []*net.IPNet{a.IPNet, a.Peer} {
			if p, ok := ip.PrefixFromIPNet(n); ok && !p.Addr().IsLinkLocalUnicast() {
				nets = append(nets, p)
			}
		}
	}
	return nets, nil
}

// Close marks the backend closed and closes the netlink handle it opened
// itself. The device and every entry stay in place so that a restarted
// daemon carries on without interrupting traffic.
func (b *vxlanBackend) Close() error {
	if b.closed {
		return nil
	}
	b.closed = true
	if b.owned != nil {
		b.owned.Close()
	}
	return nil
}
