package udp

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/internal/nstest"
	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/subnet"
)

// The lab: two network namespaces joined by a veth pair carrying the
// external network 10.250.8.0/24; overlay Network 10.5.0.0/16. Nothing is
// created or addressed outside the namespaces.
var labExt = netip.MustParsePrefix("10.250.8.0/24")

const labExtName = "eth0"

func needRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("skipping: needs root to create network namespaces, veth pairs and TUN devices")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		tb.Skipf("skipping: no /dev/net/tun: %v", err)
	}
}

// labHost is one namespace of the lab.
type labHost struct {
	*nstest.NS
	ext  *net.Interface
	addr netip.Addr
}

// inNS runs fn on a thread switched into ns, and switches it back. If that
// fails the thread stays locked and dies with its goroutine.
func inNS(tb testing.TB, ns netns.NsHandle, fn func()) {
	tb.Helper()
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			done <- err
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			runtime.UnlockOSThread()
			done <- err
			return
		}
		fn()
		if err := netns.Set(orig); err != nil {
			done <- fmt.Errorf("returning to the original namespace: %w", err)
			return
		}
		runtime.UnlockOSThread()
		done <- nil
	}()
	if err := <-done; err != nil {
		tb.Fatalf("running in a namespace: %v", err)
	}
}

// newNS creates a named namespace with lo up, deleted in Cleanup.
func newNS(tb testing.TB) *nstest.NS {
	tb.Helper()
	needRoot(tb)
	n := nstest.New(tb, "fludp")
	n.Up(tb, "lo")
	return n
}

// newLab builds two hosts whose eth0 ends of one veth pair carry
// 10.250.8.1/24 and 10.250.8.2/24.
func newLab(tb testing.TB) (a, b *labHost) {
	tb.Helper()
	a = &labHost{NS: newNS(tb), addr: netip.MustParseAddr("10.250.8.1")}
	b = &labHost{NS: newNS(tb), addr: netip.MustParseAddr("10.250.8.2")}
	a.Veth(tb, labExtName, 1500, b.NS, labExtName)
	for _, x := range []*labHost{a, b} {
		at := x.Up(tb, labExtName, netip.PrefixFrom(x.addr, labExt.Bits()).String()).Attrs()
		x.ext = &net.Interface{Index: at.Index, MTU: at.MTU, Name: at.Name, Flags: net.FlagUp}
	}
	return a, b
}

// run runs a command inside the host's namespace.
func (x *labHost) run(ctx context.Context, args ...string) (string, error) {
	out, err := x.Command(ctx, args...).CombinedOutput()
	return string(out), err
}

// labConfig is the network config of the lab with the given Backend block.
func labConfig(tb testing.TB, backendJSON string) *subnet.Config {
	tb.Helper()
	if backendJSON == "" {
		backendJSON = `{"Type":"udp"}`
	}
	cfg, err := subnet.ParseConfig([]byte(`{"Network":"10.5.0.0/16","SubnetLen":24,"Backend":` + backendJSON + `}`))
	if err != nil {
		tb.Fatalf("parsing the lab config: %v", err)
	}
	return cfg
}

// lease is the udp lease of subnet held by host x.
func (x *labHost) lease(subnetCIDR string) subnet.Lease {
	return subnet.Lease{
		Subnet: netip.MustParsePrefix(subnetCIDR),
		Attrs:  subnet.LeaseAttrs{PublicIP: x.addr, BackendType: TypeName},
	}
}

// startBackend creates and initialises a udp backend in x's namespace,
// closed in Cleanup.
func (x *labHost) startBackend(tb testing.TB, cfg *subnet.Config) *Backend {
	tb.Helper()
	be, err := New(backend.Options{
		Ext:     backend.ExternalInterface{Iface: x.ext, IfaceAddr: x.addr, PublicIP: x.addr},
		Config:  cfg,
		Netlink: x.NL,
		Logger:  klog.Background().WithName(x.Name),
	})
	if err != nil {
		tb.Fatalf("New in %s: %v", x.Name, err)
	}
	tb.Cleanup(func() {
		if err := be.Close(); err != nil {
			tb.Errorf("closing the backend in %s: %v", x.Name, err)
		}
	})
	var pub backend.Publish
	inNS(tb, x.Handle, func() { pub, err = be.Init(context.Background()) })
	if err != nil {
		tb.Fatalf("Init in %s: %v", x.Name, err)
	}
	if want := x.ext.MTU - 28; pub.MTU != want || pub.BackendData != nil {
		tb.Fatalf("Init in %s published %+v, want MTU %d and no BackendData", x.Name, pub, want)
	}
	return be
}

// ping sends one echo request from src to dst inside x and reports whether
// a reply came, with ping's output.
func (x *labHost) ping(tb testing.TB, src, dst string) (bool, string) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := x.run(ctx, "ping", "-n", "-c1", "-W2", "-I", src, dst)
	return err == nil, out
}

// eventually polls cond until it holds or a generous deadline passes.
func eventually(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func needPing(tb testing.TB) {
	tb.Helper()
	if _, err := exec.LookPath("ping"); err != nil {
		tb.Skip("skipping: ping is not installed (apt-get install iputils-ping)")
	}
}

func TestNetnsPing(t *testing.T) {
	needRoot(t)
	needPing(t)
	a, b := newLab(t)
	cfg := labConfig(t, "")
	ba := a.startBackend(t, cfg)
	bb := b.startBackend(t, cfg)
	la, lb := a.lease("10.5.1.0/24"), b.lease("10.5.2.0/24")
	ctx := context.Background()
	for i := 0; i < 2; i++ { // Apply is idempotent
		if err := ba.Apply(ctx, la, []subnet.Lease{lb}); err != nil {
			t.Fatalf("Apply in A: %v", err)
		}
		if err := bb.Apply(ctx, lb, []subnet.Lease{la}); err != nil {
			t.Fatalf("Apply in B: %v", err)
		}
	}
	out, err := a.run(ctx, "ip", "-4", "-o", "addr", "show", "dev", DeviceName)
	if err != nil || !strings.Contains(out, "inet 10.5.1.0/16") || strings.Count(out, "inet ") != 1 {
		t.Fatalf("flannel0 in A: want exactly 10.5.1.0/16, got %q (%v)", out, err)
	}
	out, _ = a.run(ctx, "ip", "-o", "link", "show", "dev", DeviceName)
	if !strings.Contains(out, "mtu 1472") {
		t.Fatalf("flannel0 in A: want mtu 1472, got %q", out)
	}
	if ok, out := a.ping(t, "10.5.1.0", "10.5.2.0"); !ok {
		t.Fatalf("ping A->B failed:\n%s\nstats A %+v\nstats B %+v", out, ba.Stats(), bb.Stats())
	}
	if ok, out := b.ping(t, "10.5.2.0", "10.5.1.0"); !ok {
		t.Fatalf("ping B->A failed:\n%s\nstats A %+v\nstats B %+v", out, ba.Stats(), bb.Stats())
	}
	t.Logf("stats A %+v", ba.Stats())
}

// labPair starts a udp backend on each host with the given Backend block
// and applies each other's lease: A holds 10.5.1.0/24, B 10.5.2.0/24.
func labPair(t *testing.T, backendJSON string) (a, b *labHost, ba, bb *Backend) {
	t.Helper()
	a, b = newLab(t)
	cfg := labConfig(t, backendJSON)
	ba = a.startBackend(t, cfg)
	bb = b.startBackend(t, cfg)
	la, lb := a.lease("10.5.1.0/24"), b.lease("10.5.2.0/24")
	if err := ba.Apply(context.Background(), la, []subnet.Lease{lb}); err != nil {
		t.Fatalf("Apply in A: %v", err)
	}
	if err := bb.Apply(context.Background(), lb, []subnet.Lease{la}); err != nil {
		t.Fatalf("Apply in B: %v", err)
	}
	return a, b, ba, bb
}

func TestNetnsTCPIntegrity(t *testing.T) {
	needRoot(t)
	yes, no := true, false
	for _, tc := range []struct {
		name, backend string
		size          int64
		// superReads: A's TUN reads return super-packets; gro: B receives
		// coalesced datagrams. nil: not checked.
		superReads, gro *bool
	}{
		{"offloads", `{"Type":"udp"}`, 32 << 20, &yes, &yes},
		{"no-offloads", `{"Type":"udp","TUNOffload":false,"UDPGSO":false,"UDPGRO":false}`, 8 << 20, &no, &no},
		{"gso-only", `{"Type":"udp","UDPGRO":false}`, 8 << 20, &yes, &no},
		{"gro-only", `{"Type":"udp","UDPGSO":false}`, 8 << 20, &yes, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b, ba, bb := labPair(t, tc.backend)
			r, err := tcpStream(t, a, b, "10.5.2.0", tc.size, 0, true)
			if err != nil {
				t.Fatalf("A->B: %v\nstats A %+v\nstats B %+v", err, ba.Stats(), bb.Stats())
			}
			r2, err := tcpStream(t, b, a, "10.5.1.0", 4<<20, 0, true)
			if err != nil {
				t.Fatalf("B->A: %v\nstats A %+v\nstats B %+v", err, ba.Stats(), bb.Stats())
			}
			sa, sb := ba.Stats(), bb.Stats()
			if sa.UDPSent == 0 || sb.TUNWritten == 0 {
				t.Fatalf("traffic did not pass the backends: A %+v B %+v", sa, sb)
			}
			if tc.superReads != nil && (sa.TUNReads < sa.TUNRead) != *tc.superReads {
				t.Errorf("A read %d packets in %d TUN reads; want super-packets: %v", sa.TUNRead, sa.TUNReads, *tc.superReads)
			}
			if tc.gro != nil && (sb.UDPMessages < sb.UDPReceived) != *tc.gro {
				t.Errorf("B received %d datagrams in %d messages; want coalesced: %v", sb.UDPReceived, sb.UDPMessages, *tc.gro)
			}
			for _, s := range []Stats{sa, sb} {
				if s.Malformed+s.SpoofedSource+s.UnknownSender+s.SendErrors+s.TUNWriteErrors != 0 {
					t.Errorf("unexpected drops: %+v", s)
				}
			}
			t.Logf("A->B %d bytes in %v, B->A %d bytes in %v; A %+v", r.bytes, r.elapsed, r2.bytes, r2.elapsed, sa)
		})
	}
}

func TestNetnsLeaseRemovedAndUnreachable(t *testing.T) {
	needRoot(t)
	needPing(t)
	a, b, ba, bb := labPair(t, "")
	ctx := context.Background()
	if ok, out := a.ping(t, "10.5.1.0", "10.5.2.0"); !ok {
		t.Fatalf("ping A->B failed:\n%s", out)
	}

	// A destination no lease holds gets ICMP net-unreachable and never
	// leaves the host.
	before := bb.Stats()
	ok, out := a.ping(t, "10.5.1.0", "10.5.77.1")
	if ok || !strings.Contains(out, "Net Unreachable") {
		t.Fatalf("ping to an unleased address: ok %v, want a net-unreachable error; output:\n%s", ok, out)
	}
	if s := ba.Stats(); s.Unreachable == 0 || s.NoRoute == 0 {
		t.Fatalf("A counted no ICMP net-unreachable: %+v", s)
	}
	if s := bb.Stats(); s.UDPReceived != before.UDPReceived {
		t.Fatalf("B received %d datagrams for an unleased destination", s.UDPReceived-before.UDPReceived)
	}

	// Removing B's lease stops traffic to it.
	la, lb := a.lease("10.5.1.0/24"), b.lease("10.5.2.0/24")
	if err := ba.Apply(ctx, la, nil); err != nil {
		t.Fatalf("Apply without B: %v", err)
	}
	before = bb.Stats()
	noRoute := ba.Stats().NoRoute
	if ok, out := a.ping(t, "10.5.1.0", "10.5.2.0"); ok {
		t.Fatalf("ping A->B still works after B's lease was removed:\n%s", out)
	}
	if s := bb.Stats(); s.UDPReceived != before.UDPReceived {
		t.Fatalf("B still received %d datagrams after its lease was removed", s.UDPReceived-before.UDPReceived)
	}
	if ba.Stats().NoRoute == noRoute {
		t.Fatal("A did not count the packet to a removed lease as no route")
	}
	if err := ba.Apply(ctx, la, []subnet.Lease{lb}); err != nil {
		t.Fatalf("Apply with B again: %v", err)
	}
	if ok, out := a.ping(t, "10.5.1.0", "10.5.2.0"); !ok {
		t.Fatalf("ping A->B failed after B's lease came back:\n%s", out)
	}
}

// sendDatagram sends payload from src (an address of x) to dst, with a
// socket created inside x's namespace.
func (x *labHost) sendDatagram(t *testing.T, src string, dst netip.AddrPort, payload []byte) {
	t.Helper()
	var c *net.UDPConn
	var err error
	inNS(t, x.Handle, func() {
		c, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.ParseIP(src)})
	})
	if err != nil {
		t.Fatalf("opening a udp socket on %s in %s: %v", src, x.Name, err)
	}
	defer c.Close()
	if _, err := c.WriteToUDPAddrPort(payload, dst); err != nil {
		t.Fatalf("sending from %s: %v", src, err)
	}
}

func TestNetnsDropsInjectedDatagrams(t *testing.T) {
	needRoot(t)
	for _, strict := range []bool{true, false} {
		t.Run(fmt.Sprintf("strict=%v", strict), func(t *testing.T) {
			a, b, ba, _ := labPair(t, fmt.Sprintf(`{"Type":"udp","StrictSource":%v}`, strict))
			l, err := b.NL.LinkByName(labExtName)
			if err != nil {
				t.Fatal(err)
			}
			if err := b.NL.AddrAdd(l, &netlink.Addr{IPNet: ip.HostNet(netip.MustParseAddr("10.250.8.99"), 24)}); err != nil {
				t.Fatalf("adding a non-lease address in B: %v", err)
			}
			to := netip.AddrPortFrom(a.addr, DefaultPort)
			echo := []byte{8, 0, 0xf7, 0xfe, 0, 1, 0, 0} // ICMP echo request, valid checksum
			base := ba.Stats()

			// From an address that holds no lease.
			b.sendDatagram(t, "10.250.8.99", to, mkIPv4([4]byte{10, 5, 2, 5}, [4]byte{10, 5, 1, 0}, protoICMP, 64, nil, echo))
			// From B's lease address, but with a source outside B's subnet.
			b.sendDatagram(t, b.addr.String(), to, mkIPv4([4]byte{10, 5, 9, 9}, [4]byte{10, 5, 1, 0}, protoICMP, 64, nil, echo))
			// Garbage from B.
			b.sendDatagram(t, b.addr.String(), to, []byte("not a packet"))

			if strict {
				eventually(t, "A to count the injected datagrams", func() bool {
					s := ba.Stats()
					return s.UnknownSender == base.UnknownSender+1 && s.SpoofedSource == base.SpoofedSource+1 && s.Malformed+s.NonIPv4 >= base.Malformed+base.NonIPv4+1
				})
				if s := ba.Stats(); s.TUNWritten != base.TUNWritten {
					t.Fatalf("A wrote %d injected packets to its TUN", s.TUNWritten-base.TUNWritten)
				}
				return
			}
			eventually(t, "A to accept both injected packets", func() bool {
				s := ba.Stats()
				return s.TUNWritten == base.TUNWritten+2 && s.Malformed+s.NonIPv4 >= base.Malformed+base.NonIPv4+1
			})
			if s := ba.Stats(); s.UnknownSender != 0 || s.SpoofedSource != 0 {
				t.Fatalf("non-strict mode dropped by origin: %+v", s)
			}
		})
	}
}

// TestNetnsOwnLeaseChangeMovesTheAddress: a new lease's address is added to
// flannel0 before the old one goes, in the same subnet (Network's prefix);
// with promote_secondaries the new one stays, as the only address, and the
// Network route through flannel0 stays too. The peer table follows the
// remote leases.
func TestNetnsOwnLeaseChangeMovesTheAddress(t *testing.T) {
	a, b := newLab(t)
	be := a.startBackend(t, labConfig(t, ""))
	ctx := context.Background()
	peer := b.lease("10.5.2.0/24")
	addrs := func() string {
		link, err := a.NL.LinkByName(DeviceName)
		if err != nil {
			t.Fatal(err)
		}
		as, err := a.NL.AddrList(link, netlink.FAMILY_V4)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, x := range as {
			out = append(out, x.IPNet.String())
		}
		return strings.Join(out, " ")
	}
	for _, own := range []string{"10.5.1.0/24", "10.5.9.0/24", "10.5.9.0/24"} {
		if err := be.Apply(ctx, a.lease(own), []subnet.Lease{peer}); err != nil {
			t.Fatalf("Apply with own lease %s: %v", own, err)
		}
		want := strings.TrimSuffix(own, "/24") + "/16"
		if got := addrs(); got != want {
			t.Errorf("own lease %s: flannel0 has %q, want %q", own, got, want)
		}
		routes, err := a.NL.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Dst: ip.IPNet(netip.MustParsePrefix("10.5.0.0/16"))}, netlink.RT_FILTER_DST)
		if err != nil || len(routes) != 1 || routes[0].Priority != RouteMetric {
			t.Errorf("own lease %s: routes to 10.5.0.0/16: %v %v, want the one through flannel0, metric %d", own, routes, err, RouteMetric)
		}
	}
	if tb := be.path.table.Load(); tb.lookup(a4("10.5.2.7")) < 0 || len(tb.peers) != 1 {
		t.Errorf("peer table %+v, want the one peer 10.5.2.0/24", tb.peers)
	}
	before := be.path.table.Load()
	if err := be.Apply(ctx, a.lease("10.5.9.0/24"), []subnet.Lease{peer}); err != nil {
		t.Fatal(err)
	}
	if be.path.table.Load() != before {
		t.Error("an Apply that changed no peer swapped the peer table")
	}
	if err := be.Apply(ctx, a.lease("10.5.9.0/24"), nil); err != nil {
		t.Fatal(err)
	}
	if tb := be.path.table.Load(); len(tb.peers) != 0 {
		t.Errorf("peer table %+v after the peer went, want empty", tb.peers)
	}
}
