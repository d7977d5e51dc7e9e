package udp

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/subnet"
)

// flannelPeer imitates flannel's udp data path: a plain TUN
// (IFF_TUN|IFF_NO_PI, no offloads) and a socket that reads one datagram
// at a time and writes it to the TUN as one packet, and reads one packet
// at a time from the TUN and sends it as one datagram. It checks that every
// datagram it gets is exactly one IPv4 packet of at most the MTU.
type flannelPeer struct {
	name       string // the TUN's name
	mtu        int
	datagrams  atomic.Int64
	violations atomic.Int64
	firstBad   atomic.Value // string
	wg         sync.WaitGroup
}

func startFlannelPeer(t *testing.T, x *labHost, own netip.Prefix, remote netip.AddrPort) *flannelPeer {
	t.Helper()
	return startFlannelPeerNamed(t, x, DeviceName, own, remote)
}

// startFlannelPeerNamed is startFlannelPeer with the TUN's name (or a
// template such as flannel%d, flannel's, for which the kernel picks the
// first free number) given.
func startFlannelPeerNamed(t *testing.T, x *labHost, name string, own netip.Prefix, remote netip.AddrPort) *flannelPeer {
	t.Helper()
	fp := &flannelPeer{mtu: x.ext.MTU - 28}
	var (
		f    *os.File
		conn *net.UDPConn
		err  error
	)
	inNS(t, x.Handle, func() {
		var fd int
		fd, err = unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return
		}
		var ifr *unix.Ifreq
		if ifr, err = unix.NewIfreq(name); err != nil {
			unix.Close(fd)
			return
		}
		ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
		if err = unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
			unix.Close(fd)
			return
		}
		fp.name = ifr.Name()
		if err = unix.SetNonblock(fd, true); err != nil {
			unix.Close(fd)
			return
		}
		f = os.NewFile(uintptr(fd), "/dev/net/tun")
		conn, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(x.addr, DefaultPort)))
	})
	if err != nil {
		if f != nil {
			f.Close()
		}
		t.Fatalf("starting the flannel-style peer in %s: %v", x.Name, err)
	}
	l, err := x.NL.LinkByName(fp.name)
	if err == nil {
		err = x.NL.LinkSetMTU(l, fp.mtu)
	}
	if err == nil {
		err = x.NL.AddrAdd(l, &netlink.Addr{IPNet: ip.HostNet(own.Addr(), 16)})
	}
	if err == nil {
		err = x.NL.LinkSetUp(l)
	}
	if err != nil {
		f.Close()
		conn.Close()
		t.Fatalf("configuring the flannel-style TUN in %s: %v", x.Name, err)
	}
	t.Cleanup(func() {
		conn.Close()
		f.Close()
		fp.wg.Wait()
	})
	fp.wg.Add(2)
	go func() { // socket -> TUN, one datagram per read
		defer fp.wg.Done()
		buf := make([]byte, 65536)
		for {
			n, _, err := conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			fp.datagrams.Add(1)
			pkt := buf[:n]
			_, tl, ok := ipv4Header(pkt)
			if !ok || tl != n || n > fp.mtu {
				if fp.violations.Add(1) == 1 {
					fp.firstBad.Store(fmt.Sprintf("datagram of %d bytes starting % x", n, pkt[:min(n, 24)]))
				}
				continue
			}
			if !decTTL(pkt) {
				continue
			}
			_, _ = f.Write(pkt)
		}
	}()
	go func() { // TUN -> socket, one packet per datagram
		defer fp.wg.Done()
		buf := make([]byte, 65536)
		for {
			n, err := f.Read(buf)
			if err != nil {
				return
			}
			pkt := buf[:n]
			if _, _, ok := ipv4Header(pkt); !ok || !decTTL(pkt) {
				continue
			}
			_, _ = conn.WriteToUDPAddrPort(pkt, remote)
		}
	}()
	return fp
}

// TestNetnsFlannelStyleReceiver checks interoperability with flannel's
// receiver: with GSO on in our sender, a peer that reads one datagram at a
// time gets only single-packet datagrams of at most the MTU, and TCP works
// both ways with intact content.
func TestNetnsFlannelStyleReceiver(t *testing.T) {
	needRoot(t)
	a, b := newLab(t)
	cfg := labConfig(t, "")
	ba := a.startBackend(t, cfg)
	la, lb := a.lease("10.5.1.0/24"), b.lease("10.5.2.0/24")
	if err := ba.Apply(context.Background(), la, []subnet.Lease{lb}); err != nil {
		t.Fatalf("Apply in A: %v", err)
	}
	fp := startFlannelPeer(t, b, lb.Subnet, netip.AddrPortFrom(a.addr, DefaultPort))

	if _, err := tcpStream(t, a, b, "10.5.2.0", 24<<20, 0, true); err != nil {
		t.Fatalf("A->B over the flannel-style peer: %v\nstats A %+v", err, ba.Stats())
	}
	if _, err := tcpStream(t, b, a, "10.5.1.0", 4<<20, 0, true); err != nil {
		t.Fatalf("B->A over the flannel-style peer: %v\nstats A %+v", err, ba.Stats())
	}
	if v := fp.violations.Load(); v != 0 {
		t.Fatalf("%d of %d datagrams were not one IPv4 packet of at most %d bytes: %v", v, fp.datagrams.Load(), fp.mtu, fp.firstBad.Load())
	}
	// 24 MiB in packets of at most the MTU is well over 10,000 datagrams.
	if n := fp.datagrams.Load(); n < 10000 {
		t.Fatalf("the flannel-style peer got only %d datagrams", n)
	}
	t.Logf("flannel-style peer: %d datagrams; A %+v", fp.datagrams.Load(), ba.Stats())
}
