package wireguard

import (
	"errors"
	"fmt"
	"net"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/ipc"
	"golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	"k8s.io/klog/v2"
)

// dataPath is where the WireGuard devices live: the kernel's module, or
// wireguard-go inside this process on a TUN of the same name. Both are
// configured the same way afterwards (wgctrl: generic netlink for the
// kernel, the UAPI socket /var/run/wireguard/<dev>.sock for wireguard-go).
type dataPath int

const (
	kernelPath dataPath = iota
	userspacePath
)

func (p dataPath) String() string {
	if p == kernelPath {
		return "kernel"
	}
	return "userspace wireguard-go"
}

// linkHandle is the part of the netlink handle the devices need.
type linkHandle interface {
	LinkAdd(link netlink.Link) error
	LinkByName(name string) (netlink.Link, error)
	LinkSetMTU(link netlink.Link, mtu int) error
}

// choosePath decides the data path from the answer to creating a link of
// type wireguard named name: created (or one of that type already there,
// left by an earlier run) → the kernel's; the kernel has no WireGuard (no
// module, EOPNOTSUPP) or a TUN of that name exists (left by a userspace run)
// → wireguard-go. Anything else is an error naming the device. why says
// what made the choice, for the log.
func choosePath(name string, addErr error, existing netlink.Link) (p dataPath, why string, err error) {
	switch {
	case addErr == nil:
		return kernelPath, "created a link of type wireguard", nil
	case errors.Is(addErr, unix.EEXIST) && existing != nil:
		switch t := existing.Type(); t {
		case "wireguard":
			return kernelPath, "reusing the existing wireguard link " + name, nil
		case "tun", "tuntap":
			return userspacePath, "a TUN named " + name + " exists (left by a userspace run)", nil
		default:
			return 0, "", fmt.Errorf("a device %s of type %s exists; delete it (ip link del %s) so the backend can create its own", name, t, name)
		}
	case errors.Is(addErr, unix.EOPNOTSUPP), errors.Is(addErr, unix.EPROTONOSUPPORT), errors.Is(addErr, unix.ENODEV):
		return userspacePath, "the kernel has no WireGuard (creating a link of type wireguard: " + addErr.Error() + ")", nil
	}
	return 0, "", fmt.Errorf("creating the WireGuard device %s: %w", name, addErr)
}

// wgLink is one WireGuard device this backend runs: a kernel link, or a
// TUN driven by an in-process wireguard-go device with its UAPI socket.
type wgLink struct {
	name string
	user *userDevice // nil on the kernel path
}

// openKernel makes sure a kernel WireGuard link name exists with the MTU
// (kept across restarts, so that traffic goes on while the daemon is
// away).
func openKernel(nl linkHandle, name string, mtu int) (*wgLink, error) {
	l, err := nl.LinkByName(name)
	if err != nil {
		la := netlink.NewLinkAttrs()
		la.Name, la.MTU = name, mtu
		if err := nl.LinkAdd(&netlink.GenericLink{LinkAttrs: la, LinkType: "wireguard"}); err != nil && !errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("creating the WireGuard device %s: %w", name, err)
		}
		if l, err = nl.LinkByName(name); err != nil {
			return nil, fmt.Errorf("finding %s after creating it: %w", name, err)
		}
	}
	if t := l.Type(); t != "wireguard" {
		return nil, fmt.Errorf("a device %s of type %s exists; delete it (ip link del %s) so the backend can create its own", name, t, name)
	}
	if l.Attrs().MTU != mtu {
		if err := nl.LinkSetMTU(l, mtu); err != nil {
			return nil, fmt.Errorf("setting the MTU of %s to %d: %w", name, mtu, err)
		}
	}
	return &wgLink{name: name}, nil
}

// userDevice is wireguard-go running in this process.
type userDevice struct {
	dev  *device.Device
	uapi net.Listener
	wg   sync.WaitGroup
}

// openUserspace creates the TUN name (in the calling thread's network
// namespace) with the MTU, runs a wireguard-go device on it, and serves the
// device's UAPI socket (/var/run/wireguard/<name>.sock) so that wgctrl and
// wg(8) configure and show it. wireguard-go's tun package opens the TUN
// with a virtio-net header and turns on TCP segmentation offload (and UDP's
// where the kernel has it), and its bind sends and receives with UDP GSO and
// GRO: both sides of the data path move batches.
func openUserspace(name string, mtu int, log klog.Logger) (*wgLink, error) {
	tdev, err := tun.CreateTUN(name, mtu)
	if errors.Is(err, unix.EBUSY) {
		return nil, fmt.Errorf("creating TUN %s for wireguard-go: another process has it open (is another flanneld running?): %w", name, err)
	}
	if err != nil {
		return nil, fmt.Errorf("creating TUN %s for wireguard-go: %w", name, err)
	}
	dev := device.NewDevice(tdev, conn.NewDefaultBind(), wgLogger(log.WithValues("device", name)))
	f, err := ipc.UAPIOpen(name)
	if err != nil {
		dev.Close()
		return nil, fmt.Errorf("opening the UAPI socket of %s in /var/run/wireguard: %w", name, err)
	}
	ln, err := ipc.UAPIListen(name, f)
	if err != nil {
		f.Close()
		dev.Close()
		return nil, fmt.Errorf("listening on the UAPI socket of %s: %w", name, err)
	}
	u := &userDevice{dev: dev, uapi: ln}
	u.wg.Add(1)
	go func() {
		defer u.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return // closed
			}
			go dev.IpcHandle(c) // ends when the client hangs up
		}
	}()
	return &wgLink{name: name, user: u}, nil
}

// up brings wireguard-go's device up now (its sockets open, peers added
// from then on start at once) rather than when it sees the TUN's link event.
func (l *wgLink) up() error {
	if l.user == nil {
		return nil
	}
	return l.user.dev.Up()
}

// greet makes wireguard-go send a keepalive to peer k, which starts a
// handshake when there is no session: a restarted daemon has lost its
// sessions, and a peer that only receives would otherwise keep sending with
// the old ones until WireGuard gives up on them (about 15 s). The kernel's
// devices keep their sessions across a restart: nothing to do there.
func (l *wgLink) greet(k wgtypes.Key) {
	if l.user == nil {
		return
	}
	if p := l.user.dev.LookupPeer(device.NoisePublicKey(k)); p != nil {
		p.SendKeepalive()
	}
}

// wgLogger passes wireguard-go's messages to log: its errors (a peer's
// failed handshake, say) at verbosity 1, the rest at 4. Below those levels
// nothing is formatted.
func wgLogger(log klog.Logger) *device.Logger {
	l := &device.Logger{Verbosef: device.DiscardLogf, Errorf: device.DiscardLogf}
	if v := log.V(4); v.Enabled() {
		l.Verbosef = func(format string, args ...any) { v.Info(fmt.Sprintf(format, args...)) }
	}
	if v := log.V(1); v.Enabled() {
		l.Errorf = func(format string, args ...any) { v.Info(fmt.Sprintf(format, args...)) }
	}
	return l
}

// close stops wireguard-go (its TUN goes with it); a kernel link stays.
func (l *wgLink) close() {
	if l == nil || l.user == nil {
		return
	}
	l.user.uapi.Close()
	l.user.dev.Close()
	l.user.wg.Wait()
}
