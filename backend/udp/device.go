package udp

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/tun"
)

// tunDevice is what the packet path needs of the TUN: wireguard-go's
// tun.Device, narrowed. Read splits a virtio GSO super-packet into packets of
// at most the MTU (computing their checksums); Write is used for the ICMP
// errors only, received packets go through tunWriter.
type tunDevice interface {
	Read(bufs [][]byte, sizes []int, offset int) (int, error)
	Write(bufs [][]byte, offset int) (int, error)
	Close() error
}

// tunOffset is the headroom left before each packet in the TUN buffers: the
// virtio-net header (10 bytes) is written there.
const tunOffset = 16

// createTUN creates the TUN device name in the calling thread's network
// namespace, or attaches to it when it exists (left by an earlier run):
// IFF_TUN|IFF_NO_PI as flannel, plus IFF_VNET_HDR when offload is true, in
// which case wireguard-go's tun package enables the TCP (and, where the
// kernel has them, UDP) segmentation offloads. The device is made
// persistent, so that closing it leaves it in place with its address and
// the routes through it: packets sent to it meanwhile are dropped, and the
// next run attaches to it again. It sets the MTU. vnet reports whether
// offloads are on.
func createTUN(name string, mtu int, offload bool) (dev tun.Device, vnet bool, err error) {
	if offload {
		dev, err = openTUN(name, mtu, unix.IFF_VNET_HDR)
		if err == nil {
			return dev, true, nil
		}
		if errors.Is(err, unix.EBUSY) {
			return nil, false, err // held by another process: no use retrying
		}
		offErr := err
		dev, err = openTUN(name, mtu, 0)
		if err != nil {
			return nil, false, errors.Join(offErr, err)
		}
		return dev, false, nil
	}
	dev, err = openTUN(name, mtu, 0)
	return dev, false, err
}

func openTUN(name string, mtu int, extra uint16) (tun.Device, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening /dev/net/tun (is the tun module loaded?): %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("naming TUN %q: %w", name, err)
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI | extra)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, attachError(name, err)
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETPERSIST, 1); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("making TUN %s persistent: %w", name, err)
	}
	if extra&unix.IFF_VNET_HDR == 0 {
		// A device left by a run with offloads keeps them; without the
		// virtio header its reads would return unsplit super-packets.
		if err := unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, 0); err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("turning off the offloads of TUN %s: %w", name, err)
		}
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("setting TUN %s non-blocking: %w", name, err)
	}
	f := os.NewFile(uintptr(fd), "/dev/net/tun")
	dev, err := tun.CreateTUNFromFile(f, mtu)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("setting up TUN %s: %w", name, err)
	}
	// The device reports link events; nobody needs them, but its
	// goroutines block when the channel fills. It is closed by Close.
	go func() {
		for range dev.Events() {
		}
	}()
	return dev, nil
}

// attachError explains a failed TUNSETIFF on name: EBUSY means another
// process holds the existing device, EINVAL that a device of that name
// exists but is not a single-queue TUN.
func attachError(name string, err error) error {
	switch {
	case errors.Is(err, unix.EBUSY):
		return fmt.Errorf("attaching to TUN %s: another process has it open (is another flanneld running?): %w", name, err)
	case errors.Is(err, unix.EINVAL):
		return fmt.Errorf("creating TUN %s: a device of that name exists and is not a single-queue TUN; delete it (ip link del %s): %w", name, name, err)
	}
	return fmt.Errorf("creating TUN %s: %w", name, err)
}
