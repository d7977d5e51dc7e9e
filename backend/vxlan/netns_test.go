package vxlan

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/go-logr/logr/funcr"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/internal/nstest"
	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/pkg/nlbatch"
	"github.com/flanneld-go/flanneld/subnet"
)

// The lab: two network namespaces joined by a veth pair, the external
// network 10.250.9.0/24, overlay Network 10.5.0.0/16. Nothing is created
// or addressed outside the namespaces.
var (
	network = netip.MustParsePrefix("10.5.0.0/16")
	extNet  = netip.MustParsePrefix("10.250.9.0/24")
)

const extName = "eth0"

// host is one namespace of the lab.
type host struct {
	ns   *nstest.NS
	name string // the namespace, as `ip netns exec` knows it
	h    *nlbatch.Handle
	ext  *net.Interface
	addr netip.Addr // the external address, 10.250.9.N
	// addr6 is the external IPv6 address, fd5e::N (newDualPair only).
	addr6 netip.Addr
	logs  *logLines
}

func needRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("skipping: needs root to create network namespaces, veth pairs and VXLAN devices")
	}
}

// newNS creates a named network namespace with lo up, deleted in Cleanup
// even when the test fails.
func newNS(tb testing.TB) *nstest.NS {
	tb.Helper()
	needRoot(tb)
	n := nstest.New(tb, "flvx")
	n.Up(tb, "lo")
	return n
}

// newPair builds two hosts whose eth0 ends of one veth pair carry
// 10.250.9.1/24 and 10.250.9.2/24.
func newPair(tb testing.TB) (a, b *host) {
	tb.Helper()
	na, nb := newNS(tb), newNS(tb)
	na.Veth(tb, extName, 1500, nb, extName)
	a = &host{ns: na, name: na.Name, h: na.NL, addr: netip.MustParseAddr("10.250.9.1"), logs: &logLines{}}
	b = &host{ns: nb, name: nb.Name, h: nb.NL, addr: netip.MustParseAddr("10.250.9.2"), logs: &logLines{}}
	for _, x := range []*host{a, b} {
		at := x.ns.Up(tb, extName, netip.PrefixFrom(x.addr, extNet.Bits()).String()).Attrs()
		x.ext = &net.Interface{Index: at.Index, MTU: at.MTU, Name: at.Name, HardwareAddr: at.HardwareAddr}
	}
	return a, b
}

// logLines collects log lines, for asserting what is logged how often.
type logLines struct {
	mu    sync.Mutex
	lines []string
}

func (l *logLines) add(s string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, s)
}

func (l *logLines) count(substr string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, s := range l.lines {
		if strings.Contains(s, substr) {
			n++
		}
	}
	return n
}

// backend builds a vxlan backend for h through the registry, with the given
// Backend block.
func (x *host) backend(tb testing.TB, block string) *vxlanBackend {
	tb.Helper()
	logger := funcr.New(func(prefix, args string) {
		x.logs.add(args)
		tb.Logf("%s: %s", x.name, args)
	}, funcr.Options{Verbosity: 1})
	be, err := backend.New("vxlan", backend.Options{
		Ext: backend.ExternalInterface{Iface: x.ext, IfaceAddr: x.addr, PublicIP: x.addr},
		Config: &subnet.Config{
			Network: network, SubnetLen: 24, BackendType: "vxlan",
			Backend: json.RawMessage(block),
		},
		Netlink: x.h,
		Logger:  logger,
	})
	if err != nil {
		tb.Fatalf("creating the backend: %v", err)
	}
	return be.(*vxlanBackend)
}

// initLease runs Init and returns the node's lease for subnet.
func (x *host) initLease(tb testing.TB, be *vxlanBackend, sn string) subnet.Lease {
	tb.Helper()
	pub, err := be.Init(context.Background())
	if err != nil {
		tb.Fatalf("%s: Init: %v", x.name, err)
	}
	return subnet.Lease{
		Subnet: netip.MustParsePrefix(sn),
		Attrs:  subnet.LeaseAttrs{PublicIP: x.addr, BackendType: "vxlan", BackendData: pub.BackendData},
	}
}

func apply(tb testing.TB, be *vxlanBackend, own subnet.Lease, remote ...subnet.Lease) {
	tb.Helper()
	if err := be.Apply(context.Background(), own, remote); err != nil {
		tb.Fatalf("Apply: %v", err)
	}
}

// vtepMAC is the VtepMAC a lease publishes.
func vtepMAC(tb testing.TB, l subnet.Lease) string {
	tb.Helper()
	var d backendData
	if err := json.Unmarshal(l.Attrs.BackendData, &d); err != nil {
		tb.Fatalf("BackendData %s: %v", l.Attrs.BackendData, err)
	}
	return d.VtepMAC
}

// state renders, from netlink, everything the backend owns in x's namespace:
// the VTEP device, its addresses, its IPv4 neighbours and fdb entries, and
// the main-table routes through it or with a gateway into Network. One
// entry a line, sorted within each kind.
func (x *host) state(tb testing.TB, dev string) string {
	tb.Helper()
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
	vtepDev := fmt.Sprint(v.VtepDevIndex)
	if v.VtepDevIndex == x.ext.Index {
		vtepDev = x.ext.Name
	}
	learning := "nolearning"
	if v.Learning {
		learning = "learning"
	}
	out = append(out, fmt.Sprintf("link %s vxlan id %d local %s dev %s dstport %d %s gbp=%t l2miss=%t l3miss=%t mtu %d %s",
		v.Name, v.VxlanId, v.SrcAddr, vtepDev, v.Port, learning, v.GBP, v.L2miss, v.L3miss, v.MTU, updown))

	addrs, err := x.h.AddrList(l, netlink.FAMILY_V4)
	if err != nil {
		tb.Fatalf("%s: listing addresses: %v", x.name, err)
	}
	var sec []string
	for _, a := range addrs {
		sec = append(sec, "addr "+a.IPNet.String())
	}
	out = append(out, sorted(sec)...)

	neighs, err := x.h.NeighList(v.Index, unix.AF_INET)
	if err != nil {
		tb.Fatalf("%s: listing neighbours: %v", x.name, err)
	}
	sec = nil
	for _, n := range neighs {
		sec = append(sec, fmt.Sprintf("neigh %s lladdr %s %s", n.IP, n.HardwareAddr, nudName(n.State)))
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
		vni := ""
		if n.VNI != 0 {
			vni = fmt.Sprintf(" vni %d", n.VNI)
		}
		sec = append(sec, fmt.Sprintf("fdb %s%s dst %s%s %s", n.HardwareAddr, self, n.IP, vni, nudName(n.State)))
	}
	out = append(out, sorted(sec)...)

	routes, err := x.h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		tb.Fatalf("%s: listing routes: %v", x.name, err)
	}
	sec = nil
	for _, r := range routes {
		dst, _ := ip.FromIPNet(r.Dst)
		if r.LinkIndex != v.Index && (r.Gw == nil || !network.Overlaps(dst)) {
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

func sorted(s []string) []string {
	slices.Sort(s)
	return s
}

func nudName(state int) string {
	var names []string
	for _, s := range []struct {
		bit  int
		name string
	}{
		{unix.NUD_INCOMPLETE, "incomplete"}, {unix.NUD_REACHABLE, "reachable"}, {unix.NUD_STALE, "stale"},
		{unix.NUD_DELAY, "delay"}, {unix.NUD_PROBE, "probe"}, {unix.NUD_FAILED, "failed"},
		{unix.NUD_NOARP, "noarp"}, {unix.NUD_PERMANENT, "permanent"},
	} {
		if state&s.bit != 0 {
			names = append(names, s.name)
		}
	}
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, ",")
}

// wantState builds the expected state() text of a host whose device has
// mtu 1450 and the given address, followed by extra lines in order.
func wantState(x *host, addr string, lines ...string) string {
	head := []string{
		fmt.Sprintf("link flannel.1 vxlan id 1 local %s dev %s dstport 8472 nolearning gbp=false l2miss=false l3miss=false mtu 1450 up", x.addr, extName),
		"addr " + addr,
	}
	return strings.Join(append(head, lines...), "\n")
}

func checkState(tb testing.TB, x *host, want string) {
	tb.Helper()
	if got := x.state(tb, "flannel.1"); got != want {
		tb.Errorf("%s kernel state:\n%s\n\nwant:\n%s", x.name, got, want)
	}
}

// addBridge gives x a port-less bridge cni0 with cidr, standing for the
// node's container bridge: the overlay address lives off the tunnel device,
// so a ping between two of them has to cross the tunnel both ways.
func (x *host) addBridge(tb testing.TB, cidr string) {
	tb.Helper()
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "cni0"}}
	if err := x.h.LinkAdd(br); err != nil {
		tb.Fatalf("%s: creating cni0: %v", x.name, err)
	}
	p := netip.MustParsePrefix(cidr)
	if err := x.h.AddrAdd(br, &netlink.Addr{IPNet: ip.HostNet(p.Addr(), p.Bits())}); err != nil {
		tb.Fatalf("%s: addressing cni0: %v", x.name, err)
	}
	if err := x.h.LinkSetUp(br); err != nil {
		tb.Fatalf("%s: setting cni0 up: %v", x.name, err)
	}
}

// ping sends one echo request inside x's namespace from src to dst.
func (x *host) ping(tb testing.TB, src, dst string) error {
	tb.Helper()
	if _, err := exec.LookPath("ping"); err != nil {
		tb.Skip("skipping the ping: no ping binary (apt-get install iputils-ping)")
	}
	return x.pinger("ping", "-n", "-c1", "-W2", "-I", src, dst)
}

// pinger runs ping with args in x, up to three times: on a loaded machine
// one echo can be lost (a neighbour resolution's queue, a busy CPU) with
// nothing wrong in the data path; three in a row are not.
func (x *host) pinger(args ...string) error {
	var err error
	for range 3 {
		var out []byte
		if out, err = x.ns.Command(context.Background(), args...).CombinedOutput(); err == nil {
			return nil
		}
		err = fmt.Errorf("%s in %s: %w\n%s", strings.Join(args, " "), x.name, err, out)
	}
	return err
}

// rxPackets is the receive counter of a link.
func (x *host) rxPackets(tb testing.TB, name string) uint64 {
	tb.Helper()
	l, err := x.h.LinkByName(name)
	if err != nil {
		tb.Fatalf("%s: finding %s: %v", x.name, name, err)
	}
	if l.Attrs().Statistics == nil {
		tb.Fatalf("%s: %s has no statistics", x.name, name)
	}
	return l.Attrs().Statistics.RxPackets
}
