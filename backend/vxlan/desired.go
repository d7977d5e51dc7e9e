package vxlan

import (
	"bytes"
	"cmp"
	"encoding/json"
	"fmt"
	"iter"
	"net"
	"net/netip"
	"slices"

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

// desired is what the kernel should hold for a set of remote leases, as
// sorted desired sets (backend.Entry) of pointer-free entries, 26 bytes a
// neighbour and 32 an fdb entry, and the leases' routes read from the
// leases themselves. An Apply computes it afresh and drops it when done:
// between Applies the backend holds no entry and no lease.
type desired struct {
	w      world
	remote []subnet.Lease                  // the Apply's leases, read only
	peers  []peerRef                       // the leases of the family, in subnet order
	neighs []backend.Entry[addr, neighVal] // by subnet IP
	fdbs   []backend.Entry[hwAddr, fdbVal] // by VtepMAC
	routes int                             // how many leases get a route
	skips  []skip
}

// peerRef is a remote lease with a subnet of the overlay's family: its
// index in remote, its VtepMAC (if usable), what compute made of it and,
// for kindDupMAC, the index in peers of the lease that has the MAC.
type peerRef struct {
	i     int32
	owner int32
	mac   hwAddr
	kind  uint8
}

// The kinds of peerRef: programmed (tunnelled or routed directly) or
// skipped, and why.
const (
	kindTunnel = iota
	kindDirect
	kindSameSubnet
	kindBadData
	kindDupMAC
)

func newDesired() *desired { return &desired{} }

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
	d.skips = d.skips[:0]
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
			d.peers[p].kind, d.peers[p].owner = kindDupMAC, owner
			continue
		}
		owner = p
	}

	d.neighs = make([]backend.Entry[addr, neighVal], 0, len(byMAC))
	d.routes = 0
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
			has, _, _ := w.view(&remote[d.peers[r.owner].i])
			d.skips = append(d.skips, skip{sn, fmt.Sprintf("VtepMAC %s is already used by the lease %s", r.mac, has)})
			continue
		}
		d.routes++
		if w.direct && onNets(w.extNets, pub) {
			r.kind = kindDirect
			continue
		}
		d.neighs = append(d.neighs, backend.Entry[addr, neighVal]{Key: addrOf(sn.Addr()), Val: neighVal{r.mac, unix.NUD_PERMANENT}})
	}
	d.neighs = backend.SortEntries(d.neighs, compareAddrs) // sorted but for the family: only a subnet address's repeat goes
	d.fdbs = make([]backend.Entry[hwAddr, fdbVal], 0, len(d.neighs))
	for _, p := range byMAC {
		if r := &d.peers[p]; r.kind == kindTunnel {
			_, pub, _ := w.view(&remote[r.i])
			d.fdbs = append(d.fdbs, backend.Entry[hwAddr, fdbVal]{Key: r.mac, Val: fdbVal{state: unix.NUD_PERMANENT, dst: addrOf(pub)}})
		}
	}
}

// eachRoute yields the route of each lease compute programs, in subnet
// order, but not those of tunnelled leases whose subnet IP is in leaveOut.
func (d *desired) eachRoute(leaveOut map[addr]struct{}) iter.Seq[nlbatch.Route] {
	return func(yield func(nlbatch.Route) bool) {
		for _, r := range d.peers {
			if r.kind != kindTunnel && r.kind != kindDirect {
				continue
			}
			sn, pub, _ := d.w.view(&d.remote[r.i])
			route := nlbatch.Route{Dst: sn, Gw: pub, LinkIndex: d.w.ext}
			if r.kind == kindTunnel {
				if _, out := leaveOut[addrOf(sn.Addr())]; out {
					continue
				}
				route = nlbatch.Route{Dst: sn, Gw: sn.Addr(), LinkIndex: d.w.vtep, Onlink: true}
			}
			if !yield(route) {
				return
			}
		}
	}
}

// release drops what compute made, and the leases it read.
func (d *desired) release() {
	d.remote, d.peers, d.neighs, d.fdbs = nil, nil, nil, nil
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
