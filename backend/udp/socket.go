package udp

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	// maxGSOSegments is the most datagrams one UDP_SEGMENT send may carry
	// (UDP_MAX_SEGMENTS of older kernels).
	maxGSOSegments = 64
	// maxGSOBytes is the largest UDP payload of one send: 65535 minus the
	// IPv4 and UDP headers.
	maxGSOBytes = 65535 - 20 - 8
	// socketBuffer is the send and receive buffer size asked for.
	socketBuffer = 8 << 20
)

// sockConn is the UDP/IPv4 socket bound to <iface addr>:<Port>. It sends and
// receives with sendmmsg/recvmmsg, using UDP_SEGMENT (GSO) and UDP_GRO when
// enabled and available.
type sockConn struct {
	conn *net.UDPConn
	rc   syscall.RawConn
	// gso is true while UDP_SEGMENT sends are used; it turns false for good
	// when the kernel refuses one.
	gso atomic.Bool
	gro bool
}

// listen opens the socket in the calling thread's network namespace.
func listen(addr netip.AddrPort, wantGSO, wantGRO bool) (*sockConn, error) {
	conn, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(addr))
	if err != nil {
		return nil, fmt.Errorf("listening on udp %s: %w", addr, err)
	}
	rc, err := conn.SyscallConn()
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("getting raw socket of %s: %w", addr, err)
	}
	c := &sockConn{conn: conn, rc: rc}
	var gsoOK bool
	err = rc.Control(func(fd uintptr) {
		s := int(fd)
		// Root may exceed net.core.[rw]mem_max; others get what the
		// limits allow.
		if unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, socketBuffer) != nil {
			_ = unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_RCVBUF, socketBuffer)
		}
		if unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, socketBuffer) != nil {
			_ = unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_SNDBUF, socketBuffer)
		}
		if wantGSO {
			_, e := unix.GetsockoptInt(s, unix.IPPROTO_UDP, unix.UDP_SEGMENT)
			gsoOK = e == nil
		}
		if wantGRO {
			c.gro = unix.SetsockoptInt(s, unix.IPPROTO_UDP, unix.UDP_GRO, 1) == nil
		}
	})
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("configuring udp socket %s: %w", addr, err)
	}
	c.gso.Store(gsoOK)
	return c, nil
}

func (c *sockConn) Close() error { return c.conn.Close() }

// sendBatch collects the datagrams of one TUN read and sends them with one
// sendmmsg. Consecutive packets for the same peer become one UDP_SEGMENT
// message when GSO is on: all segments the same size except a shorter last
// one. Each datagram on the wire is exactly one inner packet. Not safe for
// concurrent use.
type sendBatch struct {
	c     *sockConn
	hdrs  []unix.Mmsghdr
	iovs  []unix.Iovec
	oob   []byte
	msgs  []txMsg
	npkts int
	gsoOn bool
	fn    func(fd uintptr) bool
	// syscall runs sendmmsg on hdrs[callAt:callN] and sets callN and
	// callE; tests replace it.
	syscall func() error
	callN   int
	callE   error
	callAt  int
}

// txMsg is one message of a batch: count packets starting at iovs[first],
// to peer p, each seg bytes but the last.
type txMsg struct {
	p     *peer
	first int
	count int
	seg   int
	bytes int
	short bool // the last packet is shorter than seg: the message is closed
}

var oobSpace = unix.CmsgSpace(2)

func newSendBatch(c *sockConn, size int) *sendBatch {
	s := &sendBatch{
		c:    c,
		hdrs: make([]unix.Mmsghdr, size),
		iovs: make([]unix.Iovec, size),
		oob:  make([]byte, size*oobSpace),
		msgs: make([]txMsg, 0, size),
	}
	s.fn = s.sendmmsg
	s.syscall = func() error { return s.c.rc.Write(s.fn) }
	return s
}

// full reports whether the batch cannot take another packet.
func (s *sendBatch) full() bool { return s.npkts == len(s.iovs) }

// add queues pkt for peer p. The caller flushes when full.
func (s *sendBatch) add(p *peer, pkt []byte) {
	if s.npkts == 0 {
		s.gsoOn = s.c.gso.Load()
	}
	i := s.npkts
	s.npkts++
	s.iovs[i].Base = &pkt[0]
	s.iovs[i].SetLen(len(pkt))
	if n := len(s.msgs); n > 0 && s.gsoOn {
		m := &s.msgs[n-1]
		if m.p == p && !m.short && len(pkt) <= m.seg && m.count < maxGSOSegments && m.bytes+len(pkt) <= maxGSOBytes {
			m.count++
			m.bytes += len(pkt)
			m.short = len(pkt) < m.seg
			return
		}
	}
	s.msgs = append(s.msgs, txMsg{p: p, first: i, count: 1, seg: len(pkt), bytes: len(pkt)})
}

// flush sends the queued packets and empties the batch. It returns the
// number of packets sent and the first error. A refused UDP_SEGMENT send
// turns GSO off for good and the batch is sent again without it.
func (s *sendBatch) flush() (int, error) {
	if s.npkts == 0 {
		return 0, nil
	}
	defer s.reset()
	nh := s.pack(s.gsoOn, 0)
	sent, pkts, err := s.send(nh, s.gsoOn)
	if err != nil && s.gsoOn && gsoRefused(err) {
		// With GSO a header is a message: msgs[:sent] went out, the
		// refused one and those after it go again one packet each.
		s.c.gso.Store(false)
		nh = s.pack(false, sent)
		_, more, err2 := s.send(nh, false)
		return pkts + more, errGSORefused{err2}
	}
	return pkts, err
}

// errGSORefused wraps the error of a batch sent again without GSO; the
// error is nil when that second send worked.
type errGSORefused struct{ err error }

func (e errGSORefused) Error() string {
	if e.err == nil {
		return "udp segmentation offload refused by the kernel; sending without it"
	}
	return "udp segmentation offload refused by the kernel; sending without it: " + e.err.Error()
}
func (e errGSORefused) Unwrap() error { return e.err }

// gsoRefused reports errors with which the kernel refuses UDP_SEGMENT.
func gsoRefused(err error) bool {
	return errors.Is(err, unix.EIO) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP)
}

func (s *sendBatch) reset() {
	for i := range s.iovs[:s.npkts] {
		s.iovs[i].Base = nil
	}
	for i := range s.msgs {
		s.msgs[i].p = nil
	}
	s.msgs = s.msgs[:0]
	s.npkts = 0
}

// pack fills hdrs from msgs[from:] (one header per packet when !gso) and
// returns the number of headers.
func (s *sendBatch) pack(gso bool, from int) int {
	nh := 0
	for mi := from; mi < len(s.msgs); mi++ {
		m := &s.msgs[mi]
		if gso {
			h := &s.hdrs[nh]
			s.fill(h, m.p, m.first, m.count)
			if m.count > 1 {
				oob := s.oob[nh*oobSpace : (nh+1)*oobSpace]
				cm := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
				cm.Level = unix.SOL_UDP
				cm.Type = unix.UDP_SEGMENT
				cm.SetLen(unix.CmsgLen(2))
				*(*uint16)(unsafe.Pointer(&oob[unix.CmsgLen(0)])) = uint16(m.seg)
				h.Hdr.Control = &oob[0]
				h.Hdr.SetControllen(oobSpace)
			}
			nh++
			continue
		}
		for k := 0; k < m.count; k++ {
			s.fill(&s.hdrs[nh], m.p, m.first+k, 1)
			nh++
		}
	}
	return nh
}

func (s *sendBatch) fill(h *unix.Mmsghdr, p *peer, first, count int) {
	*h = unix.Mmsghdr{}
	h.Hdr.Name = (*byte)(unsafe.Pointer(&p.sa))
	h.Hdr.Namelen = unix.SizeofSockaddrInet4
	h.Hdr.Iov = &s.iovs[first]
	h.Hdr.SetIovlen(count)
}

// send sends hdrs[:nh], retrying after partial sends. It returns the headers
// and packets sent.
func (s *sendBatch) send(nh int, gso bool) (hdrsSent, pkts int, err error) {
	for hdrsSent < nh {
		s.callAt = hdrsSent
		s.callN = nh
		if err := s.syscall(); err != nil {
			return hdrsSent, pkts, fmt.Errorf("sending on udp socket: %w", err)
		}
		if s.callE != nil {
			// Skip the message that failed and carry on with the rest,
			// unless GSO itself was refused.
			e := s.callE
			if gso && s.hdrs[hdrsSent].Hdr.Controllen > 0 && gsoRefused(e) {
				return hdrsSent, pkts, fmt.Errorf("sending udp datagrams: %w", e)
			}
			hdrsSent++
			err = errors.Join(err, fmt.Errorf("sending udp datagrams: %w", e))
			continue
		}
		for i := hdrsSent; i < hdrsSent+s.callN; i++ {
			pkts += int(s.hdrs[i].Hdr.Iovlen)
		}
		hdrsSent += s.callN
	}
	return hdrsSent, pkts, err
}

// sendmmsg is the RawConn.Write callback: it sends hdrs[callAt:callN].
func (s *sendBatch) sendmmsg(fd uintptr) bool {
	hs := s.hdrs[s.callAt:s.callN]
	n, _, e := unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&hs[0])), uintptr(len(hs)), unix.MSG_DONTWAIT, 0, 0)
	if e == unix.EAGAIN {
		return false
	}
	s.callE = nil
	s.callN = int(n)
	if e != 0 {
		s.callE = e
		s.callN = 0
	}
	return true
}

// recvBatch receives up to len(bufs) messages with one recvmmsg. Not safe
// for concurrent use.
type recvBatch struct {
	c     *sockConn
	hdrs  []unix.Mmsghdr
	iovs  []unix.Iovec
	names []unix.RawSockaddrInet4
	oob   []byte
	bufs  [][]byte
	fn    func(fd uintptr) bool
	n     int
	err   error
}

var groOOBSpace = unix.CmsgSpace(4)

func newRecvBatch(c *sockConn, msgs, bufSize int) *recvBatch {
	r := &recvBatch{
		c:     c,
		hdrs:  make([]unix.Mmsghdr, msgs),
		iovs:  make([]unix.Iovec, msgs),
		names: make([]unix.RawSockaddrInet4, msgs),
		oob:   make([]byte, msgs*groOOBSpace),
		bufs:  make([][]byte, msgs),
	}
	for i := range r.bufs {
		r.bufs[i] = make([]byte, bufSize)
		r.iovs[i].Base = &r.bufs[i][0]
		r.iovs[i].SetLen(bufSize)
	}
	r.fn = r.recvmmsg
	return r
}

// read waits for datagrams and returns how many messages arrived.
func (r *recvBatch) read() (int, error) {
	for i := range r.hdrs {
		h := &r.hdrs[i]
		h.Len = 0
		h.Hdr = unix.Msghdr{}
		h.Hdr.Name = (*byte)(unsafe.Pointer(&r.names[i]))
		h.Hdr.Namelen = unix.SizeofSockaddrInet4
		h.Hdr.Iov = &r.iovs[i]
		h.Hdr.SetIovlen(1)
		h.Hdr.Control = &r.oob[i*groOOBSpace]
		h.Hdr.SetControllen(groOOBSpace)
	}
	if err := r.c.rc.Read(r.fn); err != nil {
		return 0, fmt.Errorf("receiving on udp socket: %w", err)
	}
	if r.err != nil {
		return 0, fmt.Errorf("receiving udp datagrams: %w", r.err)
	}
	return r.n, nil
}

func (r *recvBatch) recvmmsg(fd uintptr) bool {
	n, _, e := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&r.hdrs[0])), uintptr(len(r.hdrs)), unix.MSG_DONTWAIT, 0, 0)
	if e == unix.EAGAIN {
		return false
	}
	r.n, r.err = int(n), nil
	if e != 0 {
		r.n, r.err = 0, e
	}
	return true
}

// msg returns message i of the last read: the sender's IPv4 address, the
// payload, the GRO segment size (0 when the kernel did not coalesce), and
// whether the payload was truncated.
func (r *recvBatch) msg(i int) (from uint32, data []byte, seg int, trunc bool) {
	h := &r.hdrs[i]
	sa := &r.names[i]
	if h.Hdr.Namelen >= unix.SizeofSockaddrInet4 && sa.Family == unix.AF_INET {
		from = uint32(sa.Addr[0])<<24 | uint32(sa.Addr[1])<<16 | uint32(sa.Addr[2])<<8 | uint32(sa.Addr[3])
	}
	data = r.bufs[i][:h.Len]
	trunc = h.Hdr.Flags&unix.MSG_TRUNC != 0
	seg = groSize(r.oob[i*groOOBSpace:][:h.Hdr.Controllen])
	return from, data, seg, trunc
}

// groSize finds the UDP_GRO control message in oob and returns its segment
// size, or 0.
func groSize(oob []byte) int {
	for len(oob) >= unix.SizeofCmsghdr {
		cm := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
		l := int(cm.Len)
		if l < unix.SizeofCmsghdr || l > len(oob) {
			return 0
		}
		if cm.Level == unix.SOL_UDP && cm.Type == unix.UDP_GRO && l >= unix.CmsgLen(4) {
			return int(*(*int32)(unsafe.Pointer(&oob[unix.CmsgLen(0)])))
		}
		sp := unix.CmsgSpace(l - unix.CmsgLen(0))
		if sp > len(oob) {
			return 0
		}
		oob = oob[sp:]
	}
	return 0
}
