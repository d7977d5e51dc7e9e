package vxlan

import (
	"bytes"
	"cmp"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/pkg/nlbatch"
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

// skip is a remote lease the backend does not program, and why.
type skip struct {
	Subnet netip.Prefix
	Reason string
}

// desired is what the kernel should hold for a set of remote leases. An
// Apply computes it afresh and drops it when done: between Applies the
// backend holds no entry.
type desired struct {
	neighs map[netip.Addr]nlbatch.Neigh // by remote subnet IP
	fdbs   map[hwAddr]nlbatch.Neigh     // by remote VTEP MAC
	routes []nlbatch.Route
	skips  []skip
}

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

// neigh is the permanent neighbour gw → mac on the VTEP device.
func (w *world) neigh(gw netip.Addr, mac hwAddr) nlbatch.Neigh {
	family := uint8(unix.AF_INET)
	if w.v6 {
		family = unix.AF_INET6
	}
	return nlbatch.Neigh{LinkIndex: w.vtep, Family: family, State: unix.NUD_PERMANENT, Type: unix.RTN_UNICAST, IP: gw, MAC: mac}
}

// fdb is the permanent fdb entry of the VTEP device: frames to mac are
// encapsulated to dst (in the device's VNI).
func (w *world) fdb(mac hwAddr, dst netip.Addr) nlbatch.Neigh {
	return nlbatch.Neigh{LinkIndex: w.vtep, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF, State: unix.NUD_PERMANENT, IP: dst, MAC: mac}
}

// compute fills d with the entries for remote, leases the caller admitted
// (valid subnets of the network, not this node's, of type vxlan). For a
// lease tunnelled through VXLAN that is a permanent neighbour (subnet IP →
// VtepMAC), an fdb entry (VtepMAC → PublicIP) and an onlink route (subnet
// via subnet IP). With DirectRouting, a lease whose PublicIP is on a
// network the external interface is directly attached to gets only a plain
// route via its PublicIP on that interface, as flannel does; any neighbour
// or fdb entry left from when it was tunnelled is then removed.
//
// A lease without a subnet of the overlay's family (an IPv4-only lease on
// the IPv6 overlay) has nothing here. Leases are taken in subnet order (then
// PublicIP), so the outcome does not depend on the order of remote; a lease
// whose BackendData is unusable, or whose subnet or VtepMAC an earlier lease
// already has, is reported in d.skips and left out.
func (d *desired) compute(w world, remote []subnet.Lease) {
	d.skips = d.skips[:0]
	order := make([]int, 0, len(remote))
	for i := range remote {
		if sn, _, _ := w.view(&remote[i]); sn.IsValid() {
			order = append(order, i)
		}
	}
	d.neighs = make(map[netip.Addr]nlbatch.Neigh, len(order))
	d.fdbs = make(map[hwAddr]nlbatch.Neigh, len(order))
	d.routes = make([]nlbatch.Route, 0, len(order))
	// A MAC is taken when a tunnelled lease has it (it is a key of fdbs)
	// or a directly routed one does (directMACs). The owner named in a
	// skip is looked up once all leases are placed (dups).
	var directMACs map[hwAddr]netip.Prefix
	var dups []dupMAC
	slices.SortStableFunc(order, func(a, b int) int {
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

	dataKey := "BackendData"
	if w.v6 {
		dataKey = "BackendV6Data"
	}
	var last netip.Prefix // the previous lease's subnet
	for _, i := range order {
		sn, pub, data := w.view(&remote[i])
		if sn == last {
			// Only the IPv6 subnets of dual-stack leases can repeat: the
			// store keys such a lease by its IPv4 subnet.
			d.skips = append(d.skips, skip{sn, "another lease has the same subnet"})
			continue
		}
		last = sn
		mac, err := leaseMAC(dataKey, data)
		if err != nil {
			d.skips = append(d.skips, skip{sn, err.Error()})
			continue
		}
		_, tunnelled := d.fdbs[mac]
		if _, direct := directMACs[mac]; tunnelled || direct {
			dups = append(dups, dupMAC{len(d.skips), mac})
			d.skips = append(d.skips, skip{Subnet: sn})
			continue
		}

		if w.direct && onNets(w.extNets, pub) {
			if directMACs == nil {
				directMACs = map[hwAddr]netip.Prefix{}
			}
			directMACs[mac] = sn
			d.routes = append(d.routes, nlbatch.Route{Dst: sn, Gw: pub, LinkIndex: w.ext})
			continue
		}
		gw := sn.Addr()
		d.neighs[gw] = w.neigh(gw, mac)
		d.fdbs[mac] = w.fdb(mac, pub)
		d.routes = append(d.routes, nlbatch.Route{Dst: sn, Gw: gw, LinkIndex: w.vtep, Onlink: true})
	}
	d.nameOwners(w, dups, directMACs)
}

// dupMAC is a lease skipped because an earlier one has its VtepMAC: the
// index of its skip and the MAC.
type dupMAC struct {
	skip int
	mac  hwAddr
}

// nameOwners writes the reason of each skip in dups, naming the lease that
// has the MAC: from directMACs, or the tunnelled route whose neighbour has
// it (one pass over the routes, and only when there are dups).
func (d *desired) nameOwners(w world, dups []dupMAC, directMACs map[hwAddr]netip.Prefix) {
	if len(dups) == 0 {
		return
	}
	owners := make(map[hwAddr]netip.Prefix, len(dups))
	for _, dm := range dups {
		owners[dm.mac] = directMACs[dm.mac]
	}
	for _, r := range d.routes {
		if n, ok := d.neighs[r.Gw]; ok && r.LinkIndex == w.vtep {
			if _, dup := owners[n.MAC]; dup {
				owners[n.MAC] = r.Dst
			}
		}
	}
	for _, dm := range dups {
		d.skips[dm.skip].Reason = fmt.Sprintf("VtepMAC %s is already used by the lease %s", dm.mac, owners[dm.mac])
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
