package udp

import (
	"errors"
	"net"
	"os"
	"sync/atomic"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/pkg/ip"
)

const (
	// batchSize is the most packets one TUN read yields and one TUN write
	// takes.
	batchSize = 128
	// recvMessages is the most messages one recvmmsg returns; with UDP_GRO
	// each may hold up to 64 KB of datagrams.
	recvMessages = 32
	// maxPacket is the largest IPv4 packet (and GRO message).
	maxPacket = 65535
)

// path is the packet path shared by the two loops: the lease table, the
// counters and the policy.
type path struct {
	log    klog.Logger
	strict bool
	table  atomic.Pointer[table]
	out    atomic.Pointer[tunWriter] // the TUN's writer, used by udpLoop only
	ctr    counters
}

// outVerdict is what becomes of a packet read from the TUN.
type outVerdict int

const (
	outSend outVerdict = iota
	outDrop
	outUnreachable
)

// outbound decides about one packet read from the TUN. For outSend it
// returns the peer index in t and the packet trimmed to its IPv4 total
// length, with the TTL decremented.
func (p *path) outbound(t *table, pkt []byte) (int32, []byte, outVerdict) {
	_, tl, ok := ipv4Header(pkt)
	if !ok {
		r := dropMalformed
		if len(pkt) == 0 || pkt[0]>>4 != 4 {
			r = dropNonIPv4
		}
		p.ctr.drop(p.log, r, 1, nil)
		return -1, nil, outDrop
	}
	pkt = pkt[:tl]
	dst := dstAddr(pkt)
	i := t.lookup(dst)
	if i < 0 {
		p.ctr.drop(p.log, dropNoRoute, 1, func() []any {
			return []any{"src", ip.FromUint32(srcAddr(pkt)), "dst", ip.FromUint32(dst)}
		})
		return -1, pkt, outUnreachable
	}
	if !decTTL(pkt) {
		p.ctr.drop(p.log, dropTTL, 1, nil)
		return -1, nil, outDrop
	}
	return i, pkt, outSend
}

// inbound decides about one inner packet received from sender from. It
// returns the packet with the TTL decremented, ready for the TUN, or false
// when it is dropped.
func (p *path) inbound(t *table, from uint32, pkt []byte) ([]byte, bool) {
	hl, tl, ok := ipv4Header(pkt)
	if !ok || tl != len(pkt) || !headerChecksumOK(pkt[:hl]) {
		r := dropMalformed
		if len(pkt) == 0 || pkt[0]>>4 != 4 {
			r = dropNonIPv4
		}
		p.ctr.drop(p.log, r, 1, func() []any { return []any{"from", ip.FromUint32(from)} })
		return nil, false
	}
	if p.strict {
		switch t.check(from, srcAddr(pkt)) {
		case unknownSender:
			p.ctr.drop(p.log, dropUnknownSender, 1, func() []any { return []any{"from", ip.FromUint32(from)} })
			return nil, false
		case spoofedSource:
			p.ctr.drop(p.log, dropSpoofedSource, 1, func() []any {
				return []any{"from", ip.FromUint32(from), "src", ip.FromUint32(srcAddr(pkt))}
			})
			return nil, false
		}
	}
	if !decTTL(pkt) {
		p.ctr.drop(p.log, dropTTL, 1, nil)
		return nil, false
	}
	return pkt, true
}

// receive handles one received message: data from sender from, coalesced
// by GRO into segments of seg bytes (0: one datagram). Each segment is one
// inner packet; the accepted ones are added to out. data must stay
// untouched until out is flushed.
func (p *path) receive(t *table, from uint32, data []byte, seg int, out *tunWriter) {
	if seg <= 0 || seg > len(data) {
		seg = len(data)
	}
	for off := 0; off < len(data); off += seg {
		end := min(off+seg, len(data))
		p.ctr.udpReceived.Add(1)
		pkt, ok := p.inbound(t, from, data[off:end])
		if !ok {
			continue
		}
		out.add(pkt)
	}
}

// flushTUN writes what out holds and counts the results.
func (p *path) flushTUN(out *tunWriter) {
	out.flush()
	n, errs, err := out.take()
	p.ctr.tunWritten.Add(n)
	if errs > 0 {
		p.ctr.drop(p.log, dropTUNWrite, errs, func() []any { return []any{"err", err} })
	}
}

// udpLoop moves datagrams from the socket into the TUN (through p.out,
// read once per batch: the TUN may be replaced) until the socket is
// closed.
func (p *path) udpLoop(c *sockConn) {
	rx := newRecvBatch(c, recvMessages, maxPacket)
	for {
		n, err := rx.read()
		out := p.out.Load()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			p.ctr.drop(p.log, dropMalformed, 1, func() []any { return []any{"err", err} })
			continue
		}
		t := p.table.Load()
		p.ctr.udpMessages.Add(uint64(n))
		for i := 0; i < n; i++ {
			from, data, seg, trunc := rx.msg(i)
			if trunc {
				p.ctr.drop(p.log, dropMalformed, 1, func() []any { return []any{"from", ip.FromUint32(from), "err", "truncated"} })
				continue
			}
			p.receive(t, from, data, seg, out)
		}
		p.flushTUN(out)
	}
}

// tunLoop moves packets from the TUN to their peers until the TUN is
// closed.
func (p *path) tunLoop(dev tunDevice, c *sockConn, mtu int) {
	bufs := make([][]byte, batchSize)
	sizes := make([]int, batchSize)
	// Without offloads the first buffer takes every read; with them, the
	// kernel's super-packet is split into buffers of at most the MTU.
	bufs[0] = make([]byte, tunOffset+maxPacket)
	for i := 1; i < batchSize; i++ {
		bufs[i] = make([]byte, tunOffset+max(mtu, 1500))
	}
	snd := newSendBatch(c, batchSize)
	icmp := [][]byte{make([]byte, tunOffset+netUnreachableLen)}
	for {
		n, err := dev.Read(bufs, sizes, tunOffset)
		if err != nil {
			if isFatalTUN(err) {
				switch {
				case errors.Is(err, unix.EBADFD):
					p.log.Info("The TUN's device was deleted; the next reconcile creates it again", "device", DeviceName)
				case !errors.Is(err, os.ErrClosed):
					p.log.Error(err, "Stopped reading the TUN; packets to other nodes are no longer forwarded", "device", DeviceName)
				}
				return
			}
			// A super-packet that could not be split (or not all of it);
			// what was split (n packets) still goes out.
			p.ctr.drop(p.log, dropMalformed, 1, func() []any { return []any{"err", err} })
			if n == 0 {
				continue
			}
		}
		t := p.table.Load()
		p.ctr.tunReads.Add(1)
		p.ctr.tunRead.Add(uint64(n))
		for i := 0; i < n; i++ {
			idx, pkt, v := p.outbound(t, bufs[i][tunOffset:tunOffset+sizes[i]])
			switch v {
			case outSend:
				if snd.full() {
					p.flushUDP(snd)
				}
				snd.add(&t.peers[idx], pkt)
			case outUnreachable:
				if l := netUnreachable(icmp[0][tunOffset:], pkt); l > 0 {
					icmp[0] = icmp[0][:tunOffset+l]
					if _, err := dev.Write(icmp, tunOffset); err == nil {
						p.ctr.unreachable.Add(1)
					}
					icmp[0] = icmp[0][:cap(icmp[0])]
				}
			}
		}
		p.flushUDP(snd)
	}
}

func (p *path) flushUDP(snd *sendBatch) {
	queued := snd.npkts
	n, err := snd.flush()
	p.ctr.udpSent.Add(uint64(n))
	if err == nil {
		return
	}
	if refused, ok := err.(errGSORefused); ok {
		p.log.Info("The kernel refused UDP segmentation offload; sending one datagram per packet from now on", "err", err)
		err = refused.err
	}
	if err != nil && queued > n {
		p.ctr.drop(p.log, dropSendError, uint64(queued-n), func() []any { return []any{"err", err} })
	}
}

// isFatalTUN reports read errors after which the TUN is unusable.
func isFatalTUN(err error) bool {
	return errors.Is(err, os.ErrClosed) || errors.Is(err, unix.EBADF) || errors.Is(err, unix.EBADFD)
}
