// Package udp is flannel's udp backend: a TUN device, flannel0, whose
// packets travel as the payload of UDP datagrams, one inner IPv4 packet per
// datagram, to the node whose lease holds the destination.
//
// The fast path is pure Go. The TUN is opened with a virtio-net header so
// that one read returns a TCP super-packet of up to 64 KB, which
// wireguard-go's tun package splits into packets of at most the MTU; each
// run of packets for one peer goes out as one UDP_SEGMENT message, many
// messages per sendmmsg. Datagrams come in with UDP_GRO and recvmmsg; TCP
// segments of one flow are checked (checksums included) and coalesced again
// into one GSO write to the TUN, made with writev straight from the receive
// buffers. On the wire every datagram still carries exactly one inner
// packet, so flannel's one-datagram-per-read receiver interoperates.
//
// Keys of the Backend block (JSON, matched case-insensitively):
//
//	Port          UDP port on every node, 1..65535 (default 8285)
//	TUNOffload    virtio header and TCP/UDP segmentation offload on the TUN (true)
//	UDPGSO        send runs of datagrams with UDP_SEGMENT (true)
//	UDPGRO        receive coalesced datagrams with UDP_GRO (true)
//	StrictSource  accept a datagram only from a lease's PublicIP, with an inner
//	              source inside that lease's subnet (true)
//
// The offloads exist to be switched off when a kernel gets them wrong; a
// refused UDP_SEGMENT send also turns GSO off by itself.
package udp

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"syscall"

	"github.com/vishvananda/netlink"
	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/pkg/nlbatch"
	"github.com/flanneld-go/flanneld/subnet"
)

// TypeName is the backend's name in the config and in leases.
const TypeName = "udp"

// DeviceName is the TUN device's name.
const DeviceName = "flannel0"

// overhead is what the outer IPv4 and UDP headers take from the external
// MTU.
const overhead = 28

// RouteMetric is the metric of flannel0's Network route (the prefix route
// the kernel keeps for its address): higher than the kernel's default 0, so
// that when this host is moved back to flannel, whose udp backend cannot
// attach to our persistent flannel0 (it has vnet_hdr) and creates flannel1
// with the same address, the route of flannel1 wins over ours, which stays
// behind while flannel0 does. A restart of this daemon keeps the route.
const RouteMetric = 100

// Errors of the backend.
var (
	// ErrNotInitialized is returned by Apply before a successful Init.
	ErrNotInitialized = errors.New("udp backend: Apply called before Init")
	// ErrClosed is returned by Init and Apply after Close.
	ErrClosed = errors.New("udp backend: closed")
)

func init() {
	backend.Register(TypeName, func(o backend.Options) (backend.Backend, error) { return New(o) })
}

// netlinkHandle is the part of *nlbatch.Handle the backend uses.
type netlinkHandle interface {
	LinkByName(name string) (netlink.Link, error)
	LinkSetUp(link netlink.Link) error
	PromoteSecondaries(link int) error
	RouteListFiltered(family int, filter *netlink.Route, filterMask uint64) ([]netlink.Route, error)
	backend.AddrNetlink
}

// Backend is the udp backend. Create it with New.
type Backend struct {
	opts  backend.Options
	cfg   config
	log   klog.Logger
	nl    netlinkHandle
	owned *nlbatch.Handle // opened by New, closed by Close; nil if given
	mtu   int

	path path
	// peers keeps the packet path's table; used by Apply only.
	peers   *backend.Reconciler[netip.Prefix, netip.Addr]
	applied peerTable
	desired []backend.Entry[netip.Prefix, netip.Addr] // Apply's, reused while small

	mu     sync.Mutex // guards the fields below
	dev    tunDevice
	sock   *sockConn
	closed bool
	wg     sync.WaitGroup
}

// New checks the options and the udp keys of the Backend block. Devices and
// sockets are created by Init.
func New(o backend.Options) (*Backend, error) {
	if o.Config == nil {
		return nil, fmt.Errorf("%w: no network config", ErrInvalidConfig)
	}
	cfg, err := parseConfig(o.Config.Backend)
	if err != nil {
		return nil, err
	}
	if !o.Ext.IfaceAddr.Is4() {
		return nil, fmt.Errorf("udp backend needs the IPv4 address of the external interface, got %v", o.Ext.IfaceAddr)
	}
	if o.Ext.Iface == nil {
		return nil, errors.New("udp backend needs the external interface")
	}
	mtu := o.Ext.Iface.MTU - overhead
	if mtu < 576 {
		return nil, fmt.Errorf("udp backend: external interface %s has MTU %d; the overlay needs at least %d", o.Ext.Iface.Name, o.Ext.Iface.MTU, 576+overhead)
	}
	b := &Backend{opts: o, cfg: cfg, log: o.Logger, mtu: mtu}
	if o.Netlink != nil {
		b.nl = o.Netlink
	} else {
		h, err := nlbatch.NewHandle()
		if err != nil {
			return nil, fmt.Errorf("udp backend: %w", err)
		}
		b.nl, b.owned = h, h
	}
	b.path.log = o.Logger
	b.path.strict = cfg.StrictSource
	b.path.table.Store(newTable(nil, cfg.Port))
	b.applied.applied = map[netip.Prefix]netip.Addr{}
	b.peers = backend.NewReconciler[netip.Prefix, netip.Addr](&b.applied, netip.Prefix.Compare, backend.Same[netip.Addr])
	return b, nil
}

// keepDesired is the largest desired set an Apply leaves for the next one
// to reuse.
const keepDesired = 1024

// Init creates the TUN flannel0, or attaches to the one an earlier run
// left, and the UDP socket on <iface addr>:<Port>, both in the calling
// thread's network namespace, and starts the packet loops. It publishes MTU = external MTU - 28 and no BackendData.
func (b *Backend) Init(ctx context.Context) (backend.Publish, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return backend.Publish{}, ErrClosed
	}
	if b.dev != nil {
		return b.publish(), nil
	}
	sock, err := listen(netip.AddrPortFrom(b.opts.Ext.IfaceAddr, uint16(b.cfg.Port)), b.cfg.UDPGSO, b.cfg.UDPGRO)
	if err != nil {
		return backend.Publish{}, fmt.Errorf("opening the udp socket: %w", err)
	}
	dev, vnet, err := createTUN(DeviceName, b.mtu, b.cfg.TUNOffload)
	if err != nil {
		sock.Close()
		return backend.Publish{}, fmt.Errorf("creating TUN %s: %w", DeviceName, err)
	}
	if b.cfg.TUNOffload && !vnet {
		b.log.Info("TUN offloads unavailable; reading one packet at a time", "device", DeviceName)
	}
	b.log.Info("Started the udp backend", "device", DeviceName, "mtu", b.mtu,
		"listen", netip.AddrPortFrom(b.opts.Ext.IfaceAddr, uint16(b.cfg.Port)),
		"tunOffload", vnet, "udpGSO", sock.gso.Load(), "udpGRO", sock.gro, "strictSource", b.cfg.StrictSource)
	rc, err := dev.File().SyscallConn()
	if err != nil {
		dev.Close()
		sock.Close()
		return backend.Publish{}, fmt.Errorf("getting the file of TUN %s: %w", DeviceName, err)
	}
	b.path.out.Store(newTUNWriter(rc, vnet))
	b.dev, b.sock = dev, sock
	b.wg.Add(2)
	go func() { defer b.wg.Done(); b.path.tunLoop(dev, sock, b.mtu) }()
	go func() { defer b.wg.Done(); b.path.udpLoop(sock) }()
	track(b, true)
	return b.publish(), nil
}

// publish is what Init returns: the MTU, and flannel0 and the Network route
// through it as the kernel state to repair on events.
func (b *Backend) publish() backend.Publish {
	return backend.Publish{MTU: b.mtu, Owned: backend.Owned{Devices: []string{DeviceName}, Prefixes: []netip.Prefix{b.opts.Config.Network.Masked()}}}
}

// Apply gives flannel0 the address <own subnet IP>/<Network prefix> (so the
// kernel routes the whole Network into it), brings it up, and reconciles
// the packet path's peer table with the remote leases (admitted by the
// caller): when a peer was added, changed or removed, a new table built
// from the result is swapped in.
func (b *Backend) Apply(ctx context.Context, own subnet.Lease, remote []subnet.Lease) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return ErrClosed
	}
	if b.dev == nil {
		return ErrNotInitialized
	}
	if err := b.configureDevice(own.Subnet); err != nil {
		return err
	}
	b.desired = b.desired[:0]
	for i := range remote {
		b.desired = append(b.desired, backend.Entry[netip.Prefix, netip.Addr]{Key: remote[i].Subnet, Val: remote[i].Attrs.PublicIP})
	}
	b.desired = backend.SortEntries(b.desired, netip.Prefix.Compare)
	c, err := b.peers.Reconcile(b.desired)
	if cap(b.desired) > keepDesired {
		b.desired = nil // kept only while small
	}
	if c.Any() {
		b.path.table.Store(newTable(b.applied.applied, b.cfg.Port))
		b.log.V(1).Info("Updated the udp peer table", "peers", len(b.applied.applied), "added", c.Added, "updated", c.Updated, "removed", c.Removed)
	}
	return err
}

// configureDevice makes flannel0's IPv4 addresses exactly
// <own subnet IP>/<Network prefix>, whose prefix route (the Network route)
// has RouteMetric, and sets it up. The new address is added before a stale
// one (a previous lease's) is deleted, like every entry a backend owns; as
// both are in one subnet, the new one is a secondary, so promote_secondaries
// is turned on first: deleting the old primary then promotes it instead of
// taking it along. An address of an earlier version, whose route has the
// kernel's metric 0, is given RouteMetric in place.
func (b *Backend) configureDevice(own netip.Prefix) error {
	link, err := b.nl.LinkByName(DeviceName)
	if errors.As(err, new(netlink.LinkNotFoundError)) {
		if err = b.reattach(); err == nil {
			link, err = b.nl.LinkByName(DeviceName)
		}
	}
	if err != nil {
		return fmt.Errorf("finding %s: %w", DeviceName, err)
	}
	if err := b.nl.PromoteSecondaries(link.Attrs().Index); err != nil {
		return fmt.Errorf("configuring %s: %w", DeviceName, err)
	}
	want := netip.PrefixFrom(own.Addr(), b.opts.Config.Network.Bits())
	c, err := backend.ReconcileAddrs(b.nl, link, want, RouteMetric)
	if err != nil {
		return err
	}
	if c.Added == 0 && link.Attrs().Flags&net.FlagUp != 0 {
		// The address was there. Its route is there only while the link
		// is up (a down link is set up below, and the kernel adds the
		// route then): check its metric.
		ok, err := b.routeMetricOK(link)
		if err != nil {
			return err
		}
		if !ok {
			if err := b.nl.ReplaceAddr(link.Attrs().Index, want, RouteMetric); err != nil {
				return fmt.Errorf("setting the metric of %s on %s to %d: %w", want, DeviceName, RouteMetric, err)
			}
		}
	}
	if err := b.nl.LinkSetUp(link); err != nil {
		return fmt.Errorf("setting %s up: %w", DeviceName, err)
	}
	return nil
}

// reattach creates flannel0 again after it was deleted (ip link del): the
// TUN the process holds then belongs to no device, and its reads and writes
// fail. The new TUN gets the packet loop of the old one, which is closed;
// the caller gives it its address. Called with b.mu held.
func (b *Backend) reattach() error {
	dev, vnet, err := createTUN(DeviceName, b.mtu, b.cfg.TUNOffload)
	if err != nil {
		return fmt.Errorf("creating TUN %s again after it was deleted: %w", DeviceName, err)
	}
	rc, err := dev.File().SyscallConn()
	if err != nil {
		dev.Close()
		return fmt.Errorf("getting the file of TUN %s: %w", DeviceName, err)
	}
	old := b.dev
	b.dev = dev
	b.path.out.Store(newTUNWriter(rc, vnet))
	old.Close() // its loop ends
	sock := b.sock
	b.wg.Add(1)
	go func() { defer b.wg.Done(); b.path.tunLoop(dev, sock, b.mtu) }()
	b.log.Info("Created the TUN again after it was deleted", "device", DeviceName, "tunOffload", vnet)
	return nil
}

// routeMetricOK reports whether flannel0's routes to Network are exactly
// the prefix route with RouteMetric.
func (b *Backend) routeMetricOK(link netlink.Link) (bool, error) {
	rs, err := b.nl.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{LinkIndex: link.Attrs().Index, Dst: ip.IPNet(b.opts.Config.Network)},
		netlink.RT_FILTER_OIF|netlink.RT_FILTER_DST)
	if err != nil {
		return false, fmt.Errorf("listing the routes of %s: %w", DeviceName, err)
	}
	return len(rs) == 1 && rs[0].Priority == RouteMetric, nil
}

// Stats returns the packet counters.
func (b *Backend) Stats() Stats { return b.path.ctr.snapshot() }

// Close stops the packet loops and closes the socket and the TUN. The TUN
// is persistent: flannel0 stays, with its address and the Network route
// through it (packets to it are dropped until a restarted daemon attaches
// to it again), so a restart does not take the route away. Idempotent.
func (b *Backend) Close() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	track(b, false)
	var errs []error
	if b.sock != nil {
		if err := b.sock.Close(); err != nil {
			errs = append(errs, fmt.Errorf("closing the udp socket: %w", err))
		}
	}
	if b.dev != nil {
		// wireguard-go's TUN wakes its link listener through a pipe; when
		// the listener saw the shutdown first and closed its end, the
		// wake-up fails with EPIPE, yet the TUN file was closed all the
		// same.
		if err := b.dev.Close(); err != nil && !errors.Is(err, syscall.EPIPE) {
			errs = append(errs, fmt.Errorf("closing %s: %w", DeviceName, err))
		}
	}
	b.mu.Unlock()
	b.wg.Wait()
	if b.owned != nil {
		b.owned.Close()
	}
	return errors.Join(errs...)
}
