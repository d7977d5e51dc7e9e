// Package wireguard is flannel's wireguard backend: pod traffic between
// nodes travels encrypted through WireGuard devices, one peer per remote
// node, wire-compatible with flannel v0.28's nodes.
//
// Devices (Mode "separate", the default): flannel-wg for IPv4 on ListenPort,
// flannel-wg-v6 for IPv6 on ListenPortV6; other modes put both families on
// flannel-wg. Each has the first address of the own subnet (/32, /128), the
// route for the whole Network (IPv6Network) via the device with scope link,
// and MTU = MTU - 80 (MTU defaults to the external interface's); the same is
// FLANNEL_MTU. The lease carries BackendType "wireguard" and
// BackendData (BackendV6Data) {"PublicKey":"<base64>","Port":<listen port>}.
//
// The private key is read from /run/flannel/wgkey ($WIREGUARD_KEY_FILE),
// or generated and written there (0400) when the file is missing, so the
// public key survives restarts.
//
// Data path: the kernel's WireGuard when it has it; otherwise wireguard-go
// runs inside the daemon on a TUN of the same name and serves its UAPI
// socket (/var/run/wireguard/<dev>.sock). Both are configured through
// wgctrl, which reaches either, and wg(8) shows either. The choice is made
// at Init and logged.
//
// Keys of the Backend block (JSON, matched case-insensitively):
//
//	ListenPort                   UDP port of flannel-wg (51820)
//	ListenPortV6                 UDP port of flannel-wg-v6 (51821)
//	PSK                          preshared key of every peer (wg genpsk), optional
//	PersistentKeepaliveInterval  seconds, 0 = off (0)
//	MTU                          underlay MTU (the external interface's)
//	Mode                         separate, auto, ipv4 or ipv6 (separate)
package wireguard

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/internal/metrics"
	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/subnet"
)

// Type is the backend's name in the config and in leases.
const Type = "wireguard"

// Device names.
const (
	DeviceName   = "flannel-wg"
	DeviceNameV6 = "flannel-wg-v6"
)

// overhead is what WireGuard takes from the underlay MTU: an IPv6 header
// (40), UDP (8), WireGuard's header (16) and tag (16).
const overhead = 80

// Errors of the backend.
var (
	// ErrNotInitialized is returned by Apply before a successful Init.
	ErrNotInitialized = errors.New("wireguard backend: Apply called before Init")
	// ErrClosed is returned by Init and Apply after Close.
	ErrClosed = errors.New("wireguard backend: closed")
)

func init() {
	backend.Register(Type, func(o backend.Options) (backend.Backend, error) { return New(o) })
}

// netlinkHandle is the part of the netlink handle the backend uses.
type netlinkHandle interface {
	linkHandle
	LinkSetUp(link netlink.Link) error
	AddrList(link netlink.Link, family int) ([]netlink.Addr, error)
	AddrReplace(link netlink.Link, addr *netlink.Addr) error
	AddrDel(link netlink.Link, addr *netlink.Addr) error
	RouteReplace(route *netlink.Route) error
}

// Backend is the wireguard backend. Create it with New.
type Backend struct {
	opts   backend.Options
	cfg    config
	log    klog.Logger
	nl     netlinkHandle
	owned  *netlink.Handle // opened by New, closed by Close
	mtu    int             // device MTU and FLANNEL_MTU
	getenv func(string) string
	path   dataPath // chosen by Init

	mu     sync.Mutex
	closed bool
	key    wgtypes.Key
	client wgClient
	closer func() error // closes client
	devs   []*wgDev     // in the order of specs
	table  peerTable
}

// wgDev is one WireGuard device and its reconcile state.
type wgDev struct {
	spec    devSpec
	link    *wgLink
	want    map[wgtypes.Key]peer
	have    map[wgtypes.Key]peer
	skipped map[netip.Prefix]string
	noted   map[netip.Prefix]string
}

// New checks the options and the wireguard keys of the Backend block.
// Devices are created by Init.
func New(o backend.Options) (*Backend, error) {
	if o.Config == nil {
		return nil, errors.New("wireguard backend: no network config given")
	}
	if o.Ext.Iface == nil {
		return nil, errors.New("wireguard backend: no external interface given")
	}
	cfg, err := parseConfig(o.Config.Backend)
	if err != nil {
		return nil, err
	}
	under := cfg.MTU
	if under == 0 {
		under = o.Ext.Iface.MTU
	}
	mtu := under - overhead
	if mtu < 576 {
		return nil, fmt.Errorf("wireguard backend: the underlay MTU %d (of %s, or the MTU key) leaves %d for the device; it needs at least %d", under, o.Ext.Iface.Name, mtu, 576+overhead)
	}
	if o.Config.EnableIPv6 && mtu < 1280 {
		return nil, fmt.Errorf("wireguard backend: EnableIPv6 needs a device MTU of at least 1280, but the underlay MTU %d leaves %d; raise the MTU key or the interface MTU to %d", under, mtu, 1280+overhead)
	}
	b := &Backend{opts: o, cfg: cfg, log: o.Logger, mtu: mtu, getenv: os.Getenv}
	if o.Netlink != nil {
		b.nl = o.Netlink
	} else {
		h, err := netlink.NewHandle()
		if err != nil {
			return nil, fmt.Errorf("wireguard backend: %w", err)
		}
		b.nl, b.owned = h, h
	}
	return b, nil
}

// families reports which address families the config enables (IPv4 unless
// only IPv6 is enabled, as the other backends read a Config).
func (b *Backend) families() (v4, v6 bool) {
	c := b.opts.Config
	return c.EnableIPv4 || !c.EnableIPv6, c.EnableIPv6
}

// specs lists the devices the config asks for.
func (b *Backend) specs() []devSpec {
	v4, v6 := b.families()
	if b.cfg.Mode != ModeSeparate {
		return []devSpec{{name: DeviceName, v4: v4, v6: v6, port: b.cfg.ListenPort}}
	}
	var s []devSpec
	if v4 {
		s = append(s, devSpec{name: DeviceName, v4: true, port: b.cfg.ListenPort})
	}
	if v6 {
		s = append(s, devSpec{name: DeviceNameV6, v6: true, port: b.cfg.ListenPortV6})
	}
	return s
}

// Init reads (or creates) the private key, chooses the data path, creates
// the devices with their key and listen port, and returns the lease data:
// {"PublicKey":...,"Port":...} for each family and MTU = MTU - 80.
func (b *Backend) Init(ctx context.Context) (backend.Publish, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return backend.Publish{}, ErrClosed
	}
	if b.client != nil {
		return b.publish(), nil
	}
	ext := b.opts.Ext
	v4, v6 := b.families()
	switch {
	case (v4 && b.cfg.Mode != ModeIPv6) && !ext.IfaceAddr.Is4():
		return backend.Publish{}, fmt.Errorf("interface %s has no IPv4 address; peers reach this node at it (choose another with --iface, or set Mode \"ipv6\")", ext.Iface.Name)
	case (v6 && b.cfg.Mode == ModeSeparate || b.cfg.Mode == ModeIPv6) && !(ext.IfaceAddrV6.Is6() && !ext.IfaceAddrV6.Is4In6()):
		return backend.Publish{}, fmt.Errorf("IPv6 peers reach this node at its IPv6 address but %s", ext.MissingIPv6())
	}
	path := keyFile(b.getenv)
	key, created, err := loadOrCreateKey(path)
	if err != nil {
		return backend.Publish{}, err
	}
	if created {
		b.log.Info("Wrote a new WireGuard private key", "file", path)
	}
	b.key = key

	specs := b.specs()
	p, why, err := b.choose(specs[0].name)
	if err != nil {
		return backend.Publish{}, err
	}
	b.path = p
	b.log.Info("WireGuard data path chosen", "path", p.String(), "reason", why)

	client, err := wgctrl.New()
	if err != nil {
		return backend.Publish{}, fmt.Errorf("opening wgctrl: %w", err)
	}
	b.client, b.closer = client, client.Close
	fail := func(err error) (backend.Publish, error) {
		// Init may be called again: start from nothing then.
		b.closeDevices()
		client.Close()
		b.client, b.closer = nil, nil
		return backend.Publish{}, err
	}
	b.table = peerTable{
		mode:        b.cfg.Mode,
		ka:          b.cfg.Keepalive,
		ownV4:       ext.IfaceAddr.Is4(),
		ownV6:       ext.IfaceAddrV6.Is6() && !ext.IfaceAddrV6.Is4In6(),
		ownV6Public: !ext.IfaceAddrV6.IsPrivate(),
	}
	if b.cfg.PSK != nil {
		b.table.psk = *b.cfg.PSK
	}
	for _, s := range specs {
		var l *wgLink
		if p == kernelPath {
			l, err = openKernel(b.nl, s.name, b.mtu)
		} else {
			l, err = openUserspace(s.name, b.mtu, b.log)
		}
		if err != nil {
			return fail(err)
		}
		b.devs = append(b.devs, &wgDev{spec: s, link: l, want: map[wgtypes.Key]peer{}, have: map[wgtypes.Key]peer{},
			skipped: map[netip.Prefix]string{}, noted: map[netip.Prefix]string{}})
		port := s.port
		if err := b.client.ConfigureDevice(s.name, wgtypes.Config{PrivateKey: &key, ListenPort: &port}); err != nil {
			return fail(fmt.Errorf("setting the private key and listen port %d of %s: %w", port, s.name, err))
		}
	}
	b.log.Info("Started the wireguard backend", "mode", string(b.cfg.Mode), "devices", len(b.devs), "mtu", b.mtu,
		"publicKey", key.PublicKey().String(), "listenPort", b.cfg.ListenPort, "listenPortV6", b.cfg.ListenPortV6)
	return b.publish(), nil
}

// choose decides the data path by trying to create the kernel device.
func (b *Backend) choose(name string) (dataPath, string, error) {
	la := netlink.NewLinkAttrs()
	la.Name, la.MTU = name, b.mtu
	err := b.nl.LinkAdd(&netlink.GenericLink{LinkAttrs: la, LinkType: "wireguard"})
	var existing netlink.Link
	if errors.Is(err, unix.EEXIST) {
		existing, _ = b.nl.LinkByName(name)
	}
	return choosePath(name, err, existing)
}

// publish is the lease data of the backend.
func (b *Backend) publish() backend.Publish {
	v4, v6 := b.families()
	pub := b.key.PublicKey().String()
	data := func(port int) []byte {
		return fmt.Appendf(nil, `{"PublicKey":%q,"Port":%d}`, pub, port)
	}
	p := backend.Publish{MTU: b.mtu}
	if v4 {
		p.BackendData = data(b.cfg.ListenPort)
	}
	if v6 {
		port := b.cfg.ListenPortV6
		if b.cfg.Mode != ModeSeparate {
			port = b.cfg.ListenPort // one device, one port
		}
		p.BackendV6Data = data(port)
	}
	return p
}

// Apply gives each device its address and Network route, sets it up, and
// makes its peers exactly the remote leases' (a peer removed by hand comes
// back; a peer of a lease gone is removed). A failure of one device does
// not stop the other.
func (b *Backend) Apply(ctx context.Context, own subnet.Lease, remote []subnet.Lease) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return ErrClosed
	}
	if b.client == nil {
		return ErrNotInitialized
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	var errs []error
	peers := 0
	for _, d := range b.devs {
		if err := b.ensureLink(d); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := b.configureLink(d.spec, own); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := d.link.up(); err != nil {
			errs = append(errs, fmt.Errorf("bringing wireguard-go's %s up: %w", d.spec.name, err))
			continue
		}
		clear(d.skipped)
		b.table.desired(d.spec, remote, d.want, d.skipped)
		for k, why := range d.skipped {
			if d.noted[k] != why {
				b.log.Info("Ignoring lease", "device", d.spec.name, "subnet", k, "reason", why)
			}
		}
		d.noted, d.skipped = d.skipped, d.noted
		c, err := reconcilePeers(b.client, d.spec.name, b.key, d.spec.port, d.want, d.have, d.link.greet)
		if c.Any() {
			b.log.Info("Reconciled WireGuard peers", "device", d.spec.name, "peers", len(d.want), "added", c.Added, "updated", c.Updated, "removed", c.Removed, "failed", c.Failed)
		}
		peers += len(d.want) - c.Failed
		if err != nil {
			errs = append(errs, err)
		}
	}
	metrics.Programmed.WithLabelValues(Type, "peer").Set(float64(peers))
	return errors.Join(errs...)
}

// ensureLink creates the device again, on the path Init chose, when it was
// deleted (ip link del): with its key and listen port; its peers follow in
// the same Apply.
func (b *Backend) ensureLink(d *wgDev) error {
	_, err := b.nl.LinkByName(d.spec.name)
	if err == nil {
		return nil
	}
	if !errors.As(err, new(netlink.LinkNotFoundError)) {
		return fmt.Errorf("finding %s: %w", d.spec.name, err)
	}
	// The old wireguard-go (if any) goes first: closing its UAPI listener
	// removes the socket file the new one would use.
	d.link.close()
	var l *wgLink
	if b.path == kernelPath {
		l, err = openKernel(b.nl, d.spec.name, b.mtu)
	} else {
		l, err = openUserspace(d.spec.name, b.mtu, b.log)
	}
	if err != nil {
		return fmt.Errorf("creating %s again after it was deleted: %w", d.spec.name, err)
	}
	d.link = l
	clear(d.have)
	key, port := b.key, d.spec.port
	if err := b.client.ConfigureDevice(d.spec.name, wgtypes.Config{PrivateKey: &key, ListenPort: &port}); err != nil {
		return fmt.Errorf("setting the private key and listen port %d of %s: %w", port, d.spec.name, err)
	}
	b.log.Info("Created the WireGuard device again; it had been deleted", "device", d.spec.name, "path", b.path.String())
	return nil
}

// configureLink makes the device's addresses exactly the first address of
// each own subnet it carries (/32, /128), sets it up, and routes each
// Network it carries through it with scope link.
func (b *Backend) configureLink(s devSpec, own subnet.Lease) error {
	link, err := b.nl.LinkByName(s.name)
	if err != nil {
		return fmt.Errorf("finding %s: %w", s.name, err)
	}
	if link.Attrs().MTU != b.mtu {
		if err := b.nl.LinkSetMTU(link, b.mtu); err != nil {
			return fmt.Errorf("setting the MTU of %s to %d: %w", s.name, b.mtu, err)
		}
	}
	c := b.opts.Config
	type fam struct {
		on      bool
		sub     netip.Prefix
		network netip.Prefix
		family  int
		bits    int
	}
	for _, f := range []fam{
		{s.v4, own.Subnet, c.Network, netlink.FAMILY_V4, 32},
		{s.v6, own.IPv6Subnet, c.IPv6Network, netlink.FAMILY_V6, 128},
	} {
		if !f.on || !f.sub.IsValid() {
			continue
		}
		if err := b.ensureAddr(link, s.name, f.sub.Addr(), f.family, f.bits); err != nil {
			return err
		}
	}
	if err := b.nl.LinkSetUp(link); err != nil {
		return fmt.Errorf("setting %s up: %w", s.name, err)
	}
	for _, f := range []fam{
		{s.v4, own.Subnet, c.Network, netlink.FAMILY_V4, 32},
		{s.v6, own.IPv6Subnet, c.IPv6Network, netlink.FAMILY_V6, 128},
	} {
		if !f.on || !f.sub.IsValid() {
			continue
		}
		r := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: ip.IPNet(f.network.Masked()), Scope: netlink.SCOPE_LINK}
		if err := b.nl.RouteReplace(r); err != nil {
			return fmt.Errorf("routing %s via %s: %w", f.network, s.name, err)
		}
	}
	return nil
}

// ensureAddr makes a the only address of its family on the link (IPv6
// link-local addresses aside). Stale ones go first, as an address left from
// an old lease would otherwise stay.
func (b *Backend) ensureAddr(link netlink.Link, name string, a netip.Addr, family, bits int) error {
	addrs, err := b.nl.AddrList(link, family)
	if err != nil {
		return fmt.Errorf("listing the addresses of %s: %w", name, err)
	}
	have := false
	for i := range addrs {
		got, ok := ip.FromIP(addrs[i].IP)
		if !ok || got.IsLinkLocalUnicast() {
			continue
		}
		ones, _ := addrs[i].Mask.Size()
		if got == a && ones == bits {
			have = true
			continue
		}
		if err := b.nl.AddrDel(link, &addrs[i]); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
			return fmt.Errorf("removing stale address %s from %s: %w", addrs[i].IPNet, name, err)
		}
	}
	if have {
		return nil
	}
	na := &netlink.Addr{IPNet: ip.HostNet(a, bits)}
	if family == netlink.FAMILY_V6 {
		na.Flags = unix.IFA_F_NODAD
	}
	if err := b.nl.AddrReplace(link, na); err != nil {
		return fmt.Errorf("adding address %s/%d to %s: %w", a, bits, name, err)
	}
	return nil
}

// DataPath says which data path Init chose: "kernel" or "userspace".
func (b *Backend) DataPath() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.path == kernelPath {
		return "kernel"
	}
	return "userspace"
}

func (b *Backend) closeDevices() {
	for _, d := range b.devs {
		d.link.close()
	}
	b.devs = nil
}

// Close stops wireguard-go if it runs in this process (its TUN goes with
// it: traffic stops until the next start brings the devices back) and
// closes wgctrl. Kernel devices stay with their peers, so traffic goes on
// across a restart. Idempotent.
func (b *Backend) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil
	}
	b.closed = true
	if b.path == userspacePath && len(b.devs) > 0 {
		b.log.Info("Stopping wireguard-go: its devices and their routes go with it until the next start", "devices", len(b.devs))
	}
	b.closeDevices()
	var err error
	if b.closer != nil {
		err = b.closer()
	}
	if b.owned != nil {
		b.owned.Close()
	}
	return err
}
