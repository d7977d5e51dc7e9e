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
	"github.com/flanneld-go/flanneld/pkg/ip"
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

// backendData is the BackendData a vxlan node publishes.
type backendData struct {
	VtepMAC string
}

// neighEntry is an IPv4 neighbour on the VTEP device: the remote subnet's
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
	network  netip.Prefix // Config.Network
	own      subnet.Lease // this node's lease
	vtep     int          // index of flannel.<VNI>
	ext      int          // index of the external interface
	direct   bool         // DirectRouting is on
	extNets  []netip.Prefix
	localIPs []netip.Addr // this node's own addresses (PublicIP, IfaceAddr)
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
		la, lb := &remote[a], &remote[b]
		if c := la.Subnet.Addr().Compare(lb.Subnet.Addr()); c != 0 {
			return c
		}
		if c := cmp.Compare(la.Subnet.Bits(), lb.Subnet.Bits()); c != 0 {
			return c
		}
		if c := la.Attrs.PublicIP.Compare(lb.Attrs.PublicIP); c != 0 {
			return c
		}
		return bytes.Compare(la.Attrs.BackendData, lb.Attrs.BackendData)
	})

	// Sorted by first address, a subnet overlaps an accepted one exactly when
	// it starts at or before the furthest end accepted so far.
	var last netip.Prefix // the accepted subnet that ends furthest
	var lastEnd uint32
	for _, i := range d.order {
		l := &remote[i]
		sn := l.Subnet
		skipf := func(format string, args ...any) {
			d.skips = append(d.skips, skip{sn, fmt.Sprintf(format, args...)})
		}
		switch {
		case !sn.IsValid() || !sn.Addr().Is4() || sn.Masked() != sn:
			skipf("subnet %s is not an IPv4 subnet", sn)
			continue
		case sn.Bits() <= w.network.Bits() || !w.network.Contains(sn.Addr()):
			skipf("subnet is not inside Network %s", w.network)
			continue
		case w.own.Subnet.IsValid() && sn.Overlaps(w.own.Subnet):
			skipf("subnet overlaps this node's lease %s", w.own.Subnet)
			continue
		case last.IsValid() && ip.Uint32(sn.Addr()) <= lastEnd:
			skipf("subnet overlaps the lease %s", last)
			continue
		case !l.Attrs.PublicIP.IsValid():
			skipf("PublicIP is missing")
			continue
		case !l.Attrs.PublicIP.Is4():
			skipf("PublicIP %s is not an IPv4 address", l.Attrs.PublicIP)
			continue
		case slices.Contains(w.localIPs, l.Attrs.PublicIP):
			skipf("PublicIP %s is this node's own address (a stale lease of this node?)", l.Attrs.PublicIP)
			continue
		}
		mac, err := leaseMAC(l.Attrs.BackendData)
		if err != nil {
			skipf("%v", err)
			continue
		}
		if other, dup := d.macOwner[mac]; dup {
			skipf("VtepMAC %s is already used by the lease %s", mac, other)
			continue
		}
		d.macOwner[mac] = sn
		if end := ip.Uint32(sn.Addr()) | (1<<(32-sn.Bits()) - 1); !last.IsValid() || end > lastEnd {
			last, lastEnd = sn, end
		}

		if w.direct && onNets(w.extNets, l.Attrs.PublicIP) {
			d.routes = append(d.routes, backend.Route{Dst: sn, Gw: l.Attrs.PublicIP, LinkIndex: w.ext})
			continue
		}
		gw := sn.Addr()
		d.neighs[gw] = neighEntry{IP: gw, MAC: mac, State: unix.NUD_PERMANENT}
		d.fdbs[mac] = fdbEntry{MAC: mac, Dst: l.Attrs.PublicIP, State: unix.NUD_PERMANENT}
		d.routes = append(d.routes, backend.Route{Dst: sn, Gw: gw, LinkIndex: w.vtep, Onlink: true})
	}
}

// leaseMAC extracts the VtepMAC of a lease's BackendData.
func leaseMAC(data json.RawMessage) (hwAddr, error) {
	if isNull(data) {
		return hwAddr{}, fmt.Errorf("BackendData is missing; a vxlan lease carries {\"VtepMAC\":\"xx:xx:xx:xx:xx:xx\"}")
	}
	// The form every node writes, without encoding/json: this runs for
	// every lease on every Apply.
	if s, ok := bytes.CutPrefix(data, []byte(`{"VtepMAC":"`)); ok {
		if s, ok := bytes.CutSuffix(s, []byte(`"}`)); ok {
			if m, ok := colonMAC(s); ok && m.usable() {
				return m, nil
			}
		}
	}
	var bd struct{ VtepMAC *string }
	if err := json.Unmarshal(data, &bd); err != nil {
		return hwAddr{}, fmt.Errorf("BackendData %s is not a JSON object with a VtepMAC string", compact(data))
	}
	if bd.VtepMAC == nil {
		return hwAddr{}, fmt.Errorf("BackendData %s has no VtepMAC", compact(data))
	}
	m, err := parseVtepMAC(*bd.VtepMAC)
	if err != nil {
		return hwAddr{}, fmt.Errorf("VtepMAC %q is unusable: %v", *bd.VtepMAC, err)
	}
	return m, nil
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
