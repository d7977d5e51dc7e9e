package vxlan

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/pkg/nlbatch"
	"github.com/flanneld-go/flanneld/subnet"
)

// lab is two initialised nodes with their leases 10.5.1.0/24 (a) and
// 10.5.2.0/24 (b).
type lab struct {
	a, b   *host
	ba, bb *vxlanBackend
	la, lb subnet.Lease
}

func newLab(t *testing.T, block string) *lab {
	t.Helper()
	l := &lab{}
	l.a, l.b = newPair(t)
	l.ba, l.bb = l.a.backend(t, block), l.b.backend(t, block)
	l.la = l.a.initLease(t, l.ba, "10.5.1.0/24")
	l.lb = l.b.initLease(t, l.bb, "10.5.2.0/24")
	return l
}

// peer is a made-up remote vxlan node (nothing answers at its address).
func peer(sn, pub, mac string) subnet.Lease {
	return subnet.Lease{
		Subnet: netip.MustParsePrefix(sn),
		Attrs: subnet.LeaseAttrs{PublicIP: netip.MustParseAddr(pub), BackendType: "vxlan",
			BackendData: []byte(`{"VtepMAC":"` + mac + `"}`)},
	}
}

// tunnelled is the three entries WIRE.md gives a remote lease, as state()
// renders them.
func tunnelled(t *testing.T, l subnet.Lease) []string {
	gw := l.Subnet.Addr()
	mac := vtepMAC(t, l)
	return []string{
		fmt.Sprintf("neigh %s lladdr %s permanent", gw, mac),
		fmt.Sprintf("fdb %s self dst %s permanent", mac, l.Attrs.PublicIP),
		fmt.Sprintf("route %s via %s dev flannel.1 onlink", l.Subnet, gw),
	}
}

// kinds orders lines the way state() does: neighbours, fdb, routes, each
// sorted.
func kinds(lines ...string) []string {
	var out []string
	for _, prefix := range []string{"neigh ", "fdb ", "route "} {
		var sec []string
		for _, s := range lines {
			if strings.HasPrefix(s, prefix) {
				sec = append(sec, s)
			}
		}
		out = append(out, sorted(sec)...)
	}
	return out
}

func TestTunnelBetweenTwoNodes(t *testing.T) {
	l := newLab(t, `{"Type":"vxlan"}`)

	for _, x := range []struct {
		h   *host
		be  *vxlanBackend
		own subnet.Lease
	}{{l.a, l.ba, l.la}, {l.b, l.bb, l.lb}} {
		dev, err := x.h.h.LinkByName("flannel.1")
		if err != nil {
			t.Fatal(err)
		}
		if want := `{"VNI":1,"VtepMAC":"` + dev.Attrs().HardwareAddr.String() + `"}`; string(x.own.Attrs.BackendData) != want {
			t.Errorf("%s published BackendData %s, want %s", x.h.name, x.own.Attrs.BackendData, want)
		}
		if dev.Attrs().HardwareAddr[0]&3 != 2 {
			t.Errorf("%s VTEP MAC %s is not a locally administered unicast address", x.h.name, dev.Attrs().HardwareAddr)
		}
	}
	pub, err := l.ba.Init(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if pub.MTU != 1450 {
		t.Errorf("published MTU %d, want 1500-50", pub.MTU)
	}

	apply(t, l.ba, l.la, l.lb)
	apply(t, l.bb, l.lb, l.la)
	checkState(t, l.a, wantState(l.a, "10.5.1.0/32", tunnelled(t, l.lb)...))
	checkState(t, l.b, wantState(l.b, "10.5.2.0/32", tunnelled(t, l.la)...))

	// Applying the same leases again changes nothing.
	before := l.a.state(t, "flannel.1")
	apply(t, l.ba, l.la, l.lb)
	if l.ba.last != (stats{}) {
		t.Errorf("second Apply changed %+v, want nothing", l.ba.last)
	}
	if after := l.a.state(t, "flannel.1"); after != before {
		t.Errorf("second Apply changed the kernel:\n%s\n\nwas:\n%s", after, before)
	}

	// Traffic between the container bridges crosses the tunnel.
	l.a.addBridge(t, "10.5.1.1/24")
	l.b.addBridge(t, "10.5.2.1/24")
	rxA, rxB := l.a.rxPackets(t, "flannel.1"), l.b.rxPackets(t, "flannel.1")
	if err := l.a.ping(t, "10.5.1.1", "10.5.2.1"); err != nil {
		t.Fatal(err)
	}
	if l.b.rxPackets(t, "flannel.1") <= rxB || l.a.rxPackets(t, "flannel.1") <= rxA {
		t.Errorf("the ping worked but did not cross flannel.1 both ways (rx a %d→%d, b %d→%d)",
			rxA, l.a.rxPackets(t, "flannel.1"), rxB, l.b.rxPackets(t, "flannel.1"))
	}
	if err := l.b.ping(t, "10.5.2.1", "10.5.1.1"); err != nil {
		t.Fatal(err)
	}
}

func TestCustomVNIPortAndGBP(t *testing.T) {
	l := newLab(t, `{"Type":"vxlan","VNI":4242,"Port":4789,"GBP":true}`)
	apply(t, l.ba, l.la, l.lb)
	apply(t, l.bb, l.lb, l.la)
	macB := vtepMAC(t, l.lb)
	want := strings.Join([]string{
		"link flannel.4242 vxlan id 4242 local 10.250.9.1 dev eth0 dstport 4789 nolearning gbp=true l2miss=false l3miss=false mtu 1450 up",
		"addr 10.5.1.0/32",
		"neigh 10.5.2.0 lladdr " + macB + " permanent",
		"fdb " + macB + " self dst 10.250.9.2 permanent",
		"route 10.5.2.0/24 via 10.5.2.0 dev flannel.4242 onlink",
	}, "\n")
	if got := l.a.state(t, "flannel.4242"); got != want {
		t.Errorf("kernel state:\n%s\n\nwant:\n%s", got, want)
	}
	if _, err := l.a.h.LinkByName("flannel.1"); err == nil {
		t.Error("flannel.1 exists too")
	}
	l.a.addBridge(t, "10.5.1.1/24")
	l.b.addBridge(t, "10.5.2.1/24")
	rx := l.b.rxPackets(t, "flannel.4242")
	if err := l.a.ping(t, "10.5.1.1", "10.5.2.1"); err != nil {
		t.Fatal(err)
	}
	if l.b.rxPackets(t, "flannel.4242") <= rx {
		t.Error("the ping did not cross flannel.4242")
	}
}

func TestReinitKeepsDeviceAndMAC(t *testing.T) {
	l := newLab(t, `{"Type":"vxlan"}`)
	apply(t, l.ba, l.la, l.lb)
	dev, err := l.a.h.LinkByName("flannel.1")
	if err != nil {
		t.Fatal(err)
	}
	before := l.a.state(t, "flannel.1")

	// A restarted daemon: a new backend on the same device.
	if err := l.ba.Close(); err != nil {
		t.Fatal(err)
	}
	if err := l.ba.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := l.ba.Apply(context.Background(), l.la, nil); !errors.Is(err, ErrClosed) {
		t.Errorf("Apply after Close = %v, want ErrClosed", err)
	}
	again := l.a.backend(t, `{"Type":"vxlan"}`)
	la2 := l.a.initLease(t, again, "10.5.1.0/24")
	if string(la2.Attrs.BackendData) != string(l.la.Attrs.BackendData) {
		t.Errorf("re-Init published %s, want the same %s", la2.Attrs.BackendData, l.la.Attrs.BackendData)
	}
	dev2, err := l.a.h.LinkByName("flannel.1")
	if err != nil {
		t.Fatal(err)
	}
	if dev2.Attrs().Index != dev.Attrs().Index {
		t.Errorf("re-Init recreated the device (index %d → %d)", dev.Attrs().Index, dev2.Attrs().Index)
	}
	if after := l.a.state(t, "flannel.1"); after != before {
		t.Errorf("re-Init changed the kernel:\n%s\n\nwas:\n%s", after, before)
	}
	apply(t, again, la2, l.lb)
	if again.last != (stats{}) {
		t.Errorf("first Apply after a restart changed %+v, want nothing", again.last)
	}
}

func TestMismatchedDeviceReplacedWithSameMAC(t *testing.T) {
	needRoot(t)
	const oldMAC = "0e:aa:bb:cc:dd:01"
	tests := []struct {
		name string
		link func(h *host) netlink.Link
	}{
		{"wrong VNI", func(h *host) netlink.Link { return vxlanLink(h, func(v *netlink.Vxlan) { v.VxlanId = 2 }) }},
		{"wrong port", func(h *host) netlink.Link { return vxlanLink(h, func(v *netlink.Vxlan) { v.Port = 4789 }) }},
		{"learning on", func(h *host) netlink.Link { return vxlanLink(h, func(v *netlink.Vxlan) { v.Learning = true }) }},
		{"l2miss and l3miss", func(h *host) netlink.Link {
			return vxlanLink(h, func(v *netlink.Vxlan) { v.L2miss, v.L3miss = true, true })
		}},
		{"GBP on", func(h *host) netlink.Link { return vxlanLink(h, func(v *netlink.Vxlan) { v.GBP = true }) }},
		{"wrong local", func(h *host) netlink.Link {
			return vxlanLink(h, func(v *netlink.Vxlan) { v.SrcAddr = net.IPv4(10, 250, 9, 99) })
		}},
		{"no underlying device", func(h *host) netlink.Link { return vxlanLink(h, func(v *netlink.Vxlan) { v.VtepDevIndex = 0 }) }},
		{"not vxlan", func(h *host) netlink.Link {
			return &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "flannel.1", HardwareAddr: mustMAC(oldMAC)}}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, _ := newPair(t)
			if err := a.h.LinkAdd(tt.link(a)); err != nil {
				t.Fatalf("creating the wrong device: %v", err)
			}
			be := a.backend(t, `{"Type":"vxlan"}`)
			own := a.initLease(t, be, "10.5.1.0/24")
			if got := vtepMAC(t, own); got != oldMAC {
				t.Errorf("published VtepMAC %s, want the old device's %s", got, oldMAC)
			}
			apply(t, be, own)
			checkState(t, a, wantState(a, "10.5.1.0/32"))
			if a.logs.count("did not match") != 1 {
				t.Errorf("want one log line about the replaced device, got %d", a.logs.count("did not match"))
			}
		})
	}
}

func vxlanLink(h *host, change func(*netlink.Vxlan)) *netlink.Vxlan {
	v := &netlink.Vxlan{
		LinkAttrs:    netlink.LinkAttrs{Name: "flannel.1", HardwareAddr: mustMAC("0e:aa:bb:cc:dd:01")},
		VxlanId:      1,
		VtepDevIndex: h.ext.Index,
		SrcAddr:      ip.IP(h.addr),
		Port:         kernelPort,
	}
	change(v)
	return v
}

func mustMAC(s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

func TestDeviceDeletedByHandIsRecreatedWithSameMAC(t *testing.T) {
	l := newLab(t, `{"Type":"vxlan"}`)
	apply(t, l.ba, l.la, l.lb)
	want := l.a.state(t, "flannel.1")
	dev, err := l.a.h.LinkByName("flannel.1")
	if err != nil {
		t.Fatal(err)
	}
	if err := l.a.h.LinkDel(dev); err != nil {
		t.Fatal(err)
	}
	apply(t, l.ba, l.la, l.lb)
	checkState(t, l.a, want)

	// A MAC changed by hand is put back: peers hold the published one.
	dev, err = l.a.h.LinkByName("flannel.1")
	if err != nil {
		t.Fatal(err)
	}
	if err := l.a.h.LinkSetHardwareAddr(dev, mustMAC("0e:12:34:56:78:9a")); err != nil {
		t.Fatal(err)
	}
	apply(t, l.ba, l.la, l.lb)
	dev, err = l.a.h.LinkByName("flannel.1")
	if err != nil {
		t.Fatal(err)
	}
	if got := dev.Attrs().HardwareAddr.String(); got != vtepMAC(t, l.la) {
		t.Errorf("device MAC %s, want the published %s", got, vtepMAC(t, l.la))
	}
}

func TestLeaseRemovedAndReadded(t *testing.T) {
	l := newLab(t, `{"Type":"vxlan"}`)
	c := peer("10.5.3.0/24", "10.250.9.3", "0e:00:00:00:00:03")
	d := peer("10.5.4.0/24", "172.16.0.4", "0e:00:00:00:00:04")

	apply(t, l.ba, l.la, l.lb, c, d)
	all := append(append(tunnelled(t, l.lb), tunnelled(t, c)...), tunnelled(t, d)...)
	checkState(t, l.a, wantState(l.a, "10.5.1.0/32", kinds(all...)...))

	apply(t, l.ba, l.la, l.lb, d)
	checkState(t, l.a, wantState(l.a, "10.5.1.0/32", kinds(append(tunnelled(t, l.lb), tunnelled(t, d)...)...)...))
	if want := (backend.Changes{Removed: 1}); l.ba.last.Neigh != want || l.ba.last.FDB != want || l.ba.last.Route != want {
		t.Errorf("removing one lease changed %+v, want one removal of each kind", l.ba.last)
	}

	apply(t, l.ba, l.la)
	checkState(t, l.a, wantState(l.a, "10.5.1.0/32"))
	apply(t, l.ba, l.la) // removing nothing twice is fine
	if l.ba.last != (stats{}) {
		t.Errorf("empty re-Apply changed %+v", l.ba.last)
	}

	apply(t, l.ba, l.la, c)
	checkState(t, l.a, wantState(l.a, "10.5.1.0/32", tunnelled(t, c)...))
}

func TestEntriesDeletedOrChangedByHandAreRestored(t *testing.T) {
	l := newLab(t, `{"Type":"vxlan"}`)
	c := peer("10.5.3.0/24", "10.250.9.3", "0e:00:00:00:00:03")
	apply(t, l.ba, l.la, l.lb, c)
	want := l.a.state(t, "flannel.1")
	h := l.a.h
	dev, err := h.LinkByName("flannel.1")
	if err != nil {
		t.Fatal(err)
	}
	idx := dev.Attrs().Index
	macB := mustMAC(vtepMAC(t, l.lb))

	// b's entries deleted, c's changed.
	must(t, h.NeighDel(&netlink.Neigh{LinkIndex: idx, Family: unix.AF_INET, IP: net.IPv4(10, 5, 2, 0)}))
	must(t, h.NeighDel(&netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF, HardwareAddr: macB, IP: net.IPv4(10, 250, 9, 2)}))
	must(t, h.RouteDel(&netlink.Route{LinkIndex: idx, Dst: ip.IPNet(l.lb.Subnet), Gw: net.IPv4(10, 5, 2, 0)}))
	must(t, h.NeighSet(&netlink.Neigh{LinkIndex: idx, Family: unix.AF_INET, State: unix.NUD_REACHABLE, IP: net.IPv4(10, 5, 3, 0), HardwareAddr: mustMAC("0e:99:99:99:99:99")}))
	must(t, h.NeighSet(&netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF, State: unix.NUD_PERMANENT, HardwareAddr: mustMAC("0e:00:00:00:00:03"), IP: net.IPv4(10, 250, 9, 99)}))
	must(t, h.RouteReplace(&netlink.Route{LinkIndex: idx, Dst: ip.IPNet(c.Subnet), Gw: net.IPv4(10, 5, 3, 9), Flags: int(netlink.FLAG_ONLINK)}))
	// A flood list: two remotes of the all-zeros MAC (only it and multicast
	// MACs can have several).
	for _, dst := range []net.IP{net.IPv4(10, 250, 9, 98), net.IPv4(10, 250, 9, 97)} {
		must(t, h.NeighAppend(&netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF, State: unix.NUD_PERMANENT, HardwareAddr: make(net.HardwareAddr, 6), IP: dst}))
	}
	if edited := l.a.state(t, "flannel.1"); !strings.Contains(edited, "dst 10.250.9.97") || !strings.Contains(edited, "dst 10.250.9.98") {
		t.Fatalf("the hand edits did not take:\n%s", edited)
	}

	apply(t, l.ba, l.la, l.lb, c)
	checkState(t, l.a, want)
	got := l.ba.last
	if got.Neigh != (backend.Changes{Added: 1, Updated: 1}) || got.Route != (backend.Changes{Added: 1, Updated: 1}) ||
		got.FDB != (backend.Changes{Added: 1, Updated: 1, Removed: 2}) {
		t.Errorf("restoring changed %+v", got)
	}
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestVtepMACChangeUpdatesEntries(t *testing.T) {
	l := newLab(t, `{"Type":"vxlan"}`)
	c1 := peer("10.5.3.0/24", "10.250.9.3", "0e:00:00:00:00:03")
	c2 := peer("10.5.3.0/24", "10.250.9.3", "0e:00:00:00:00:33")
	apply(t, l.ba, l.la, l.lb, c1)
	checkState(t, l.a, wantState(l.a, "10.5.1.0/32", kinds(append(tunnelled(t, l.lb), tunnelled(t, c1)...)...)...))
	apply(t, l.ba, l.la, l.lb, c2)
	checkState(t, l.a, wantState(l.a, "10.5.1.0/32", kinds(append(tunnelled(t, l.lb), tunnelled(t, c2)...)...)...))
	got := l.ba.last
	if got.Neigh != (backend.Changes{Updated: 1}) || got.FDB != (backend.Changes{Added: 1, Removed: 1}) || got.Route.Any() {
		t.Errorf("MAC change did %+v, want neigh updated, fdb added+removed, route untouched", got)
	}

	// A moved node (new PublicIP, same MAC) updates its fdb entry in place.
	c3 := peer("10.5.3.0/24", "10.250.9.4", "0e:00:00:00:00:33")
	apply(t, l.ba, l.la, l.lb, c3)
	checkState(t, l.a, wantState(l.a, "10.5.1.0/32", kinds(append(tunnelled(t, l.lb), tunnelled(t, c3)...)...)...))
}

func TestOwnLeaseChangeMovesTheAddress(t *testing.T) {
	l := newLab(t, `{"Type":"vxlan"}`)
	apply(t, l.ba, l.la, l.lb)
	moved := l.la
	moved.Subnet = netip.MustParsePrefix("10.5.9.0/24")
	apply(t, l.ba, moved, l.lb)
	checkState(t, l.a, wantState(l.a, "10.5.9.0/32", tunnelled(t, l.lb)...))

	// A lease that now overlaps the own subnet is not routed.
	clash := peer("10.5.9.0/24", "10.250.9.7", "0e:00:00:00:00:07")
	apply(t, l.ba, moved, l.lb, clash)
	checkState(t, l.a, wantState(l.a, "10.5.9.0/32", tunnelled(t, l.lb)...))
	if err := l.ba.Apply(context.Background(), subnet.Lease{Subnet: netip.MustParsePrefix("10.6.1.0/24")}, nil); err == nil {
		t.Error("Apply with an own lease outside Network succeeded")
	}
}

func TestUnusableLeasesSkippedAndLoggedOnce(t *testing.T) {
	l := newLab(t, `{"Type":"vxlan"}`)
	hostgw := subnet.Lease{Subnet: netip.MustParsePrefix("10.5.4.0/24"),
		Attrs: subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("10.250.9.4"), BackendType: "host-gw"}}
	garbage := peer("10.5.5.0/24", "10.250.9.5", "not-a-mac")
	missing := subnet.Lease{Subnet: netip.MustParsePrefix("10.5.6.0/24"),
		Attrs: subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("10.250.9.6"), BackendType: "vxlan"}}

	for range 3 {
		apply(t, l.ba, l.la, l.lb, hostgw, garbage, missing)
		checkState(t, l.a, wantState(l.a, "10.5.1.0/32", tunnelled(t, l.lb)...))
	}
	for _, s := range []string{`"subnet"="10.5.4.0/24"`, `"subnet"="10.5.5.0/24"`, `"subnet"="10.5.6.0/24"`} {
		if n := l.a.logs.count(s); n != 1 {
			t.Errorf("%d log lines for %s, want 1", n, s)
		}
	}
	// A different mistake is news; a lease that went away and came back too.
	garbage2 := peer("10.5.5.0/24", "10.250.9.5", "ff:ff:ff:ff:ff:ff")
	apply(t, l.ba, l.la, l.lb, hostgw, garbage2)
	apply(t, l.ba, l.la, l.lb, hostgw, garbage2, missing)
	if n := l.a.logs.count(`"subnet"="10.5.5.0/24"`); n != 2 {
		t.Errorf("%d log lines for the changed lease, want 2", n)
	}
	if n := l.a.logs.count(`"subnet"="10.5.6.0/24"`); n != 2 {
		t.Errorf("%d log lines for the returning lease, want 2", n)
	}
	if n := l.a.logs.count(`"subnet"="10.5.4.0/24"`); n != 1 {
		t.Errorf("%d log lines for the host-gw lease, want still 1", n)
	}
}

func TestDirectRouting(t *testing.T) {
	l := newLab(t, `{"Type":"vxlan","DirectRouting":true}`)
	far := peer("10.5.3.0/24", "172.16.0.3", "0e:00:00:00:00:03")
	apply(t, l.ba, l.la, l.lb, far)
	apply(t, l.bb, l.lb, l.la)
	checkState(t, l.a, wantState(l.a, "10.5.1.0/32",
		kinds(append(tunnelled(t, far), "route 10.5.2.0/24 via 10.250.9.2 dev eth0")...)...))
	checkState(t, l.b, wantState(l.b, "10.5.2.0/32", "route 10.5.1.0/24 via 10.250.9.1 dev eth0"))
	apply(t, l.ba, l.la, l.lb, far)
	if l.ba.last != (stats{}) {
		t.Errorf("second Apply changed %+v", l.ba.last)
	}

	l.a.addBridge(t, "10.5.1.1/24")
	l.b.addBridge(t, "10.5.2.1/24")
	rxB := l.b.rxPackets(t, "flannel.1")
	if err := l.a.ping(t, "10.5.1.1", "10.5.2.1"); err != nil {
		t.Fatal(err)
	}
	if l.b.rxPackets(t, "flannel.1") != rxB {
		t.Error("the direct route's traffic went through the tunnel")
	}

	// Turning DirectRouting off (a restart with the new config) moves the
	// peer back into the tunnel and removes the plain route; turning it on
	// again removes the tunnel entries.
	tunnelledA := l.a.backend(t, `{"Type":"vxlan"}`)
	l.a.initLease(t, tunnelledA, "10.5.1.0/24")
	apply(t, tunnelledA, l.la, l.lb, far)
	checkState(t, l.a, wantState(l.a, "10.5.1.0/32", kinds(append(tunnelled(t, far), tunnelled(t, l.lb)...)...)...))
	directA := l.a.backend(t, `{"Type":"vxlan","DirectRouting":true}`)
	l.a.initLease(t, directA, "10.5.1.0/24")
	apply(t, directA, l.la, l.lb, far)
	checkState(t, l.a, wantState(l.a, "10.5.1.0/32",
		kinds(append(tunnelled(t, far), "route 10.5.2.0/24 via 10.250.9.2 dev eth0")...)...))
	if err := l.a.ping(t, "10.5.1.1", "10.5.2.1"); err != nil {
		t.Fatal(err)
	}
}

func TestStaleEntriesRemovedAtStart(t *testing.T) {
	l := newLab(t, `{"Type":"vxlan"}`)
	h := l.a.h
	dev, err := h.LinkByName("flannel.1")
	if err != nil {
		t.Fatal(err)
	}
	idx, ext := dev.Attrs().Index, l.a.ext.Index
	mac := mustMAC("0e:00:00:00:00:77")
	// Left by a previous run: a lease that went away, an old own address.
	must(t, h.NeighSet(&netlink.Neigh{LinkIndex: idx, Family: unix.AF_INET, State: unix.NUD_PERMANENT, IP: net.IPv4(10, 5, 77, 0), HardwareAddr: mac}))
	must(t, h.NeighSet(&netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF, State: unix.NUD_PERMANENT, HardwareAddr: mac, IP: net.IPv4(10, 250, 9, 77)}))
	must(t, h.RouteAdd(&netlink.Route{LinkIndex: idx, Dst: ip.IPNet(netip.MustParsePrefix("10.5.77.0/24")), Gw: net.IPv4(10, 5, 77, 0), Flags: int(netlink.FLAG_ONLINK)}))
	must(t, h.RouteAdd(&netlink.Route{LinkIndex: ext, Dst: ip.IPNet(netip.MustParsePrefix("10.5.78.0/24")), Gw: net.IPv4(10, 250, 9, 78)}))
	must(t, h.AddrAdd(dev, &netlink.Addr{IPNet: ip.HostNet(netip.MustParseAddr("10.5.99.0"), 32)}))
	// Not ours: a route outside Network, a neighbour the kernel resolved.
	must(t, h.RouteAdd(&netlink.Route{LinkIndex: ext, Dst: ip.IPNet(netip.MustParsePrefix("192.168.50.0/24")), Gw: net.IPv4(10, 250, 9, 2)}))
	must(t, h.NeighSet(&netlink.Neigh{LinkIndex: idx, Family: unix.AF_INET, State: unix.NUD_STALE, IP: net.IPv4(10, 5, 200, 5), HardwareAddr: mac}))

	fresh := l.a.backend(t, `{"Type":"vxlan"}`)
	l.a.initLease(t, fresh, "10.5.1.0/24")
	apply(t, fresh, l.la, l.lb)
	checkState(t, l.a, wantState(l.a, "10.5.1.0/32",
		kinds(append(tunnelled(t, l.lb), "neigh 10.5.200.5 lladdr 0e:00:00:00:00:77 stale")...)...))
	routes, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Dst: ip.IPNet(netip.MustParsePrefix("192.168.50.0/24"))}, netlink.RT_FILTER_DST)
	if err != nil || len(routes) != 1 {
		t.Errorf("the foreign route 192.168.50.0/24 is gone: %v %v", routes, err)
	}
}

// faultyKernel fails the netlink calls a test picks.
type faultyKernel struct {
	kernel
	failRoute netip.Prefix
	failNeigh netip.Addr
	failFDB   net.HardwareAddr
}

var errInjected = errors.New("injected failure")

func (k *faultyKernel) ReplaceRoutes(rs []nlbatch.Route, errs []error) error {
	return writeExcept(rs, errs, k.kernel.ReplaceRoutes, func(r nlbatch.Route) bool { return r.Dst == k.failRoute })
}

func (k *faultyKernel) SetNeighs(ns []nlbatch.Neigh, errs []error) error {
	return writeExcept(ns, errs, k.kernel.SetNeighs, func(n nlbatch.Neigh) bool {
		return (n.Family == unix.AF_INET && n.IP == k.failNeigh) ||
			(n.Family == unix.AF_BRIDGE && net.HardwareAddr(n.MAC[:]).String() == k.failFDB.String())
	})
}

// writeExcept writes the items fail rejects with errInjected and the rest
// through write.
func writeExcept[T any](items []T, errs []error, write func([]T, []error) error, fail func(T) bool) error {
	var pass []T
	var at []int
	for i, it := range items {
		if fail(it) {
			errs[i] = errInjected
			continue
		}
		pass = append(pass, it)
		at = append(at, i)
	}
	perr := make([]error, len(pass))
	err := write(pass, perr)
	for j, i := range at {
		errs[i] = perr[j]
	}
	return err
}

// useKernel points every netlink call of be at k.
func (be *vxlanBackend) useKernel(k kernel) {
	be.nl = k
	for _, p := range be.planes() {
		p.nl = k
		p.rec.routeNetlink = k
		p.neighs.nl, p.fdbs.nl = k, k
	}
}

func TestPartialFailureRollsBackTheLease(t *testing.T) {
	needRoot(t)
	c := peer("10.5.3.0/24", "10.250.9.3", "0e:00:00:00:00:03")
	tests := []struct {
		name  string
		fault faultyKernel
		// change alters c, once in place, so that the failing call is made.
		change func(l *lab) subnet.Lease
	}{
		{"route fails", faultyKernel{failRoute: c.Subnet}, func(l *lab) subnet.Lease {
			must(t, l.a.h.RouteDel(&netlink.Route{LinkIndex: l.ba.dev.Index, Dst: ip.IPNet(c.Subnet), Gw: ip.IP(c.Subnet.Addr())}))
			return c
		}},
		{"neighbour fails", faultyKernel{failNeigh: c.Subnet.Addr()}, func(*lab) subnet.Lease {
			return peer("10.5.3.0/24", "10.250.9.3", "0e:00:00:00:00:33")
		}},
		{"fdb fails", faultyKernel{failFDB: mustMAC("0e:00:00:00:00:03")}, func(*lab) subnet.Lease {
			return peer("10.5.3.0/24", "10.250.9.33", "0e:00:00:00:00:03")
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := newLab(t, `{"Type":"vxlan"}`)
			real := l.ba.nl
			fault := tt.fault
			fault.kernel = real
			l.ba.useKernel(&fault)

			err := l.ba.Apply(context.Background(), l.la, []subnet.Lease{l.lb, c})
			if !errors.Is(err, errInjected) {
				t.Fatalf("Apply = %v, want the injected failure", err)
			}
			checkState(t, l.a, wantState(l.a, "10.5.1.0/32", tunnelled(t, l.lb)...))
			if l.ba.last.RolledBack != 1 {
				t.Errorf("rolled back %d leases, want 1", l.ba.last.RolledBack)
			}

			// Once the kernel cooperates, the next Apply completes the lease.
			l.ba.useKernel(real)
			apply(t, l.ba, l.la, l.lb, c)
			checkState(t, l.a, wantState(l.a, "10.5.1.0/32", kinds(append(tunnelled(t, l.lb), tunnelled(t, c)...)...)...))

			// A lease in place whose update fails is taken out whole.
			changed := tt.change(l)
			l.ba.useKernel(&fault)
			if err := l.ba.Apply(context.Background(), l.la, []subnet.Lease{l.lb, changed}); !errors.Is(err, errInjected) {
				t.Fatalf("Apply = %v, want the injected failure", err)
			}
			checkState(t, l.a, wantState(l.a, "10.5.1.0/32", tunnelled(t, l.lb)...))
			l.ba.useKernel(real)
			apply(t, l.ba, l.la, l.lb, changed)
			checkState(t, l.a, wantState(l.a, "10.5.1.0/32", kinds(append(tunnelled(t, l.lb), tunnelled(t, changed)...)...)...))
		})
	}
}

func TestNewRejectsBadOptions(t *testing.T) {
	ext := &net.Interface{Index: 2, MTU: 1500, Name: "eth0"}
	good := backend.Options{
		Ext:    backend.ExternalInterface{Iface: ext, IfaceAddr: netip.MustParseAddr("10.250.9.1"), PublicIP: netip.MustParseAddr("10.250.9.1")},
		Config: &subnet.Config{Network: network, SubnetLen: 24, BackendType: "vxlan", Backend: []byte(`{"Type":"vxlan"}`)},
	}
	be, err := backend.New("vxlan", good)
	if err != nil {
		t.Fatalf("good options: %v", err)
	}
	if err := be.Close(); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		change func(*backend.Options)
		want   string
	}{
		{"bad config", func(o *backend.Options) {
			o.Config = &subnet.Config{Network: network, Backend: []byte(`{"Type":"vxlan","VNI":0}`)}
		}, "VNI 0 is out of range 1..16777215"},
		{"no config", func(o *backend.Options) { o.Config = nil }, "no network config"},
		{"no interface", func(o *backend.Options) { o.Ext.Iface = nil }, "no external interface"},
		{"no address", func(o *backend.Options) { o.Ext.IfaceAddr = netip.Addr{} }, "has no IPv4 address"},
		{"tiny MTU", func(o *backend.Options) { o.Ext.Iface = &net.Interface{Index: 2, MTU: 100, Name: "eth0"} }, "MTU 100 is too small"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := good
			tt.change(&o)
			_, err := backend.New("vxlan", o)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("New = %v, want an error containing %q", err, tt.want)
			}
		})
	}
	vb, err := newBackend(good)
	if err != nil {
		t.Fatal(err)
	}
	defer vb.Close()
	if err := vb.Apply(context.Background(), subnet.Lease{Subnet: netip.MustParsePrefix("10.5.1.0/24")}, nil); err == nil {
		t.Error("Apply before Init succeeded")
	}
}
