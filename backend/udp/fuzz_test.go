package udp

import (
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
