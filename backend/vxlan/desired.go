package vxlan

import (
	"bytes"
	"cmp"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/subnet"
)

// backendType is the name this backend registers under and the BackendType
// of the leases it programs.
const backendType = "vxlan"

// hwAddr is an Ethernet address; unlike net.HardwareAddr it is comparable,
// so neighbour and fdb sets diff as plain maps.
type hwAddr [6]byte

func (m hwAddr) String() string { return net.HardwareAddr(m[:]).String() }

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

// neighEntry is a neighbour on the VTEP device: the remote subnet's
// first address resolves to the remote VTEP's MAC.
type neighEntry struct {
	IP    netip.Addr
	MAC   hwAddr
	State int // NUD_PERMANENT when desired
}

// fdbEntry is a forwarding entry of the VTEP device: frames to MAC are
// encapsulated to Dst.
type fdbEntry struct {
	MAC   hwAddr
	Dst   netip.Addr
	VNI   int // 0: the device's VNI
	State int // NUD_PERMANENT when desired
}

// skip is a remote lease the backend does not program, and why.
type skip struct {
	Subnet netip.Prefix
	Reason string
}

// desired is what the kernel should hold for a set of remote leases.
type desired struct {
	neighs map[netip.Addr]neighEntry // by remote subnet IP
	fdbs   map[hwAddr]fdbEntry       // by remote VTEP MAC
	routes []backend.Route
	skips  []skip

	// Scratch space reused between calls.
	order    []int
	macOwner map[hwAddr]netip.Prefix
}

func newDesired() *desired {
	return &desired{
		neighs:   map[netip.Addr]neighEntry{},
		fdbs:     map[hwAddr]fdbEntry{},
		macOwner: map[hwAddr]netip.Prefix{},
	}
}

// world is what desired computation needs to know about this node.
type world struct {
	v6       bool         // the IPv6 overlay: leases' IPv6Subnet, PublicIPv6, BackendV6Data
	network  netip.Prefix // Config.Network (IPv6Network)
	own      subnet.Lease // this node's lease
	vtep     int          // index of flannel.<VNI> (flannel-v6.<VNI>)
	ext      int          // index of the external interface
	direct   bool         // DirectRouting is on
	extNets  []netip.Prefix
	localIPs []netip.Addr // this node's own addresses (PublicIP, IfaceAddr)
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

// family names the overlay's address family in log lines.
func (w *world) family() string {
	if w.v6 {
		return "IPv6"
	}
	return "IPv4"
}

// is reports whether a is an address of the overlay's family.
func (w *world) is(a netip.Addr) bool {
	if w.v6 {
		return a.Is6() && !a.Is4In6()
	}
	return a.Is4()
}

// compute fills d with the entries for remote. For a lease tunnelled through
// VXLAN that is a permanent neighbour (subnet IP → VtepMAC), an fdb entry
// (VtepMAC → PublicIP) and an onlink route (subnet via subnet IP). With
// DirectRouting, a lease whose PublicIP is on a network the external
// interface is directly attached to gets only a plain route via its PublicIP
// on that interface, as flannel does; any neighbour or fdb entry left from
// when it was tunnelled is then removed.
//
// Leases are taken in subnet order (then PublicIP), so the outcome does not
// depend on the order of remote; a lease that cannot be programmed (other backend type,
// unusable BackendData, outside Network, clashing with the own subnet, a
// duplicate subnet or VtepMAC, this node's own PublicIP) is reported in
// d.skips and left out.
func (d *desired) compute(w world, remote []subnet.Lease) {
	clear(d.neighs)
	clear(d.fdbs)
	d.routes = d.routes[:0]
	d.skips = d.skips[:0]

	clear(d.macOwner)
	d.order = d.order[:0]
	for i := range remote {
		d.order = append(d.order, i)
	}
	slices.SortStableFunc(d.order, func(a, b int) int {
		sa, pa, da := w.view(&remote[a])
		sb, pb, db := w.view(&remote[b])
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

	ownSn, _, _ := w.view(&w.own)
	pubKey, dataKey := "PublicIP", "BackendData"
	if w.v6 {
		pubKey, dataKey = "PublicIPv6", "BackendV6Data"
	}
	// Sorted by first address, a subnet overlaps an accepted one exactly when
	// it starts at or before the furthest end accepted so far.
	var last netip.Prefix // the accepted subnet that ends furthest
	var lastEnd netip.Addr
	for _, i := range d.order {
		l := &remote[i]
		sn, pub, data := w.view(l)
		if !sn.IsValid() && w.v6 {
			sn = l.Subnet // name the lease by what it has
		}
		skipf := func(format string, args ...any) {
			d.skips = append(d.skips, skip{sn, fmt.Sprintf(format, args...)})
		}
		switch {
		case w.v6 && !l.IPv6Subnet.IsValid():
			skipf("the lease has no IPv6 subnet")
			continue
		case !sn.IsValid() || !w.is(sn.Addr()) || sn.Masked() != sn:
			skipf("subnet %s is not an %s subnet", sn, w.family())
			continue
		case sn.Bits() <= w.network.Bits() || !w.network.Contains(sn.Addr()):
			skipf("subnet is not inside Network %s", w.network)
			continue
		case ownSn.IsValid() && sn.Overlaps(ownSn):
			skipf("subnet overlaps this node's lease %s", ownSn)
			continue
		case last.IsValid() && sn.Addr().Compare(lastEnd) <= 0:
			skipf("subnet overlaps the lease %s", last)
			continue
		case !pub.IsValid():
			skipf("%s is missing", pubKey)
			continue
		case !w.is(pub):
			skipf("%s %s is not an %s address", pubKey, pub, w.family())
			continue
		case slices.Contains(w.localIPs, pub):
			skipf("%s %s is this node's own address (a stale lease of this node?)", pubKey, pub)
			continue
		}
		mac, err := leaseMAC(dataKey, data)
		if err != nil {
			skipf("%v", err)
			continue
		}
		if other, dup := d.macOwner[mac]; dup {
			skipf("VtepMAC %s is already used by the lease %s", mac, other)
			continue
		}
		d.macOwner[mac] = sn
		if end := lastAddr(sn); !last.IsValid() || end.Compare(lastEnd) > 0 {
			last, lastEnd = sn, end
		}

		if w.direct && onNets(w.extNets, pub) {
			d.routes = append(d.routes, backend.Route{Dst: sn, Gw: pub, LinkIndex: w.ext})
			continue
		}
		gw := sn.Addr()
		d.neighs[gw] = neighEntry{IP: gw, MAC: mac, State: unix.NUD_PERMANENT}
		d.fdbs[mac] = fdbEntry{MAC: mac, Dst: pub, State: unix.NUD_PERMANENT}
		d.routes = append(d.routes, backend.Route{Dst: sn, Gw: gw, LinkIndex: w.vtep, Onlink: true})
	}
}

// lastAddr is the last address of p.
func lastAddr(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr().As16()
	i := p.Bits()
	if p.Addr().Is4() {
		i += 96
	}
	for ; i < 128; i++ {
		if i%8 == 0 {
			for ; i < 128; i += 8 {
				a[i/8] = 0xff
			}
			break
		}
		a[i/8] |= 1 << (7 - i%8)
	}
	return netip.AddrFrom16(a).Unmap()
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
