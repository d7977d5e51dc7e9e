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

// newTable builds the table of peers (remote subnet → PublicIP), sending
// to UDP port port. Entries that are not IPv4 are skipped.
func newTable(peers map[netip.Prefix]netip.Addr, port int) *table {
	t := &table{
		bySubnet: make(map[uint64]int32, len(peers)),
		bySender: make(map[uint32][]int32, len(peers)),
		peers:    make([]peer, 0, len(peers)),
	}
	for sn, pub := range peers {
		if !sn.Addr().Is4() || !pub.Is4() {
			continue
		}
		s := sn.Masked()
		p := peer{subnet: s, publicIP: ip.Uint32(pub)}
		p.sa.Family = unix.AF_INET
		p.sa.Addr = pub.As4()
		// sin_port is in network byte order.
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&p.sa.Port))[:], uint16(port))
		t.bySubnet[subnetKey(ip.Uint32(s.Addr()), s.Bits())] = int32(len(t.peers))
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

// peerTable is the packet path's table as a backend.Table: applied is what
// the current snapshot was built from; Set and Delete change it, and Apply
// swaps in a new snapshot when they did.
type peerTable struct {
	applied map[netip.Prefix]netip.Addr
}

func (t *peerTable) Dump(add func(netip.Prefix, netip.Addr)) error {
	for sn, pub := range t.applied {
		add(sn, pub)
	}
	return nil
}

func (t *peerTable) Set(sns []netip.Prefix, pubs []netip.Addr, _ []error) {
	for i, sn := range sns {
		t.applied[sn] = pubs[i]
	}
}

func (t *peerTable) Delete(sns []netip.Prefix, _ []netip.Addr, _ []error) {
	for _, sn := range sns {
		delete(t.applied, sn)
	}
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
