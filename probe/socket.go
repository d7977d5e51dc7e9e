package probe

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"
)

// headerLen is the IP and ICMP echo headers: a probe of size n carries n −
// headerLen bytes of payload.
func headerLen(v6 bool) int {
	if v6 {
		return 40 + 8
	}
	return 20 + 8
}

// smallSize is the IP length of a small probe (as ping's default over
// IPv4).
const smallSize = 84

// socket is one ICMP (ICMPv6) socket bound to the node's overlay address,
// shared by every probe of its family: requests carry the socket's echo
// ID and a sequence number, replies are matched by both. It is a raw socket
// (the daemon runs as root), else an unprivileged ICMP datagram socket
// (net.ipv4.ping_group_range), whose echo ID the kernel sets and checks
// itself. Every probe is sent with DF set (IP_PMTUDISC_DO; IPv6 routers
// never fragment), so a full-size probe arrives whole or not at all.
type socket struct {
	pc  net.PacketConn
	raw bool
	v6  bool
	id  uint16 // the echo ID (raw sockets)
	buf []byte // the send buffer
}

// reply is an echo reply read from the socket.
type reply struct {
	seq  uint16
	from netip.Addr
	at   time.Time
}

// openSocket opens the ICMP socket of src's family bound to src.
func openSocket(src netip.Addr) (*socket, error) {
	if !src.IsValid() {
		return nil, errors.New("no probe source address")
	}
	s := &socket{raw: true, v6: src.Is6()}
	family, proto, what := unix.AF_INET, unix.IPPROTO_ICMP, "ICMP"
	if s.v6 {
		family, proto, what = unix.AF_INET6, unix.IPPROTO_ICMPV6, "ICMPv6"
	}
	fd, err := unix.Socket(family, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
		s.raw = false
		fd, err = unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, proto)
	}
	if err != nil {
		return nil, fmt.Errorf("opening an %s socket (run as root, or allow this group in net.ipv4.ping_group_range): %w", what, err)
	}
	if err := setup(fd, src); err != nil {
		unix.Close(fd)
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "icmp")
	pc, err := net.FilePacketConn(f)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("opening an %s socket: %w", what, err)
	}
	s.pc = pc
	if s.raw {
		var b [2]byte
		rand.Read(b[:])
		s.id = binary.BigEndian.Uint16(b[:])
	}
	return s, nil
}

func setup(fd int, src netip.Addr) error {
	var err error
	if src.Is6() {
		err = unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_MTU_DISCOVER, unix.IPV6_PMTUDISC_DO)
	} else {
		err = unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_DO)
	}
	if err != nil {
		return fmt.Errorf("setting DF on the ICMP socket: %w", err)
	}
	var sa unix.Sockaddr
	if src.Is6() {
		sa = &unix.SockaddrInet6{Addr: src.As16()}
	} else {
		sa = &unix.SockaddrInet4{Addr: src.As4()}
	}
	if err := unix.Bind(fd, sa); err != nil {
		return fmt.Errorf("binding the ICMP socket to %s (is it this node's overlay address?): %w", src, err)
	}
	return nil
}

// send sends an echo request of IP length size to dst.
func (s *socket) send(dst netip.Addr, seq uint16, size int) error {
	payload := max(size-headerLen(s.v6), 8)
	if cap(s.buf) < payload {
		s.buf = make([]byte, payload)
	}
	data := s.buf[:payload]
	copy(data, "flanneld peer probe")
	var typ icmp.Type = ipv4.ICMPTypeEcho
	if s.v6 {
		typ = ipv6.ICMPTypeEchoRequest // the kernel fills in the checksum
	}
	m := icmp.Message{Type: typ, Body: &icmp.Echo{ID: int(s.id), Seq: int(seq), Data: data}}
	b, err := m.Marshal(nil)
	if err != nil {
		return err
	}
	var to net.Addr = &net.IPAddr{IP: dst.AsSlice()}
	if !s.raw {
		to = &net.UDPAddr{IP: dst.AsSlice()}
	}
	_, err = s.pc.WriteTo(b, to)
	return err
}

// read returns the next echo reply to this socket; other ICMP messages are
// skipped. now stamps the arrival. It fails once the socket is closed.
func (s *socket) read(buf []byte, now func() time.Time) (reply, error) {
	proto, want := 1, icmp.Type(ipv4.ICMPTypeEchoReply)
	if s.v6 {
		proto, want = 58, ipv6.ICMPTypeEchoReply
	}
	for {
		n, from, err := s.pc.ReadFrom(buf)
		if err != nil {
			return reply{}, err
		}
		at := now()
		m, err := icmp.ParseMessage(proto, buf[:n])
		if err != nil || m.Type != want {
			continue
		}
		e, ok := m.Body.(*icmp.Echo)
		if !ok || (s.raw && uint16(e.ID) != s.id) {
			continue
		}
		var addr netip.Addr
		switch a := from.(type) {
		case *net.IPAddr:
			addr, _ = netip.AddrFromSlice(a.IP)
		case *net.UDPAddr:
			addr, _ = netip.AddrFromSlice(a.IP)
		}
		return reply{seq: uint16(e.Seq), from: addr.Unmap(), at: at}, nil
	}
}

func (s *socket) close() error { return s.pc.Close() }
