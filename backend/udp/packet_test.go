package udp

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"testing"
)

// mkIPv4 builds an IPv4 packet with a valid header checksum: src, dst
// (dotted bytes), protocol, TTL, optional header options (a multiple of 4
// bytes) and payload.
func mkIPv4(src, dst [4]byte, proto, ttl byte, opts, payload []byte) []byte {
	hl := 20 + len(opts)
	p := make([]byte, hl+len(payload))
	p[0] = 0x40 | byte(hl/4)
	binary.BigEndian.PutUint16(p[2:4], uint16(len(p)))
	binary.BigEndian.PutUint16(p[4:6], 0x1234)
	p[8], p[9] = ttl, proto
	copy(p[12:16], src[:])
	copy(p[16:20], dst[:])
	copy(p[20:], opts)
	binary.BigEndian.PutUint16(p[10:12], checksum(p[:hl]))
	copy(p[hl:], payload)
	return p
}

func TestChecksumKnownVector(t *testing.T) {
	// A textbook IPv4 header whose checksum is 0xb861.
	h := []byte{0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7}
	if got := checksum(h); got != 0xb861 {
		t.Fatalf("checksum = %#04x, want 0xb861", got)
	}
	binary.BigEndian.PutUint16(h[10:], 0xb861)
	if !headerChecksumOK(h) {
		t.Fatal("headerChecksumOK rejects a correct header")
	}
	h[15] ^= 1
	if headerChecksumOK(h) {
		t.Fatal("headerChecksumOK accepts a corrupted header")
	}
	// Odd lengths pad with a zero byte.
	if checksum([]byte{0x01}) != ^uint16(0x0100) {
		t.Fatalf("odd-length checksum = %#04x", checksum([]byte{0x01}))
	}
}

func TestDecTTL(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 7))
	for i := 0; i < 20000; i++ {
		var src, dst [4]byte
		binary.BigEndian.PutUint32(src[:], r.Uint32())
		binary.BigEndian.PutUint32(dst[:], r.Uint32())
		ttl := byte(r.IntN(256))
		p := mkIPv4(src, dst, byte(r.IntN(256)), ttl, nil, nil)
		binary.BigEndian.PutUint16(p[4:6], uint16(r.Uint32()))
		binary.BigEndian.PutUint16(p[10:12], 0)
		binary.BigEndian.PutUint16(p[10:12], checksum(p[:20]))
		orig := bytes.Clone(p)
		ok := decTTL(p)
		if ttl <= 1 {
			if ok || !bytes.Equal(p, orig) {
				t.Fatalf("TTL %d: decTTL = %v and changed the packet; want false, untouched", ttl, ok)
			}
			continue
		}
		if !ok || p[8] != ttl-1 {
			t.Fatalf("TTL %d: decTTL = %v, TTL now %d", ttl, ok, p[8])
		}
		if !headerChecksumOK(p[:20]) {
			t.Fatalf("TTL %d: header checksum %#04x invalid after decTTL", ttl, binary.BigEndian.Uint16(p[10:]))
		}
		full := bytes.Clone(p[:20])
		binary.BigEndian.PutUint16(full[10:], 0)
		if want, got := checksum(full), binary.BigEndian.Uint16(p[10:]); fold(uint64(want)) != fold(uint64(got)) && !(want == 0 && got == 0xffff) && !(want == 0xffff && got == 0) {
			t.Fatalf("TTL %d: incremental checksum %#04x, full recompute %#04x", ttl, got, want)
		}
	}
}

func TestIPv4Header(t *testing.T) {
	good := mkIPv4([4]byte{10, 5, 1, 1}, [4]byte{10, 5, 2, 1}, protoUDP, 64, []byte{1, 2, 3, 4}, []byte("hello"))
	if hl, tl, ok := ipv4Header(good); !ok || hl != 24 || tl != len(good) {
		t.Fatalf("ipv4Header(good) = %d, %d, %v", hl, tl, ok)
	}
	padded := append(bytes.Clone(good), 0, 0, 0)
	if _, tl, ok := ipv4Header(padded); !ok || tl != len(good) {
		t.Fatalf("trailing bytes: total length %d, ok %v", tl, ok)
	}
	bad := map[string][]byte{
		"empty":       nil,
		"short":       good[:19],
		"ipv6":        append([]byte{0x60}, good[1:]...),
		"ihl 4":       append([]byte{0x44}, good[1:]...),
		"ihl > len":   append([]byte{0x4f}, good[1:25]...),
		"total > len": good[:len(good)-1],
		"total < ihl": func() []byte { p := bytes.Clone(good); binary.BigEndian.PutUint16(p[2:], 10); return p }(),
	}
	for name, p := range bad {
		if _, _, ok := ipv4Header(p); ok {
			t.Errorf("%s: ipv4Header accepted it", name)
		}
	}
}

func checkICMPUnreachable(t *testing.T, icmp, orig []byte) {
	t.Helper()
	hl, tl, ok := ipv4Header(icmp)
	if !ok || hl != 20 || tl != len(icmp) {
		t.Fatalf("ICMP packet has a bad IPv4 header: % x", icmp)
	}
	if !headerChecksumOK(icmp[:20]) {
		t.Fatal("ICMP packet's IPv4 header checksum is invalid")
	}
	if icmp[9] != protoICMP || icmp[8] == 0 {
		t.Fatalf("protocol %d TTL %d, want ICMP with a TTL", icmp[9], icmp[8])
	}
	if !bytes.Equal(icmp[12:16], orig[16:20]) || !bytes.Equal(icmp[16:20], orig[12:16]) {
		t.Fatalf("addresses %v -> %v, want the original's reversed", icmp[12:16], icmp[16:20])
	}
	body := icmp[20:]
	if body[0] != 3 || body[1] != 0 {
		t.Fatalf("ICMP type %d code %d, want 3/0", body[0], body[1])
	}
	if fold(sum(body, 0)) != 0xffff {
		t.Fatal("ICMP checksum is invalid")
	}
	ohl := int(orig[0]&0xf) * 4
	want := orig[:min(ohl+8, len(orig))]
	if !bytes.Equal(body[8:], want) {
		t.Fatalf("quoted % x, want the original header + 8 bytes % x", body[8:], want)
	}
}

func TestNetUnreachable(t *testing.T) {
	src, dst := [4]byte{10, 5, 1, 5}, [4]byte{10, 5, 77, 1}
	payload := []byte("0123456789abcdef")
	yes := map[string][]byte{
		"tcp":           mkIPv4(src, dst, protoTCP, 64, nil, payload),
		"with options":  mkIPv4(src, dst, protoUDP, 64, []byte{1, 1, 1, 1, 1, 1, 1, 0}, payload),
		"short payload": mkIPv4(src, dst, protoUDP, 64, nil, []byte{1, 2, 3}),
		"no payload":    mkIPv4(src, dst, protoUDP, 64, nil, nil),
		"echo request":  mkIPv4(src, dst, protoICMP, 64, nil, []byte{8, 0, 0, 0, 0, 1, 0, 1, 9, 9}),
		"max options":   mkIPv4(src, dst, protoTCP, 64, bytes.Repeat([]byte{1}, 40), payload),
	}
	for name, orig := range yes {
		t.Run(name, func(t *testing.T) {
			buf := make([]byte, netUnreachableLen)
			n := netUnreachable(buf, orig)
			if n == 0 {
				t.Fatal("no ICMP error built")
			}
			checkICMPUnreachable(t, buf[:n], orig)
		})
	}
	frag := mkIPv4(src, dst, protoUDP, 64, nil, payload)
	binary.BigEndian.PutUint16(frag[6:8], 100)
	no := map[string][]byte{
		"icmp error":     mkIPv4(src, dst, protoICMP, 64, nil, []byte{3, 1, 0, 0, 0, 0, 0, 0}),
		"later fragment": frag,
		"multicast src":  mkIPv4([4]byte{224, 0, 0, 5}, dst, protoUDP, 64, nil, payload),
		"zero src":       mkIPv4([4]byte{}, dst, protoUDP, 64, nil, payload),
		"broadcast src":  mkIPv4([4]byte{255, 255, 255, 255}, dst, protoUDP, 64, nil, payload),
		"malformed":      []byte{0x45, 0, 0},
	}
	for name, orig := range no {
		if n := netUnreachable(make([]byte, netUnreachableLen), orig); n != 0 {
			t.Errorf("%s: built an ICMP error of %d bytes, want none", name, n)
		}
	}
}

// slowSum is RFC 1071's reference loop over 16-bit words.
func slowSum(b []byte) uint16 {
	var acc uint32
	for len(b) >= 2 {
		acc += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		acc += uint32(b[0]) << 8
	}
	for acc > 0xffff {
		acc = acc>>16 + acc&0xffff
	}
	return uint16(acc)
}

func TestSumMatchesReference(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	for n := 0; n < 300; n++ {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		if n%7 == 0 {
			for i := range b {
				b[i] = 0xff // carries everywhere
			}
		}
		want := slowSum(b)
		got := fold(sum(b, 0))
		// 0x0000 and 0xffff are the same number in one's complement.
		if got != want && !(got == 0xffff && want == 0) && !(got == 0 && want == 0xffff) {
			t.Fatalf("len %d: sum folds to %#04x, reference %#04x", n, got, want)
		}
		// Chaining sums equals summing the concatenation when the first
		// part has even length.
		if n >= 2 {
			k := (n / 2) &^ 1
			chained := fold(sum(b[k:], sum(b[:k], 0)))
			if chained != got && !(chained == 0xffff && got == 0) && !(chained == 0 && got == 0xffff) {
				t.Fatalf("len %d split at %d: chained %#04x, whole %#04x", n, k, chained, got)
			}
		}
	}
}

func BenchmarkChecksum64K(b *testing.B) {
	buf := make([]byte, 65535)
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		_ = fold(sum(buf, 0))
	}
}
