package vxlan

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/subnet"
)

// The IPv6 side of the lab: the hosts' eth0 also carry fd5e::1/64 and
// fd5e::2/64, and the overlay's IPv6Network is fc00:5::/48 with /64 leases.
var network6 = netip.MustParsePrefix("fc00:5::/48")

// newDualPair is newPair with an IPv6 underlay address on each eth0.
// Duplicate address detection is off in both namespaces and eth0 is set
// down and up again, so that its link-local address (neighbour discovery
// speaks from it) is usable at once rather than after a second or two.
func newDualPair(tb testing.TB) (a, b *host) {
	tb.Helper()
	a, b = newPair(tb)
	for i, x := range []*host{a, b} {
		out, err := x.ns.Command(context.Background(), "sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0",
			"net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf."+extName+".accept_dad=0").CombinedOutput()
		if err != nil {
			tb.Fatalf("%s: turning DAD off: %v\n%s", x.name, err, out)
		}
		l, err := x.h.LinkByName(extName)
		if err != nil {
			tb.Fatal(err)
		}
		must(tb, x.h.LinkSetDown(l))
		must(tb, x.h.LinkSetUp(l))
		x.addr6 = netip.MustParseAddr(fmt.Sprintf("fd5e::%d", i+1))
		addV6(tb, x, extName, netip.PrefixFrom(x.addr6, 64))
	}
	for _, x := range []*host{a, b} {
		waitNotTentative(tb, x, extName)
	}
	return a, b
}

// waitNotTentative waits (up to 10 s) until no IPv6 address of link name
// is tentative, so that neighbour discovery answers at once.
func waitNotTentative(tb testing.TB, x *host, name string) {
	tb.Helper()
	l, err := x.h.LinkByName(name)
	if err != nil {
		tb.Fatal(err)
	}
	for range 500 {
		addrs, err := x.h.AddrList(l, netlink.FAMILY_V6)
		if err != nil {
			tb.Fatal(err)
		}
		if !slices.ContainsFunc(addrs, func(a netlink.Addr) bool { return a.Flags&unix.IFA_F_TENTATIVE != 0 }) &&
			slices.ContainsFunc(addrs, func(a netlink.Addr) bool { return a.IP.IsLinkLocalUnicast() }) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	tb.Fatalf("%s: %s still has a tentative IPv6 address (or none link-local) after 10 s", x.name, name)
}

// addV6 gives link name of x the IPv6 address p, without DAD.
func addV6(tb testing.TB, x *host, name string, p netip.Prefix) {
	tb.Helper()
	l, err := x.h.LinkByName(name)
	if err != nil {
		tb.Fatalf("%s: finding %s: %v", x.name, name, err)
	}
	if err := x.h.AddrAdd(l, &netlink.Addr{IPNet: ip.HostNet(p.Addr(), p.Bits()), Flags: unix.IFA_F_NODAD}); err != nil {
		tb.Fatalf("%s: adding %s to %s: %v", x.name, p, name, err)
	}
}

// dualBackend builds a vxlan backend for x with EnableIPv6 (and EnableIPv4
// as given).
func (x *host) dualBackend(tb testing.TB, block string, v4 bool) *vxlanBackend {
	tb.Helper()
	logger := funcr.New(func(prefix, args string) {
		x.logs.add(args)
		tb.Logf("%s: %s", x.name, args)
	}, funcr.Options{Verbosity: 1})
	cfg := &subnet.Config{
		EnableIPv4: v4, EnableIPv6: true,
		IPv6Network: network6, IPv6SubnetLen: 64,
		BackendType: "vxlan", Backend: json.RawMessage(block),
	}
	ext := backend.ExternalInterface{Iface: x.ext, IfaceAddrV6: x.addr6, PublicIPv6: x.addr6}
	if v4 {
		cfg.Network, cfg.SubnetLen = network, 24
		ext.IfaceAddr, ext.PublicIP = x.addr, x.addr
	}
	be, err := backend.New("vxlan", backend.Options{Ext: ext, Config: cfg, Netlink: x.h, Logger: logger})
	if err != nil {
		tb.Fatalf("creating the backend: %v", err)
	}
	return be.(*vxlanBackend)
}

// initDual runs Init and returns the node's lease: sn4 (may be "") and sn6.
func (x *host) initDual(tb testing.TB, be *vxlanBackend, sn4, sn6 string) (subnet.Lease, backend.Publish) {
	tb.Helper()
	pub, err := be.Init(context.Background())
	if err != nil {
		tb.Fatalf("%s: Init: %v", x.name, err)
	}
	l := subnet.Lease{
		IPv6Subnet: netip.MustParsePrefix(sn6),
		Attrs: subnet.LeaseAttrs{PublicIPv6: x.addr6, BackendType: "vxlan",
			BackendData: pub.BackendData, BackendV6Data: pub.BackendV6Data},
	}
	if sn4 != "" {
		l.Subnet = netip.MustParsePrefix(sn4)
		l.Attrs.PublicIP = x.addr
	}
	return l, pub
}

// vtepMAC6 is the VtepMAC a lease publishes in BackendV6Data.
func vtepMAC6(tb testing.TB, l subnet.Lease) string {
	tb.Helper()
	var d backendData
	if err := json.Unmarshal(l.Attrs.BackendV6Data, &d); err != nil {
		tb.Fatalf("BackendV6Data %s: %v", l.Attrs.BackendV6Data, err)
	}
	return d.VtepMAC
}

// tunnelled6 is what a remote lease gets on flannel-v6.1, as state6 renders it.
func tunnelled6(t *testing.T, l subnet.Lease) []string {
	gw := l.IPv6Subnet.Addr()
	mac := vtepMAC6(t, l)
	return []string{
		fmt.Sprintf("neigh %s lladdr %s permanent", gw, mac),
		fmt.Sprintf("fdb %s self dst %s permanent", mac, l.Attrs.PublicIPv6),
		fmt.Sprintf("route %s via %s dev flannel-v6.1 onlink", l.IPv6Subnet, gw),
	}
}

// state6 renders, from netlink, what the IPv6 overlay owns in x's
// namespace: flannel-v6.1, its global addresses, its IPv6 neighbours
// (permanent ones and any inside IPv6Network), its fdb entries and the IPv6
// main-table routes into IPv6Network. One entry a line, sorted within each
// kind.
func (x *host) state6(tb testing.TB) string {
	tb.Helper()
	const dev = "flannel-v6.1"
	var out []string
	l, err := x.h.LinkByName(dev)
	if err != nil {
		tb.Fatalf("%s: finding %s: %v", x.name, dev, err)
	}
	v, ok := l.(*netlink.Vxlan)
	if !ok {
		tb.Fatalf("%s: %s is a %s link, not vxlan", x.name, dev, l.Type())
	}
	updown := "down"
	if v.Flags&net.FlagUp != 0 {
		updown = "up"
	}
	learning := "nolearning"
	if v.Learning {
		learning = "learning"
	}
	vtepDev := fmt.Sprint(v.VtepDevIndex)
	if v.VtepDevIndex == x.ext.Index {
		vtepDev = x.ext.Name
	}
	out = append(out, fmt.Sprintf("link %s vxlan id %d local %s dev %s dstport %d %s l2miss=%t l3miss=%t mtu %d %s",
		v.Name, v.VxlanId, v.SrcAddr, vtepDev, v.Port, learning, v.L2miss, v.L3miss, v.MTU, updown))

	addrs, err := x.h.AddrList(l, netlink.FAMILY_V6)
	if err != nil {
		tb.Fatalf("%s: listing addresses: %v", x.name, err)
	}
	var sec []string
	for _, a := range addrs {
		if !a.IP.IsLinkLocalUnicast() {
			sec = append(sec, "addr "+a.IPNet.String())
		}
	}
	out = append(out, sorted(sec)...)

	neighs, err := x.h.NeighList(v.Index, unix.AF_INET6)
	if err != nil {
		tb.Fatalf("%s: listing neighbours: %v", x.name, err)
	}
	sec = nil
	for _, n := range neighs {
		a, _ := ip.AddrFromIP(n.IP)
		if n.State&unix.NUD_PERMANENT != 0 || network6.Contains(a) {
			sec = append(sec, fmt.Sprintf("neigh %s lladdr %s %s", n.IP, n.HardwareAddr, nudName(n.State)))
		}
	}
	out = append(out, sorted(sec)...)

	fdbs, err := x.h.NeighList(v.Index, unix.AF_BRIDGE)
	if err != nil {
		tb.Fatalf("%s: listing fdb entries: %v", x.name, err)
	}
	sec = nil
	for _, n := range fdbs {
		self := ""
		if n.Flags&netlink.NTF_SELF != 0 {
			self = " self"
		}
		sec = append(sec, fmt.Sprintf("fdb %s%s dst %s %s", n.HardwareAddr, self, n.IP, nudName(n.State)))
	}
	out = append(out, sorted(sec)...)

	routes, err := x.h.RouteListFiltered(netlink.FAMILY_V6, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		tb.Fatalf("%s: listing routes: %v", x.name, err)
	}
	sec = nil
	for _, r := range routes {
		dst, ok := ip.PrefixFromIPNet(r.Dst)
		if !ok || !network6.Overlaps(dst) || (r.LinkIndex != v.Index && r.LinkIndex != x.ext.Index) {
			continue
		}
		s := fmt.Sprintf("route %s", dst)
		if r.Gw != nil {
			s += " via " + r.Gw.String()
		}
		switch r.LinkIndex {
		case v.Index:
			s += " dev " + v.Name
		case x.ext.Index:
			s += " dev " + x.ext.Name
		default:
			s += fmt.Sprintf(" dev %d", r.LinkIndex)
		}
		if r.Flags&int(netlink.FLAG_ONLINK) != 0 {
			s += " onlink"
		}
		sec = append(sec, s)
	}
	out = append(out, sorted(sec)...)
	return strings.Join(out, "\n")
}

// wantState6 is state6's text for host x with own IPv6 lease own and the
// given entry lines (in state6's order).
func wantState6(x *host, own string, lines ...string) string {
	p := netip.MustParsePrefix(own)
	head := []string{
		fmt.Sprintf("link flannel-v6.1 vxlan id 1 local %s dev %s dstport 8472 nolearning l2miss=false l3miss=false mtu 1430 up", x.addr6, extName),
		"addr " + p.Addr().String() + "/128",
	}
	// The kernel's own route for the /128 address sorts with the others.
	var routes []string
	var rest []string
	for _, s := range lines {
		if strings.HasPrefix(s, "route ") {
			routes = append(routes, s)
		} else {
			rest = append(rest, s)
		}
	}
	routes = append(routes, "route "+p.Addr().String()+"/128 dev flannel-v6.1")
	return strings.Join(append(append(head, rest...), sorted(routes)...), "\n")
}

func checkState6(tb testing.TB, x *host, want string) {
	tb.Helper()
	if got := x.state6(tb); got != want {
		tb.Errorf("%s IPv6 kernel state:\n%s\n\nwant:\n%s", x.name, got, want)
	}
}

// ping6 sends one IPv6 echo request inside x's namespace from src to dst.
func (x *host) ping6(tb testing.TB, src, dst string) error {
	tb.Helper()
	if _, err := exec.LookPath("ping"); err != nil {
		tb.Skip("skipping the ping: no ping binary (apt-get install iputils-ping)")
	}
	return x.pinger("ping", "-6", "-n", "-c1", "-W2", "-I", src, dst)
}

// peer6 is a made-up remote dual-stack vxlan node.
func peer6(sn, pub, mac, sn6, pub6, mac6 string) subnet.Lease {
	l := peer(sn, pub, mac)
	l.IPv6Subnet = netip.MustParsePrefix(sn6)
	l.Attrs.PublicIPv6 = netip.MustParseAddr(pub6)
	l.Attrs.BackendV6Data = []byte(`{"VtepMAC":"` + mac6 + `"}`)
	return l
}

func TestDualStackTunnel(t *testing.T) {
	a, b := newDualPair(t)
	ba, bb := a.dualBackend(t, `{"Type":"vxlan"}`, true), b.dualBackend(t, `{"Type":"vxlan"}`, true)
	la, pubA := a.initDual(t, ba, "10.5.1.0/24", "fc00:5:0:1::/64")
	lb, _ := b.initDual(t, bb, "10.5.2.0/24", "fc00:5:0:2::/64")

	if pubA.MTU != 1430 {
		t.Errorf("published MTU %d, want 1500-70 (the smaller of the two devices)", pubA.MTU)
	}
	for dev, data := range map[string]json.RawMessage{"flannel.1": pubA.BackendData, "flannel-v6.1": pubA.BackendV6Data} {
		l, err := a.h.LinkByName(dev)
		if err != nil {
			t.Fatal(err)
		}
		if want := `{"VNI":1,"VtepMAC":"` + l.Attrs().HardwareAddr.String() + `"}`; string(data) != want {
			t.Errorf("%s: published %s, want %s", dev, data, want)
		}
	}
	if vtepMAC(t, la) == vtepMAC6(t, la) {
		t.Errorf("both devices have MAC %s", vtepMAC(t, la))
	}

	apply(t, ba, la, lb)
	apply(t, bb, lb, la)
	checkState(t, a, wantState(a, "10.5.1.0/32", tunnelled(t, lb)...))
	checkState6(t, a, wantState6(a, "fc00:5:0:1::/64", tunnelled6(t, lb)...))
	checkState6(t, b, wantState6(b, "fc00:5:0:2::/64", tunnelled6(t, la)...))

	// Idempotent: nothing changes on a second Apply.
	before := a.state6(t)
	apply(t, ba, la, lb)
	if ba.last != (stats{}) || ba.v6.last != (stats{}) {
		t.Errorf("second Apply changed IPv4 %+v, IPv6 %+v; want nothing", ba.last, ba.v6.last)
	}
	if after := a.state6(t); after != before {
		t.Errorf("second Apply changed the kernel:\n%s\n\nwas:\n%s", after, before)
	}

	// Both families cross their tunnels.
	a.addBridge(t, "10.5.1.1/24")
	b.addBridge(t, "10.5.2.1/24")
	addV6(t, a, "cni0", netip.MustParsePrefix("fc00:5:0:1::1/64"))
	addV6(t, b, "cni0", netip.MustParsePrefix("fc00:5:0:2::1/64"))
	if err := a.ping(t, "10.5.1.1", "10.5.2.1"); err != nil {
		t.Fatal(err)
	}
	rxA, rxB := a.rxPackets(t, "flannel-v6.1"), b.rxPackets(t, "flannel-v6.1")
	if err := a.ping6(t, "fc00:5:0:1::1", "fc00:5:0:2::1"); err != nil {
		t.Fatal(err)
	}
	if b.rxPackets(t, "flannel-v6.1") <= rxB || a.rxPackets(t, "flannel-v6.1") <= rxA {
		t.Error("the IPv6 ping worked but did not cross flannel-v6.1 both ways")
	}
	if err := b.ping6(t, "fc00:5:0:2::1", "fc00:5:0:1::1"); err != nil {
		t.Fatal(err)
	}

	// Entries deleted by hand come back on the next Apply.
	dev, err := a.h.LinkByName("flannel-v6.1")
	if err != nil {
		t.Fatal(err)
	}
	idx := dev.Attrs().Index
	gw := lb.IPv6Subnet.Addr()
	must(t, a.h.RouteDel(&netlink.Route{LinkIndex: idx, Dst: ip.IPNet(lb.IPv6Subnet), Gw: ip.IP(gw)}))
	must(t, a.h.NeighDel(&netlink.Neigh{LinkIndex: idx, Family: unix.AF_INET6, IP: ip.IP(gw)}))
	must(t, a.h.NeighDel(&netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF,
		IP: ip.IP(b.addr6), HardwareAddr: mustMAC(vtepMAC6(t, lb))}))
	if got := a.state6(t); got == before {
		t.Fatal("deleting the entries by hand changed nothing")
	}
	apply(t, ba, la, lb)
	if want := (backend.Changes{Added: 1}); ba.v6.last.Neigh != want || ba.v6.last.FDB != want || ba.v6.last.Route != want {
		t.Errorf("restoring changed %+v, want one add of each kind", ba.v6.last)
	}
	checkState6(t, a, before)
	if err := a.ping6(t, "fc00:5:0:1::1", "fc00:5:0:2::1"); err != nil {
		t.Fatal(err)
	}

	// A lease that goes away takes its entries of both families along.
	apply(t, ba, la)
	checkState(t, a, wantState(a, "10.5.1.0/32"))
	checkState6(t, a, wantState6(a, "fc00:5:0:1::/64"))
	apply(t, ba, la)
	if ba.last != (stats{}) || ba.v6.last != (stats{}) {
		t.Errorf("empty re-Apply changed IPv4 %+v, IPv6 %+v", ba.last, ba.v6.last)
	}
}

func TestIPv6OnlyTunnel(t *testing.T) {
	a, b := newDualPair(t)
	ba, bb := a.dualBackend(t, `{"Type":"vxlan"}`, false), b.dualBackend(t, `{"Type":"vxlan"}`, false)
	la, pub := a.initDual(t, ba, "", "fc00:5:0:1::/64")
	lb, _ := b.initDual(t, bb, "", "fc00:5:0:2::/64")
	if pub.BackendData != nil || pub.BackendV6Data == nil || pub.MTU != 1430 {
		t.Errorf("published %+v, want only BackendV6Data and MTU 1430", pub)
	}
	if _, err := a.h.LinkByName("flannel.1"); err == nil {
		t.Error("flannel.1 exists in an IPv6-only overlay")
	}
	c := peer6("10.5.3.0/24", "10.250.9.3", "0e:00:00:00:00:03", "fc00:5:0:3::/64", "fd5e::3", "0e:00:00:00:06:03")
	apply(t, ba, la, lb, c)
	apply(t, bb, lb, la)
	checkState6(t, a, wantState6(a, "fc00:5:0:1::/64", kinds(append(tunnelled6(t, lb), tunnelled6(t, c)...)...)...))
	routes4, err := a.h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Dst: ip.IPNet(c.Subnet)}, netlink.RT_FILTER_DST)
	if err != nil || len(routes4) != 0 {
		t.Errorf("IPv4 routes for %s in an IPv6-only overlay: %v %v", c.Subnet, routes4, err)
	}
	apply(t, ba, la, lb, c)
	if ba.v6.last != (stats{}) {
		t.Errorf("second Apply changed %+v", ba.v6.last)
	}

	addV6(t, a, "lo", netip.MustParsePrefix("fc00:5:0:1::1/128"))
	addV6(t, b, "lo", netip.MustParsePrefix("fc00:5:0:2::1/128"))
	if err := a.ping6(t, "fc00:5:0:1::1", "fc00:5:0:2::1"); err != nil {
		t.Fatal(err)
	}

	apply(t, ba, la, c)
	checkState6(t, a, wantState6(a, "fc00:5:0:1::/64", tunnelled6(t, c)...))
	if want := (backend.Changes{Removed: 1}); ba.v6.last.Neigh != want || ba.v6.last.FDB != want || ba.v6.last.Route != want {
		t.Errorf("removing one lease changed %+v, want one removal of each kind", ba.v6.last)
	}
}

func TestIPv6LeasesWithoutIPv6DataAreSkipped(t *testing.T) {
	a, _ := newDualPair(t)
	ba := a.dualBackend(t, `{"Type":"vxlan"}`, true)
	la, _ := a.initDual(t, ba, "10.5.1.0/24", "fc00:5:0:1::/64")
	v4only := peer("10.5.3.0/24", "10.250.9.3", "0e:00:00:00:00:03")
	noData := peer6("10.5.4.0/24", "10.250.9.4", "0e:00:00:00:00:04", "fc00:5:0:4::/64", "fd5e::4", "0e:00:00:00:06:04")
	noData.Attrs.BackendV6Data = nil
	badMAC := peer6("10.5.5.0/24", "10.250.9.5", "0e:00:00:00:00:05", "fc00:5:0:5::/64", "fd5e::5", "ff:ff:ff:ff:ff:ff")
	good := peer6("10.5.8.0/24", "10.250.9.8", "0e:00:00:00:00:08", "fc00:5:0:8::/64", "fd5e::8", "0e:00:00:00:06:08")
	leases := []subnet.Lease{v4only, noData, badMAC, good}
	for range 2 {
		apply(t, ba, la, leases...)
	}
	// Every lease keeps its IPv4 entries.
	var all4 []string
	for _, l := range leases {
		all4 = append(all4, tunnelled(t, l)...)
	}
	checkState(t, a, wantState(a, "10.5.1.0/32", kinds(all4...)...))
	checkState6(t, a, wantState6(a, "fc00:5:0:1::/64", tunnelled6(t, good)...))
	// An IPv4-only lease is not a fault: its IPv4 entries are there, and
	// nothing is logged for it.
	if n := a.logs.count(`"subnet"="10.5.3.0/24"`); n != 0 {
		t.Errorf("the IPv4-only lease logged %d times", n)
	}
	for _, reason := range []string{
		"BackendV6Data is missing",
		"VtepMAC \\\"ff:ff:ff:ff:ff:ff\\\" is unusable",
	} {
		if n := a.logs.count(reason); n != 1 {
			t.Errorf("logged %q %d times over two Applies, want once", reason, n)
		}
	}
}

func TestIPv6DirectRouting(t *testing.T) {
	a, b := newDualPair(t)
	block := `{"Type":"vxlan","DirectRouting":true}`
	ba, bb := a.dualBackend(t, block, true), b.dualBackend(t, block, true)
	la, _ := a.initDual(t, ba, "10.5.1.0/24", "fc00:5:0:1::/64")
	lb, _ := b.initDual(t, bb, "10.5.2.0/24", "fc00:5:0:2::/64")
	far := peer6("10.5.3.0/24", "172.16.0.3", "0e:00:00:00:00:03", "fc00:5:0:3::/64", "fd99::3", "0e:00:00:00:06:03")
	apply(t, ba, la, lb, far)
	apply(t, bb, lb, la)
	checkState6(t, a, wantState6(a, "fc00:5:0:1::/64", kinds(append(tunnelled6(t, far),
		"route fc00:5:0:2::/64 via fd5e::2 dev eth0")...)...))

	addV6(t, a, "lo", netip.MustParsePrefix("fc00:5:0:1::1/128"))
	addV6(t, b, "lo", netip.MustParsePrefix("fc00:5:0:2::1/128"))
	rx := b.rxPackets(t, "flannel-v6.1")
	if err := a.ping6(t, "fc00:5:0:1::1", "fc00:5:0:2::1"); err != nil {
		t.Fatal(err)
	}
	if b.rxPackets(t, "flannel-v6.1") != rx {
		t.Error("the IPv6 ping crossed flannel-v6.1 although DirectRouting routes it plainly")
	}

	// Turning DirectRouting off tunnels the neighbour again.
	ba2 := a.dualBackend(t, `{"Type":"vxlan"}`, true)
	la2, _ := a.initDual(t, ba2, "10.5.1.0/24", "fc00:5:0:1::/64")
	apply(t, ba2, la2, lb, far)
	checkState6(t, a, wantState6(a, "fc00:5:0:1::/64", kinds(append(tunnelled6(t, lb), tunnelled6(t, far)...)...)...))
}

func TestIPv6PartialFailureRollsBackTheLease(t *testing.T) {
	a, b := newDualPair(t)
	ba := a.dualBackend(t, `{"Type":"vxlan"}`, true)
	bb := b.dualBackend(t, `{"Type":"vxlan"}`, true)
	la, _ := a.initDual(t, ba, "10.5.1.0/24", "fc00:5:0:1::/64")
	lb, _ := b.initDual(t, bb, "10.5.2.0/24", "fc00:5:0:2::/64")
	real := ba.nl
	fault := &faultyKernel{kernel: real, failRoute: lb.IPv6Subnet}
	ba.useKernel(fault)
	if err := ba.Apply(context.Background(), la, []subnet.Lease{lb}); !errors.Is(err, errInjected) {
		t.Fatalf("Apply = %v, want the injected failure", err)
	}
	if ba.v6.last.RolledBack != 1 || ba.last.RolledBack != 0 {
		t.Errorf("rolled back IPv4 %d, IPv6 %d leases; want 0 and 1", ba.last.RolledBack, ba.v6.last.RolledBack)
	}
	// The IPv4 overlay is complete; the IPv6 one holds nothing of the lease.
	checkState(t, a, wantState(a, "10.5.1.0/32", tunnelled(t, lb)...))
	checkState6(t, a, wantState6(a, "fc00:5:0:1::/64"))

	ba.useKernel(real)
	apply(t, ba, la, lb)
	checkState6(t, a, wantState6(a, "fc00:5:0:1::/64", tunnelled6(t, lb)...))
}

func TestIPv6ConfigErrors(t *testing.T) {
	needRoot(t)
	a, _ := newPair(t) // no IPv6 address on eth0
	cfg := &subnet.Config{EnableIPv4: true, EnableIPv6: true, Network: network, SubnetLen: 24,
		IPv6Network: network6, IPv6SubnetLen: 64, BackendType: "vxlan"}
	_, err := backend.New("vxlan", backend.Options{
		Ext:    backend.ExternalInterface{Iface: a.ext, IfaceAddr: a.addr, PublicIP: a.addr},
		Config: cfg, Netlink: a.h,
	})
	if err == nil || !strings.Contains(err.Error(), "has no global IPv6 address") || !strings.Contains(err.Error(), "give eth0 a global IPv6 address") {
		t.Errorf("New without an IPv6 address = %v, want the missing address named", err)
	}
	// The interface choice's reason, when known, is the remedy given.
	const why = "interface eth0 has no global IPv6 address; the IPv6 default route is on eth1: choose one interface for both families with --iface"
	_, err = backend.New("vxlan", backend.Options{
		Ext:    backend.ExternalInterface{Iface: a.ext, IfaceAddr: a.addr, PublicIP: a.addr, NoIPv6: why},
		Config: cfg, Netlink: a.h,
	})
	if err == nil || !strings.Contains(err.Error(), why) || strings.Contains(err.Error(), "\n") {
		t.Errorf("New = %v, want one line with %q", err, why)
	}
}

// TestDualStackRestartKeepsDevices: a new backend on the same host (a
// restarted daemon) adopts both devices with their MACs and, given the same
// leases, changes nothing; a v6 device changed by hand is replaced with its
// MAC kept.
func TestDualStackRestartKeepsDevices(t *testing.T) {
	a, b := newDualPair(t)
	ba, bb := a.dualBackend(t, `{"Type":"vxlan"}`, true), b.dualBackend(t, `{"Type":"vxlan"}`, true)
	la, pub := a.initDual(t, ba, "10.5.1.0/24", "fc00:5:0:1::/64")
	lb, _ := b.initDual(t, bb, "10.5.2.0/24", "fc00:5:0:2::/64")
	apply(t, ba, la, lb)
	before4, before6 := a.state(t, "flannel.1"), a.state6(t)
	idx := func(name string) int {
		l, err := a.h.LinkByName(name)
		if err != nil {
			t.Fatal(err)
		}
		return l.Attrs().Index
	}
	i4, i6 := idx("flannel.1"), idx("flannel-v6.1")
	must(t, ba.Close())

	again := a.dualBackend(t, `{"Type":"vxlan"}`, true)
	la2, pub2 := a.initDual(t, again, "10.5.1.0/24", "fc00:5:0:1::/64")
	if string(pub2.BackendData) != string(pub.BackendData) || string(pub2.BackendV6Data) != string(pub.BackendV6Data) {
		t.Errorf("re-Init published %s / %s, want %s / %s", pub2.BackendData, pub2.BackendV6Data, pub.BackendData, pub.BackendV6Data)
	}
	if idx("flannel.1") != i4 || idx("flannel-v6.1") != i6 {
		t.Error("re-Init recreated a device")
	}
	apply(t, again, la2, lb)
	if again.last != (stats{}) || again.v6.last != (stats{}) {
		t.Errorf("first Apply after a restart changed IPv4 %+v, IPv6 %+v", again.last, again.v6.last)
	}
	if a.state(t, "flannel.1") != before4 || a.state6(t) != before6 {
		t.Error("the restart changed the kernel")
	}

	// A v6 device with the wrong local address is replaced, keeping its MAC.
	dev, err := a.h.LinkByName("flannel-v6.1")
	if err != nil {
		t.Fatal(err)
	}
	must(t, a.h.LinkDel(dev))
	wrong := &netlink.Vxlan{LinkAttrs: netlink.LinkAttrs{Name: "flannel-v6.1", HardwareAddr: dev.Attrs().HardwareAddr},
		VxlanId: 1, VtepDevIndex: a.ext.Index, SrcAddr: net.ParseIP("fd5e::99"), Port: kernelPort}
	must(t, a.h.LinkAdd(wrong))
	apply(t, again, la2, lb)
	checkState6(t, a, before6)
	if n := a.logs.count("did not match"); n != 1 {
		t.Errorf("%d log lines about a replaced device, want 1", n)
	}
}
