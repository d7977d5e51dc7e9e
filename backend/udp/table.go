package udp

import (
	"encoding/binary"
	"net/netip"
	"slices"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/pkg/ip"
)

// peer is one remote lease as the packet path needs it.
type peer struct {
	subnet   netip.Prefix
	publicIP uint32
	// sa is the UDP destination, ready for sendmmsg.
	sa unix.RawSockaddrInet4
}

// table is an immutable snapshot of the remote leases. Apply builds a new
// one and swaps it in atomically; the packet path reads it without locks,
// and its lookups do not allocate.
type table struct {
	// lens are the distinct prefix lengths of the subnets, longest first.
	lens []int
	// bySubnet maps subnetKey(addr, len) to an index into peers.
	bySubnet map[uint64]int32
	peers    []peer
	// bySender maps a PublicIP to the indexes of its leases.
	bySender map[uint32][]int32
}

func subnetKey(addr uint32, bits int) uint64 { return uint64(addr)<<8 | uint64(bits) }

func mask(bits int) uint32 {
	if bits == 0 {
		return 0
	}
	return ^uint32(0) << (32 - bits)
}

// route is a remote lease to add to a table.
type route struct {
	Subnet   netip.Prefix
	PublicIP netip.Addr
}

// newTable builds the table for routes, sending to UDP port port. Invalid
// entries (non-IPv4) are skipped; of two routes for the same subnet the last
// wins.
func newTable(routes []route, port int) *table {
	t := &table{
		bySubnet: make(map[uint64]int32, len(routes)),
		bySender: make(map[uint32][]int32, len(routes)),
	}
	for _, r := range routes {
		if !r.Subnet.Addr().Is4() || !r.PublicIP.Is4() {
			continue
		}
		s := r.Subnet.Masked()
		p := peer{subnet: s, publicIP: ip.Uint32(r.PublicIP)}
		p.sa.Family = unix.AF_INET
		p.sa.Addr = r.PublicIP.As4()
		// sin_port is in network byte order.
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&p.sa.Port))[:], uint16(port))
		k := subnetKey(ip.Uint32(s.Addr()), s.Bits())
		if i, dup := t.bySubnet[k]; dup {
			t.peers[i] = p
			continue
		}
		t.bySubnet[k] = int32(len(t.peers))
		t.peers = append(t.peers, p)
		if !slices.Contains(t.lens, s.Bits()) {
			t.lens = append(t.lens, s.Bits())
		}
	}
	for i, p := range t.peers {
		t.bySender[p.publicIP] = append(t.bySender[p.publicIP], int32(i))
	}
	slices.SortFunc(t.lens, func(a, b int) int { return b - a })
	return t
}

// lookup returns the index of the peer whose subnet holds dst, the longest
// match if subnets nest, or -1.
func (t *table) lookup(dst uint32) int32 {
	for _, l := range t.lens {
		if i, ok := t.bySubnet[subnetKey(dst&mask(l), l)]; ok {
			return i
		}
	}
	return -1
}

// verdict is what the receive path decides about a datagram's origin.
type verdict int

const (
	accept verdict = iota
	unknownSender
	spoofedSource
)

// check decides whether an inner packet with source address src may come
// from the UDP sender from: the sender must hold a lease, and src must lie
// in one of its subnets.
func (t *table) check(from, src uint32) verdict {
	idx, ok := t.bySender[from]
	if !ok {
		return unknownSender
	}
	for _, i := range idx {
		p := &t.peers[i]
		b := p.subnet.Bits()
		if src&mask(b) == ip.Uint32(p.subnet.Addr()) {
			return accept
		}
	}
	return spoofedSource
}
