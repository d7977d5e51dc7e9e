package udp

import (
	"encoding/binary"
	"math/bits"
)

// IPv4 header facts used by the packet path.
const (
	ipv4MinHeader = 20
	protoICMP     = 1
	protoTCP      = 6
	protoUDP      = 17
	// icmpTTL is the TTL of the ICMP errors the backend writes into the TUN.
	icmpTTL = 64
)

// ipv4Header checks that pkt starts with a well-formed IPv4 header and
// returns its length and the packet's total length. ok is false for anything
// else: another IP version, a header shorter than 20 bytes or longer than
// the buffer, a total length outside [header, len(pkt)].
func ipv4Header(pkt []byte) (hdrLen, totalLen int, ok bool) {
	if len(pkt) < ipv4MinHeader || pkt[0]>>4 != 4 {
		return 0, 0, false
	}
	hdrLen = int(pkt[0]&0x0f) * 4
	totalLen = int(binary.BigEndian.Uint16(pkt[2:4]))
	if hdrLen < ipv4MinHeader || totalLen < hdrLen || totalLen > len(pkt) {
		return 0, 0, false
	}
	return hdrLen, totalLen, true
}

func srcAddr(pkt []byte) uint32 { return binary.BigEndian.Uint32(pkt[12:16]) }
func dstAddr(pkt []byte) uint32 { return binary.BigEndian.Uint32(pkt[16:20]) }

// sum adds b to the one's-complement running sum acc (RFC 1071), without
// folding. It adds big-endian 64-bit words with carry, which folds to the
// same 16-bit sum.
func sum(b []byte, acc uint64) uint64 {
	var c uint64
	for len(b) >= 64 {
		acc, c = bits.Add64(acc, binary.BigEndian.Uint64(b[0:8]), c)
		acc, c = bits.Add64(acc, binary.BigEndian.Uint64(b[8:16]), c)
		acc, c = bits.Add64(acc, binary.BigEndian.Uint64(b[16:24]), c)
		acc, c = bits.Add64(acc, binary.BigEndian.Uint64(b[24:32]), c)
		acc, c = bits.Add64(acc, binary.BigEndian.Uint64(b[32:40]), c)
		acc, c = bits.Add64(acc, binary.BigEndian.Uint64(b[40:48]), c)
		acc, c = bits.Add64(acc, binary.BigEndian.Uint64(b[48:56]), c)
		acc, c = bits.Add64(acc, binary.BigEndian.Uint64(b[56:64]), c)
		b = b[64:]
	}
	for len(b) >= 8 {
		acc, c = bits.Add64(acc, binary.BigEndian.Uint64(b), c)
		b = b[8:]
	}
	if len(b) >= 4 {
		acc, c = bits.Add64(acc, uint64(binary.BigEndian.Uint32(b)), c)
		b = b[4:]
	}
	if len(b) >= 2 {
		acc, c = bits.Add64(acc, uint64(binary.BigEndian.Uint16(b)), c)
		b = b[2:]
	}
	if len(b) == 1 {
		acc, c = bits.Add64(acc, uint64(b[0])<<8, c)
	}
	acc, c = bits.Add64(acc, 0, c)
	return acc + c
}

func fold(acc uint64) uint16 {
	acc = (acc >> 32) + (acc & 0xffffffff)
	acc = (acc >> 32) + (acc & 0xffffffff)
	acc = (acc >> 16) + (acc & 0xffff)
	acc = (acc >> 16) + (acc & 0xffff)
	return uint16(acc)
}

// pseudoSum is the sum of the IPv4 pseudo-header of pkt for protocol proto
// and an L4 length of l4len.
func pseudoSum(pkt []byte, proto byte, l4len int) uint64 {
	return uint64(binary.BigEndian.Uint32(pkt[12:16])) + uint64(binary.BigEndian.Uint32(pkt[16:20])) + uint64(proto) + uint64(l4len)
}

// checksum is the Internet checksum of b: the value to store in a checksum
// field that was zero while summing.
func checksum(b []byte) uint16 { return ^fold(sum(b, 0)) }

// headerChecksumOK reports whether the IPv4 header hdr (including its
// checksum field) sums to all ones.
func headerChecksumOK(hdr []byte) bool { return fold(sum(hdr, 0)) == 0xffff }

// decTTL decrements the TTL of the IPv4 header in pkt and patches the header
// checksum incrementally (RFC 1624, eqn. 3). It returns false, leaving the
// packet untouched, when the TTL is 0 or 1: the packet must be dropped.
func decTTL(pkt []byte) bool {
	ttl := pkt[8]
	if ttl <= 1 {
		return false
	}
	old := binary.BigEndian.Uint16(pkt[8:10])
	pkt[8] = ttl - 1
	updated := binary.BigEndian.Uint16(pkt[8:10])
	hc := binary.BigEndian.Uint16(pkt[10:12])
	acc := uint64(^hc) + uint64(^old) + uint64(updated)
	binary.BigEndian.PutUint16(pkt[10:12], ^fold(acc))
	return true
}

// isICMPError reports whether t is an ICMP type that reports an error; no
// ICMP error is sent about those (RFC 1122 3.2.2).
func isICMPError(t byte) bool {
	switch t {
	case 3, 4, 5, 11, 12:
		return true
	}
	return false
}

// netUnreachableLen is the largest ICMP net-unreachable the backend builds:
// IPv4 header, ICMP header, the original header (up to 60 bytes) and 8
// bytes of its payload.
const netUnreachableLen = ipv4MinHeader + 8 + 60 + 8

// netUnreachable writes into dst (at least netUnreachableLen bytes) an ICMP
// destination-unreachable, code 0 (net unreachable), for the IPv4 packet
// orig, addressed to orig's source. The error quotes orig's header and the
// first 8 bytes of its payload. Its source is orig's destination, an address
// the kernel routes into the TUN, so reverse-path filtering accepts it (the
// host's own addresses would be dropped as martians). It returns the length
// written, or 0 when no error may be sent: orig is a non-first fragment, an
// ICMP error itself, or from a multicast, broadcast or unspecified source.
func netUnreachable(dst, orig []byte) int {
	hl, tl, ok := ipv4Header(orig)
	if !ok {
		return 0
	}
	if binary.BigEndian.Uint16(orig[6:8])&0x1fff != 0 {
		return 0 // not the first fragment
	}
	src := srcAddr(orig)
	if src == 0 || src == 0xffffffff || src>>28 == 0xe {
		return 0
	}
	if orig[9] == protoICMP && (tl <= hl || isICMPError(orig[hl])) {
		return 0
	}
	quote := hl + 8
	if quote > tl {
		quote = tl
	}
	n := ipv4MinHeader + 8 + quote
	p := dst[:n]
	clear(p[:ipv4MinHeader+8])
	p[0] = 0x45
	binary.BigEndian.PutUint16(p[2:4], uint16(n))
	p[8] = icmpTTL
	p[9] = protoICMP
	copy(p[12:16], orig[16:20])
	copy(p[16:20], orig[12:16])
	binary.BigEndian.PutUint16(p[10:12], checksum(p[:ipv4MinHeader]))
	icmp := p[ipv4MinHeader:]
	icmp[0] = 3 // destination unreachable
	icmp[1] = 0 // net unreachable
	copy(icmp[8:], orig[:quote])
	binary.BigEndian.PutUint16(icmp[2:4], checksum(icmp))
	return n
}
