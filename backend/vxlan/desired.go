package vxlan

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sort"

	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/pkg/nlbatch"
	"github.com/flanneld-go/flanneld/subnet"
)

// backendType is the name this backend registers under and the BackendType
// of the leases it programs.
const backendType = "vxlan"

// hwAddr is an Ethernet address; unlike net.HardwareAddr it is an array:
// comparable, and without a pointer as a key of a desired set.
type hwAddr [6]byte

func (m hwAddr) String() string { return net.HardwareAddr(m[:]).String() }

func compareMACs(a, b hwAddr) int { return bytes.Compare(a[:], b[:]) }

// addr is a netip.Addr as the desired sets hold it: the 16 bytes of its
// IPv6 form and whether it is IPv4. Unlike a netip.Addr it has no pointer,
// so the garbage collector never scans a desired set.
type addr struct {
	a  [16]byte
	v4 bool
}

func addrOf(ip netip.Addr) addr { return addr{ip.As16(), ip.Is4()} }

func (a addr) ip() netip.Addr {
	if a.v4 {
		return netip.AddrFrom16(a.a).Unmap()
	}
	return netip.AddrFrom16(a.a)
}

// compareAddrs orders addresses as netip.Addr.Compare does: IPv4 first.
func compareAddrs(a, b addr) int {
	if a.v4 != b.v4 {
		if a.v4 {
			return -1
		}
		return 1
	}
	return bytes.Compare(a.a[:], b.a[:])
}

// neighVal is a neighbour as far as it is not its IP (the key) or the
// device: its lladdr and state.
type neighVal struct {
	mac   hwAddr
	state uint16
}

// fdbVal is an fdb entry of the device as far as it is not its MAC (the
// key): its remote, VNI and state.
type fdbVal struct {
	vni   uint32
	state uint16
	dst   addr
}

// usable reports whether m can be a VTEP's MAC: unicast, not all zero.
func (m hwAddr) usable() bool { return m != (hwAddr{}) && m[0]&1 == 0 }

// parseVtepMAC parses a VTEP MAC as published in a lease: six bytes, unicast,
// not all zero.
func parseVtepMAC(s string) (hwAddr, error) {
	hw, err := net.ParseMAC(s)
	if err != nil {
		return hwAddr{}, err
	}
	if len(hw) != 6 {
		return hwAddr{}, fmt.Errorf("%q is not a 6-byte Ethernet address", s)
	}
	m := hwAddr(hw)
	if !m.usable() {
		return hwAddr{}, fmt.Errorf("%s is not a unicast address", m)
	}
	return m, nil
}

// backendData is the BackendData a vxlan node publishes, in flannel
// v0.28's form {"VNI":1,"VtepMAC":"..."}; flannel v0.10 reads it too (it
// ignores VNI).
type backendData struct {
	VNI     int
	VtepMAC string
}

// skip is a remote lease the backend does not program, and why.
type skip struct {
	Subnet netip.Prefix
	Reason string
}

// desired is what the kernel should hold for a set of remote leases: the
// admitted leases of the overlay's family in subnet order (peers, 12 bytes
// a lease) and, over them, the desired sets of the three tables as views
// (backend.Desired, backend.RouteSet) that compute each entry from its
// lease when read. The neighbours and routes share the subnet order
// (positions in peers; no index at all when every lease has one), the fdb
// entries are the tunnelled leases in VtepMAC order (4 bytes a lease). An
// Apply computes it afresh and drops it when done: between Applies the
// backend holds no entry and no lease.
type desired struct {
	w      world
	remote []subnet.Lease // the Apply's leases, read only
	peers  []peerRef      // the leases of the family, in subnet order
	neighs neighSet       // by subnet IP
	fdbs   fdbSet         // by VtepMAC
	routes routeSet       // by subnet
	skips  []skip
	dups   []dupMAC // the kindDupMAC peers, by position
	// The subnet IPs of peers share their first pre bytes (pre ≤ 12),
	// those of com; peerRef.pre holds the next four, so that a subnet IP
	// is found among the peers without reading their leases. The IPs are
	// of one family unless mixed.
	pre   int
	com   addr
	mixed bool
}

// peerRef is a remote lease with a subnet of the overlay's family: its
// index in remote, its VtepMAC (if usable) and what compute made of it.
type peerRef struct {
	i    int32
	pre  uint32 // bytes pre to pre+4 of its subnet IP's 16-byte form
	mac  hwAddr
	kind uint8
}

// dupMAC is a peer left out because an earlier lease (owner) has its
// VtepMAC: their positions in peers.
type dupMAC struct{ p, owner int32 }

// The kinds of peerRef: programmed (tunnelled or routed directly) or
// skipped, and why.
const (
	kindTunnel = iota
	kindDirect
	kindSameSubnet
	kindBadData
	kindDupMAC
)

func newDesired() *desired {
	d := &desired{}
	d.neighs.d, d.fdbs.d, d.routes.d = d, d, d
	return d
}

// world is what desired computation needs to know about this node.
type world struct {
	v6      bool // the IPv6 overlay: leases' IPv6Subnet, PublicIPv6, BackendV6Data
	vtep    int  // index of flannel.<VNI> (flannel-v6.<VNI>)
	ext     int  // index of the external interface
	direct  bool // DirectRouting is on
	extNets []netip.Prefix
}

// view is the part of a lease one overlay uses: for IPv4 its Subnet,
// PublicIP and BackendData, for IPv6 its IPv6Subnet, PublicIPv6 and
// BackendV6Data.
func (w *world) view(l *subnet.Lease) (sn netip.Prefix, pub netip.Addr, data json.RawMessage) {
	if w.v6 {
		return l.IPv6Subnet, l.Attrs.PublicIPv6, l.Attrs.BackendV6Data
	}
	return l.Subnet, l.Attrs.PublicIP, l.Attrs.BackendData
}

// subset is some of d's peers, in their order: those at the positions idx
// lists, or all of them.
type subset struct {
	d   *desired
	idx []int32
	all bool
}

func (s *subset) Len() int {
	if s.all {
		return len(s.d.peers)
	}
	return len(s.idx)
}

// at returns the i-th peer of s and its lease.
func (s *subset) at(i int) (*peerRef, *subnet.Lease) {
	p := i
	if !s.all {
		p = int(s.idx[i])
	}
	r := &s.d.peers[p]
	return r, &s.d.remote[r.i]
}

// neighSet is the desired neighbours: subnet IP → VtepMAC of each
// tunnelled lease, in subnet order (of two subnets of one address, the
// latter's).
type neighSet struct{ subset }

func (s *neighSet) Key(i int) addr {
	_, l := s.at(i)
	sn, _, _ := s.d.w.view(l)
	return addrOf(sn.Addr())
}

// Search finds a subnet IP by the four bytes of it that peerRef holds,
// reading a lease only when they are equal and do not tell it all.
func (s *neighSet) Search(k addr) int {
	d := s.d
	if d.mixed {
		return backend.Search[addr, neighVal](neighSearch{s}, k, compareAddrs)
	}
	if len(d.peers) == 0 || k.v4 != d.com.v4 || !bytes.Equal(k.a[:d.pre], d.com.a[:d.pre]) {
		return -1
	}
	kp := binary.BigEndian.Uint32(k.a[d.pre:])
	whole := d.pre == 12 // pre and the common bytes are the whole address
	i, ok := sort.Find(s.Len(), func(m int) int {
		p := m
		if !s.all {
			p = int(s.idx[m])
		}
		c := cmp.Compare(kp, d.peers[p].pre)
		if c == 0 && !whole {
			c = compareAddrs(k, s.Key(m))
		}
		return c
	})
	if !ok {
		return -1
	}
	return i
}

// neighSearch is a neighSet without its Search: searched by Key.
type neighSearch struct{ s *neighSet }

func (n neighSearch) Len() int           { return n.s.Len() }
func (n neighSearch) Key(i int) addr     { return n.s.Key(i) }
func (n neighSearch) Val(i int) neighVal { return n.s.Val(i) }

func (s *neighSet) Val(i int) neighVal {
	r, _ := s.at(i)
	return neighVal{r.mac, unix.NUD_PERMANENT}
}

// fdbSet is the desired fdb entries: VtepMAC → PublicIP of each tunnelled
// lease, in VtepMAC order.
type fdbSet struct{ subset }

func (s *fdbSet) Key(i int) hwAddr {
	r, _ := s.at(i)
	return r.mac
}

// Search finds a VtepMAC by binary search over the peers' MACs.
func (s *fdbSet) Search(k hwAddr) int {
	kv := macValue(k)
	lo, hi := 0, len(s.idx)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		switch v := macValue(s.d.peers[s.idx[m]].mac); {
		case v < kv:
			lo = m + 1
		case v > kv:
			hi = m
		default:
			return m
		}
	}
	return -1
}

// macValue is m as a number, in the order of compareMACs.
func macValue(m hwAddr) uint64 {
	return uint64(m[0])<<40 | uint64(m[1])<<32 | uint64(m[2])<<24 | uint64(m[3])<<16 | uint64(m[4])<<8 | uint64(m[5])
}

func (s *fdbSet) Val(i int) fdbVal {
	_, l := s.at(i)
	_, pub, _ := s.d.w.view(l)
	return fdbVal{state: unix.NUD_PERMANENT, dst: addrOf(pub)}
}

// routeSet is the desired routes, in subnet order: of a tunnelled lease
// its subnet via its subnet IP onlink on the VTEP device, of a direct one
// its subnet via its PublicIP on the external interface.
type routeSet struct{ subset }

func (s *routeSet) Route(i int) nlbatch.Route {
	r, l := s.at(i)
	sn, pub, _ := s.d.w.view(l)
	if r.kind == kindTunnel {
		return nlbatch.Route{Dst: sn, Gw: sn.Addr(), LinkIndex: s.d.w.vtep, Onlink: true}
	}
	return nlbatch.Route{Dst: sn, Gw: pub, LinkIndex: s.d.w.ext}
}

var (
	_ backend.Desired[addr, neighVal] = (*neighSet)(nil)
	_ backend.Desired[hwAddr, fdbVal] = (*fdbSet)(nil)
	_ backend.RouteSet                = (*routeSet)(nil)
)

// compute fills d with the entries for remote, leases the caller admitted
// (valid subnets of the network, not this node's, of type vxlan); d reads
// remote until release. For a lease tunnelled through VXLAN that is a
// permanent neighbour (subnet IP → VtepMAC), an fdb entry (VtepMAC →
// PublicIP) and an onlink route (subnet via subnet IP). With DirectRouting,
// a lease whose PublicIP is on a network the external interface is
// directly attached to gets only a plain route via its PublicIP on that
// interface, as flannel does; any neighbour or fdb entry left from when it
// was tunnelled is then removed.
//
// A lease without a subnet of the overlay's family (an IPv4-only lease on
// the IPv6 overlay) has nothing here. Leases are taken in subnet order (then
// PublicIP), so the outcome does not depend on the order of remote; a lease
// whose BackendData is unusable, or whose subnet or VtepMAC an earlier lease
// already has, is reported in d.skips and left out. (Of two subnets of one
// address, 10.5.0.0/16 and 10.5.0.0/24, the neighbour is the latter's.)
func (d *desired) compute(w world, remote []subnet.Lease) {
	d.w, d.remote = w, remote
	d.skips, d.dups = d.skips[:0], d.dups[:0]
	d.peers = make([]peerRef, 0, len(remote))
	for i := range remote {
		if sn, _, _ := w.view(&remote[i]); sn.IsValid() {
			d.peers = append(d.peers, peerRef{i: int32(i)})
		}
	}
	slices.SortStableFunc(d.peers, func(a, b peerRef) int {
		sa, pa, da := w.view(&remote[a.i])
		sb, pb, db := w.view(&remote[b.i])
		if c := sa.Addr().Compare(sb.Addr()); c != 0 {
			return c
		}
		if c := cmp.Compare(sa.Bits(), sb.Bits()); c != 0 {
			return c
		}
		if c := pa.Compare(pb); c != 0 {
			return c
		}
		return bytes.Compare(da, db)
	})

	// The bytes the subnet IPs share, and the next four of each.
	d.pre, d.com, d.mixed = 0, addr{}, false
	if n := len(d.peers); n > 0 {
		first, _, _ := w.view(&remote[d.peers[0].i])
		last, _, _ := w.view(&remote[d.peers[n-1].i])
		a, b := addrOf(first.Addr()), addrOf(last.Addr())
		d.com, d.mixed = a, a.v4 != b.v4
		for d.pre < 12 && a.a[d.pre] == b.a[d.pre] {
			d.pre++
		}
		for p := range d.peers {
			sn, _, _ := w.view(&remote[d.peers[p].i])
			a := sn.Addr().As16()
			d.peers[p].pre = binary.BigEndian.Uint32(a[d.pre:])
		}
	}

	dataKey := "BackendData"
	if w.v6 {
		dataKey = "BackendV6Data"
	}
	// The subnets and VtepMACs, byMAC the leases with one sorted by it.
	var last netip.Prefix // the previous lease's subnet
	byMAC := make([]int32, 0, len(d.peers))
	for p := range d.peers {
		r := &d.peers[p]
		sn, _, data := w.view(&remote[r.i])
		if sn == last {
			// Only the IPv6 subnets of dual-stack leases can repeat: the
			// store keys such a lease by its IPv4 subnet.
			r.kind = kindSameSubnet
			continue
		}
		last = sn
		mac, err := leaseMAC(dataKey, data)
		if err != nil {
			r.kind = kindBadData
			continue
		}
		r.mac = mac
		byMAC = append(byMAC, int32(p))
	}
	// A VtepMAC is the first lease's that has it, tunnelled or direct.
	slices.SortStableFunc(byMAC, func(a, b int32) int { return compareMACs(d.peers[a].mac, d.peers[b].mac) })
	owner := int32(-1)
	for _, p := range byMAC {
		if owner >= 0 && d.peers[owner].mac == d.peers[p].mac {
			d.peers[p].kind = kindDupMAC
			d.dups = append(d.dups, dupMAC{p, owner})
			continue
		}
		owner = p
	}
	slices.SortFunc(d.dups, func(a, b dupMAC) int { return cmp.Compare(a.p, b.p) })

	// Which leases are tunnelled, which routed directly; the neighbours
	// and routes are all the leases unless some are neither, or two
	// subnets share an address.
	routes, tunnels, repeats := 0, 0, false
	var lastIP netip.Addr // the previous tunnelled lease's subnet IP
	for p := range d.peers {
		r := &d.peers[p]
		sn, pub, data := w.view(&remote[r.i])
		switch r.kind {
		case kindSameSubnet:
			d.skips = append(d.skips, skip{sn, "another lease has the same subnet"})
			continue
		case kindBadData:
			_, err := leaseMAC(dataKey, data)
			d.skips = append(d.skips, skip{sn, err.Error()})
			continue
		case kindDupMAC:
			j, _ := slices.BinarySearchFunc(d.dups, int32(p), func(u dupMAC, p int32) int { return cmp.Compare(u.p, p) })
			has, _, _ := w.view(&remote[d.peers[d.dups[j].owner].i])
			d.skips = append(d.skips, skip{sn, fmt.Sprintf("VtepMAC %s is already used by the lease %s", r.mac, has)})
			continue
		}
		routes++
		if w.direct && onNets(w.extNets, pub) {
			r.kind = kindDirect
			continue
		}
		tunnels++
		repeats = repeats || sn.Addr() == lastIP
		lastIP = sn.Addr()
	}
	d.routes.idx, d.routes.all = nil, routes == len(d.peers)
	if !d.routes.all {
		d.routes.idx = make([]int32, 0, routes)
		for p := range d.peers {
			if k := d.peers[p].kind; k == kindTunnel || k == kindDirect {
				d.routes.idx = append(d.routes.idx, int32(p))
			}
		}
	}
	d.neighs.idx, d.neighs.all = nil, tunnels == len(d.peers) && !repeats
	if !d.neighs.all {
		d.neighs.idx = make([]int32, 0, tunnels)
		lastIP = netip.Addr{}
		for p := range d.peers {
			r := &d.peers[p]
			if r.kind != kindTunnel {
				continue
			}
			sn, _, _ := w.view(&remote[r.i])
			if n := len(d.neighs.idx); n > 0 && sn.Addr() == lastIP {
				d.neighs.idx[n-1] = int32(p) // the latter subnet's
				continue
			}
			lastIP = sn.Addr()
			d.neighs.idx = append(d.neighs.idx, int32(p))
		}
	}
	n := 0
	for _, p := range byMAC {
		if d.peers[p].kind == kindTunnel {
			byMAC[n] = p
			n++
		}
	}
	d.fdbs.idx, d.fdbs.all = byMAC[:n], false
}

// leaveOut takes the routes of the tunnelled leases whose subnet IP is in
// out out of d.routes.
func (d *desired) leaveOut(out map[addr]struct{}) {
	if len(out) == 0 {
		return
	}
	idx := make([]int32, 0, d.routes.Len())
	for i := range d.routes.Len() {
		p := i
		if !d.routes.all {
			p = int(d.routes.idx[i])
		}
		r := &d.peers[p]
		if r.kind == kindTunnel {
			sn, _, _ := d.w.view(&d.remote[r.i])
			if _, ok := out[addrOf(sn.Addr())]; ok {
				continue
			}
		}
		idx = append(idx, int32(p))
	}
	d.routes.idx, d.routes.all = idx, false
}

// release drops what compute made, and the leases it read.
func (d *desired) release() {
	d.remote, d.peers = nil, nil
	d.neighs.idx, d.fdbs.idx, d.routes.idx = nil, nil, nil
	d.neighs.all, d.fdbs.all, d.routes.all = false, false, false
	if cap(d.dups) > 64 {
		d.dups = nil
	}
}

// leaseMAC extracts the VtepMAC of a lease's BackendData (key names it:
// BackendData or BackendV6Data).
func leaseMAC(key string, data json.RawMessage) (hwAddr, error) {
	if isNull(data) {
		return hwAddr{}, fmt.Errorf("%s is missing; a vxlan lease carries {\"VtepMAC\":\"xx:xx:xx:xx:xx:xx\"}", key)
	}
	// The forms nodes write ({"VNI":N,"VtepMAC":"..."} from flannel v0.28
	// and this daemon, {"VtepMAC":"..."} from older ones), without
	// encoding/json: this runs for every lease on every Apply.
	if m, ok := fastMAC(data); ok {
		return m, nil
	}
	var bd struct{ VtepMAC *string }
	if err := json.Unmarshal(data, &bd); err != nil {
		return hwAddr{}, fmt.Errorf("%s %s is not a JSON object with a VtepMAC string", key, compact(data))
	}
	if bd.VtepMAC == nil {
		return hwAddr{}, fmt.Errorf("%s %s has no VtepMAC", key, compact(data))
	}
	m, err := parseVtepMAC(*bd.VtepMAC)
	if err != nil {
		return hwAddr{}, fmt.Errorf("VtepMAC %q is unusable: %v", *bd.VtepMAC, err)
	}
	return m, nil
}

// fastMAC reads the VtepMAC of exactly {"VtepMAC":"xx:..."} or
// {"VNI":<digits>,"VtepMAC":"xx:..."}; false for anything else.
func fastMAC(data []byte) (hwAddr, bool) {
	s, ok := bytes.CutPrefix(data, []byte(`{"`))
	if !ok {
		return hwAddr{}, false
	}
	if rest, ok := bytes.CutPrefix(s, []byte(`VNI":`)); ok {
		i := bytes.IndexByte(rest, ',')
		if i <= 0 {
			return hwAddr{}, false
		}
		for _, c := range rest[:i] {
			if c < '0' || c > '9' {
				return hwAddr{}, false
			}
		}
		if s, ok = bytes.CutPrefix(rest[i+1:], []byte(`"`)); !ok {
			return hwAddr{}, false
		}
	}
	if s, ok = bytes.CutPrefix(s, []byte(`VtepMAC":"`)); !ok {
		return hwAddr{}, false
	}
	if s, ok = bytes.CutSuffix(s, []byte(`"}`)); !ok {
		return hwAddr{}, false
	}
	m, ok := colonMAC(s)
	return m, ok && m.usable()
}

// colonMAC parses "xx:xx:xx:xx:xx:xx" (hex digits of either case), the
// form net.HardwareAddr.String writes, without allocating.
func colonMAC(s []byte) (m hwAddr, ok bool) {
	if len(s) != 17 {
		return m, false
	}
	for i := range m {
		if i > 0 && s[3*i-1] != ':' {
			return m, false
		}
		hi, ok1 := unhex(s[3*i])
		lo, ok2 := unhex(s[3*i+1])
		if !ok1 || !ok2 {
			return m, false
		}
		m[i] = hi<<4 | lo
	}
	return m, true
}

func unhex(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	case 'A' <= c && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

// compact renders untrusted JSON for a log line, bounded in length.
func compact(data json.RawMessage) string {
	var b bytes.Buffer
	if json.Compact(&b, data) != nil {
		b.Reset()
		b.Write(data)
	}
	const max = 120
	if b.Len() > max {
		return string(b.Bytes()[:max]) + "…"
	}
	return b.String()
}

func onNets(nets []netip.Prefix, a netip.Addr) bool {
	for _, n := range nets {
		if n.Contains(a) {
			return true
		}
	}
	return false
}
