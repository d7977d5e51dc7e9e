package udp

import (
	"bytes"
	"testing"
)

// FuzzReceive feeds any bytes, as a datagram (or a GRO train of segments of
// seg bytes) from any sender, to the receive path. It must not panic, and
// everything it writes to the TUN must be one well-formed IPv4 packet with
// a valid header checksum and, in strict mode, a source inside a lease of
// the sender.
func FuzzReceive(f *testing.F) {
	good := mkIPv4([4]byte{10, 5, 2, 7}, [4]byte{10, 5, 1, 1}, protoTCP, 64, nil, []byte("abcdefghijklmnopqrstuvwxyz"))
	f.Add(a4("192.0.2.2"), uint16(0), good, true)
	f.Add(a4("192.0.2.2"), uint16(len(good)), append(append([]byte{}, good...), good...), true)
	f.Add(a4("192.0.2.3"), uint16(0), good, true)
	f.Add(a4("198.51.100.1"), uint16(0), good, false)
	f.Add(uint32(0), uint16(3), []byte{0x45, 0, 0, 0x14, 0, 0, 0, 0, 1}, true)
	f.Add(a4("192.0.2.7"), uint16(1), []byte{0x4f}, false)
	f.Fuzz(func(t *testing.T, from uint32, seg uint16, data []byte, strict bool) {
		p := newTestPath(strict)
		out, writes := recordingWriter(true, nil)
		tb := p.table.Load()
		p.receive(tb, from, data, int(seg), out)
		p.flushTUN(out)
		var written [][]byte
		for _, w := range *writes {
			written = append(written, splitWrite(t, w)...)
		}
		for _, pkt := range written {
			hl, tl, ok := ipv4Header(pkt)
			if !ok || tl != len(pkt) || !headerChecksumOK(pkt[:hl]) {
				t.Fatalf("wrote a malformed packet % x", pkt)
			}
			if strict && tb.check(from, srcAddr(pkt)) != accept {
				t.Fatalf("strict mode wrote a packet from %08x with source %08x", from, srcAddr(pkt))
			}
		}
		s := p.ctr.snapshot()
		if s.TUNWritten != uint64(len(written)) {
			t.Fatalf("TUNWritten %d, wrote %d", s.TUNWritten, len(written))
		}
	})
}

// FuzzOutbound feeds any bytes, as a packet read from the TUN, to the send
// path and, for an unknown destination, to the ICMP error builder. It must
// not panic; what it sends must be a well-formed IPv4 packet for the peer
// holding its destination, and any ICMP error must be well-formed.
func FuzzOutbound(f *testing.F) {
	f.Add(mkIPv4([4]byte{10, 5, 1, 5}, [4]byte{10, 5, 3, 1}, protoTCP, 64, nil, []byte("payload")))
	f.Add(mkIPv4([4]byte{10, 5, 1, 5}, [4]byte{10, 5, 99, 1}, protoUDP, 64, []byte{1, 1, 1, 1}, []byte("payload")))
	f.Add(mkIPv4([4]byte{10, 5, 1, 5}, [4]byte{10, 5, 99, 1}, protoICMP, 1, nil, []byte{3, 0}))
	f.Add([]byte{0x60, 0, 0, 0})
	f.Fuzz(func(t *testing.T, pkt []byte) {
		p := newTestPath(true)
		tb := p.table.Load()
		idx, out, v := p.outbound(tb, bytes.Clone(pkt))
		switch v {
		case outSend:
			hl, tl, ok := ipv4Header(out)
			if !ok || tl != len(out) || tb.lookup(dstAddr(out)) != idx {
				t.Fatalf("sent a bad packet % x to peer %d", out, idx)
			}
			if hl == 20 && !headerChecksumOK(out[:20]) && headerChecksumOK(pkt[:20]) {
				t.Fatal("decrementing the TTL broke a valid header checksum")
			}
		case outUnreachable:
			buf := make([]byte, netUnreachableLen)
			if n := netUnreachable(buf, out); n > 0 {
				if _, tl, ok := ipv4Header(buf[:n]); !ok || tl != n || !headerChecksumOK(buf[:20]) || fold(sum(buf[20:n], 0)) != 0xffff {
					t.Fatalf("bad ICMP error % x", buf[:n])
				}
			}
		}
	})
}
