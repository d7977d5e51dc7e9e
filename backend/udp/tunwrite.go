package udp

import (
	"encoding/binary"
	"fmt"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The virtio-net header the TUN reads before each packet when it was
// created with IFF_VNET_HDR (struct virtio_net_hdr, host byte order).
const (
	virtioHdrLen       = 10
	virtioNeedsCsum    = 1 // VIRTIO_NET_HDR_F_NEEDS_CSUM
	virtioGSONone      = 0
	virtioGSOTCPv4     = 1
	tcpFlagFIN         = 0x01
	tcpFlagSYN         = 0x02
	tcpFlagRST         = 0x04
	tcpFlagPSH         = 0x08
	tcpFlagACK         = 0x10
	maxCoalesceSegs    = 64
	maxCoalescedLength = 65535
)

// tunWriter writes received inner packets to the TUN. With the virtio
// header it coalesces consecutive TCP segments of one flow (contiguous
// sequence numbers, identical headers, equal sizes but the last, valid
// checksums) into one GSO packet, written with writev straight from the
// receive buffers: no payload is copied. Packets handed to add must stay
// untouched until flush. Not safe for concurrent use.
type tunWriter struct {
	vnet bool
	// write writes one packet given as pieces; tests replace it.
	write func(pieces [][]byte) error

	hdr    [virtioHdrLen]byte
	zero   [virtioHdrLen]byte
	pieces [][]byte

	// The open run: head is its first packet (IP and TCP headers included),
	// the other segments' payloads follow in pieces.
	head    []byte
	hl, thl int    // IP and TCP header lengths of the run
	seg     int    // payload bytes of each segment but the last
	payload int    // payload bytes in the run
	count   int    // segments in the run
	nextSeq uint32 // sequence number the next segment must carry
	closed  bool   // the last segment was short or had PSH

	// Results since the last take.
	written, errs uint64
	lastErr       error
}

// newTUNWriter returns a writer for a TUN whose file is rc.
func newTUNWriter(rc syscall.RawConn, vnet bool) *tunWriter {
	w := &tunWriter{vnet: vnet, pieces: make([][]byte, 0, maxCoalesceSegs+2)}
	s := &writevCall{rc: rc, iovs: make([]unix.Iovec, maxCoalesceSegs+2)}
	s.fn = s.writev
	w.write = s.do
	return w
}

// writevCall is one writev on the TUN; its callback is bound once so that
// writes do not allocate.
type writevCall struct {
	rc   syscall.RawConn
	iovs []unix.Iovec
	n    int
	err  error
	fn   func(fd uintptr) bool
}

func (c *writevCall) do(pieces [][]byte) error {
	c.n = 0
	for _, p := range pieces {
		if len(p) == 0 {
			continue
		}
		c.iovs[c.n].Base = &p[0]
		c.iovs[c.n].SetLen(len(p))
		c.n++
	}
	err := c.rc.Write(c.fn)
	for i := range c.iovs[:c.n] {
		c.iovs[i].Base = nil
	}
	if err != nil {
		return fmt.Errorf("writing to the TUN: %w", err)
	}
	if c.err != nil {
		return fmt.Errorf("writing to the TUN: %w", c.err)
	}
	return nil
}

func (c *writevCall) writev(fd uintptr) bool {
	_, _, e := unix.Syscall(unix.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&c.iovs[0])), uintptr(c.n))
	if e == unix.EAGAIN {
		return false
	}
	c.err = nil
	if e != 0 {
		c.err = e
	}
	return true
}

// add queues one accepted inner IPv4 packet (header checked, TTL done).
func (w *tunWriter) add(pkt []byte) {
	if !w.vnet {
		w.emit(nil, pkt)
		return
	}
	if w.head != nil && w.extend(pkt) {
		return
	}
	w.flush()
	if w.start(pkt) {
		return
	}
	w.emit(w.zero[:], pkt)
}

// tcpCandidate returns the header lengths of pkt if it is an IPv4 TCP
// segment that may be coalesced: no IP options, not a fragment, only the
// ACK (and PSH) flags, some payload, a valid TCP checksum.
func tcpCandidate(pkt []byte) (hl, thl int, ok bool) {
	if len(pkt) < 40 || pkt[0] != 0x45 || pkt[9] != protoTCP {
		return 0, 0, false
	}
	if binary.BigEndian.Uint16(pkt[6:8])&0x3fff != 0 { // MF or an offset
		return 0, 0, false
	}
	thl = int(pkt[32]>>4) * 4
	if thl < 20 || 20+thl >= len(pkt) {
		return 0, 0, false
	}
	if f := pkt[33]; f&^tcpFlagPSH != tcpFlagACK {
		return 0, 0, false
	}
	if fold(sum(pkt[20:], pseudoSum(pkt, protoTCP, len(pkt)-20))) != 0xffff {
		return 0, 0, false
	}
	return 20, thl, true
}

// start opens a run with pkt, or returns false if pkt cannot head one.
func (w *tunWriter) start(pkt []byte) bool {
	hl, thl, ok := tcpCandidate(pkt)
	if !ok {
		return false
	}
	w.head, w.hl, w.thl = pkt, hl, thl
	w.seg = len(pkt) - hl - thl
	w.payload, w.count = w.seg, 1
	w.nextSeq = binary.BigEndian.Uint32(pkt[hl+4:]) + uint32(w.seg)
	w.closed = pkt[hl+13]&tcpFlagPSH != 0
	return true
}

// extend appends pkt to the open run if it continues it.
func (w *tunWriter) extend(pkt []byte) bool {
	if w.closed || w.count >= maxCoalesceSegs {
		return false
	}
	h, hl, thl := w.head, w.hl, w.thl
	n := len(pkt) - hl - thl
	if n <= 0 || n > w.seg || hl+thl+w.payload+n > maxCoalescedLength || len(pkt) < hl+thl {
		return false
	}
	// IP: version, IHL, TOS, flags, TTL, protocol and addresses equal;
	// length, ID and checksum may differ.
	if pkt[0] != h[0] || pkt[1] != h[1] || pkt[6] != h[6] || pkt[7] != h[7] || pkt[8] != h[8] || pkt[9] != h[9] ||
		binary.BigEndian.Uint64(pkt[12:20]) != binary.BigEndian.Uint64(h[12:20]) {
		return false
	}
	t, ht := pkt[hl:], h[hl:]
	// TCP: ports, ack, data offset, window and options equal, flags equal
	// but for PSH; the sequence number continues the run.
	if binary.BigEndian.Uint32(t[0:4]) != binary.BigEndian.Uint32(ht[0:4]) ||
		binary.BigEndian.Uint32(t[8:12]) != binary.BigEndian.Uint32(ht[8:12]) ||
		t[12] != ht[12] || t[13]&^tcpFlagPSH != ht[13]&^tcpFlagPSH ||
		binary.BigEndian.Uint16(t[14:16]) != binary.BigEndian.Uint16(ht[14:16]) ||
		binary.BigEndian.Uint16(t[18:20]) != binary.BigEndian.Uint16(ht[18:20]) ||
		string(t[20:thl]) != string(ht[20:thl]) ||
		binary.BigEndian.Uint32(t[4:8]) != w.nextSeq {
		return false
	}
	if fold(sum(t, pseudoSum(pkt, protoTCP, len(t)))) != 0xffff {
		return false
	}
	if w.count == 1 {
		w.pieces = append(w.pieces[:0], w.hdr[:], w.head)
	}
	w.pieces = append(w.pieces, pkt[hl+thl:])
	w.count++
	w.payload += n
	w.nextSeq += uint32(n)
	if n < w.seg || t[13]&tcpFlagPSH != 0 {
		w.closed = true
		if t[13]&tcpFlagPSH != 0 {
			h[hl+13] |= tcpFlagPSH
		}
	}
	return true
}

// flush writes the open run, if any.
func (w *tunWriter) flush() {
	if w.head == nil {
		return
	}
	h := w.head
	if w.count == 1 {
		w.emit(w.zero[:], h)
		w.head = nil
		return
	}
	hl, thl := w.hl, w.thl
	total := hl + thl + w.payload
	// The head becomes the header of the super-packet: its length and
	// checksum change, and its TCP checksum field holds the pseudo-header
	// sum for the kernel to complete (CHECKSUM_PARTIAL).
	binary.BigEndian.PutUint16(h[2:4], uint16(total))
	h[10], h[11] = 0, 0
	binary.BigEndian.PutUint16(h[10:12], checksum(h[:hl]))
	binary.BigEndian.PutUint16(h[hl+16:], fold(pseudoSum(h, protoTCP, thl+w.payload)))
	v := w.hdr[:]
	v[0] = virtioNeedsCsum
	v[1] = virtioGSOTCPv4
	binary.NativeEndian.PutUint16(v[2:], uint16(hl+thl))
	binary.NativeEndian.PutUint16(v[4:], uint16(w.seg))
	binary.NativeEndian.PutUint16(v[6:], uint16(hl))
	binary.NativeEndian.PutUint16(v[8:], 16)
	w.pieces[1] = h[:hl+thl+w.seg]
	w.done(w.count, w.write(w.pieces))
	w.pieces = w.pieces[:0]
	w.head = nil
}

// emit writes one packet on its own, after the virtio header vh (nil
// without offloads).
func (w *tunWriter) emit(vh, pkt []byte) {
	w.pieces = append(w.pieces[:0], vh, pkt)
	w.done(1, w.write(w.pieces))
	w.pieces = w.pieces[:0]
}

func (w *tunWriter) done(pkts int, err error) {
	if err != nil {
		w.errs++
		w.lastErr = err
		return
	}
	w.written += uint64(pkts)
}

// take returns and resets the counts since the last take.
func (w *tunWriter) take() (written, errs uint64, lastErr error) {
	written, errs, lastErr = w.written, w.errs, w.lastErr
	w.written, w.errs, w.lastErr = 0, 0, nil
	return
}
