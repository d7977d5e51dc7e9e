package vxlan

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/go-logr/logr/funcr"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/subnet"
)

// The lab: two network namespaces joined by a veth pair, the external
// network 10.250.9.0/24, overlay Network 10.5.0.0/16. Nothing is created
// or addressed outside the namespaces.
var (
	network = netip.MustParsePrefix("10.5.0.0/16")
	extNet  = netip.MustParsePrefix("10.250.9.0/24")
	nsSeq   atomic.Int64
)

const extName = "eth0"

// host is one namespace of the lab.
type host struct {
	name string // the namespace, as `ip netns exec` knows it
	h    *netlink.Handle
	ext  *net.Interface
	addr netip.Addr // the external address, 10.250.9.N
	logs *logLines
}

func needRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("skipping: needs root to create network namespaces, veth pairs and VXLAN devices")
	}
}

// newNS creates a named network namespace, deleted in Cleanup even when the
// test fails, and returns its name and a netlink handle into it. The
// creating thread is switched back to its namespace; if that fails the
// thread stays locked and dies with its goroutine.
func newNS(tb testing.TB) (string, netns.NsHandle, *netlink.Handle) {
	tb.Helper()
	needRoot(tb)
	name := fmt.Sprintf("flvx-%d-%d", os.Getpid(), nsSeq.Add(1))
	tb.Cleanup(func() {
		if err := netns.DeleteNamed(name); err != nil && !os.IsNotExist(err) {
			tb.Errorf("deleting network namespace %s: %v", name, err)
		}
	})
	type result struct {
		ns  netns.NsHandle
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: err}
			return
		}
		defer orig.Close()
		ns, err := netns.NewNamed(name)
		if serr := netns.Set(orig); serr != nil {
			if err == nil {
				ns.Close()
			}
			ch <- result{err: fmt.Errorf("returning to the original namespace: %w", serr)}
			return
		}
		runtime.UnlockOSThread()
		ch <- result{ns, err}
	}()
	r := <-ch
	if r.err != nil {
		tb.Fatalf("creating network namespace %s: %v", name, r.err)
	}
	tb.Cleanup(func() { r.ns.Close() })
	h, err := netlink.NewHandleAt(r.ns)
	if err != nil {
		tb.Fatalf("opening netlink in %s: %v", name, err)
	}
	tb.Cleanup(h.Close)
	lo, err := h.LinkByName("lo")
	if err == nil {
		err = h.LinkSetUp(lo)
	}
	if err != nil {
		tb.Fatalf("setting lo up in %s: %v", name, err)
	}
	return name, r.ns, h
}

// newPair builds two hosts whose eth0 ends of one veth pair carry
// 10.250.9.1/24 and 10.250.9.2/24.
func newPair(tb testing.TB) (a, b *host) {
	tb.Helper()
	nameA, _, ha := newNS(tb)
	nameB, nsB, hb := newNS(tb)
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: extName, MTU: 1500},
		PeerName:      extName,
		PeerNamespace: netlink.NsFd(int(nsB)),
	}
	if err := ha.LinkAdd(veth); err != nil {
		tb.Fatalf("creating the veth pair: %v", err)
	}
	a = &host{name: nameA, h: ha, addr: netip.MustParseAddr("10.250.9.1"), logs: &logLines{}}
	b = &host{name: nameB, h: hb, addr: netip.MustParseAddr("10.250.9.2"), logs: &logLines{}}
	for _, x := range []*host{a, b} {
		l, err := x.h.LinkByName(extName)
		if err != nil {
			tb.Fatalf("finding %s in %s: %v", extName, x.name, err)
		}
		if err := x.h.AddrAdd(l, &netlink.Addr{IPNet: ip.HostNet(x.addr, extNet.Bits())}); err != nil {
			tb.Fatalf("addressing %s in %s: %v", extName, x.name, err)
		}
		if err := x.h.LinkSetUp(l); err != nil {
			tb.Fatalf("setting %s up in %s: %v", extName, x.name, err)
		}
		at := l.Attrs()
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
	out, err := exec.Command("ip", "netns", "exec", x.name, "ping", "-n", "-c1", "-W2", "-I", src, dst).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ping -I %s %s in %s: %w\n%s", src, dst, x.name, err, out)
	}
	return nil
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
