package hostgw

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/internal/nstest"
	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/pkg/nlbatch"
	"github.com/flanneld-go/flanneld/subnet"
)

// dualNode is one namespace of the dual-stack lab: eth0 with 10.250.0.N/24
// and fd5e::N/64 (no duplicate address detection), its backend and lease.
type dualNode struct {
	ns    *nstest.NS
	eth0  netlink.Link
	addr  netip.Addr
	addr6 netip.Addr
	be    backend.Backend
	lease subnet.Lease
	logs  *logSink
}

// newDualNodes builds two namespaces joined by a veth pair, each running a
// host-gw backend for config cfg, with leases 10.5.N.0/24 and
// fc00:5:0:N::/64 (N = 1, 2).
func newDualNodes(t *testing.T, cfg string) (a, b *dualNode) {
	t.Helper()
	nodes := []*dualNode{{}, {}}
	for i, n := range nodes {
		n.ns = nstest.New(t, "flhgw6")
		out, err := n.ns.Command(context.Background(), "sysctl", "-q", "-w",
			"net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0").CombinedOutput()
		if err != nil {
			t.Fatalf("turning DAD off in %s: %v\n%s", n.ns.Name, err, out)
		}
		n.ns.Up(t, "lo")
		n.addr = netip.MustParseAddr(fmt.Sprintf("10.250.0.%d", i+1))
		n.addr6 = netip.MustParseAddr(fmt.Sprintf("fd5e::%d", i+1))
		n.logs = &logSink{}
	}
	a, b = nodes[0], nodes[1]
	a.ns.Veth(t, "eth0", 0, b.ns, "eth0")
	for i, n := range nodes {
		n.eth0 = n.ns.Up(t, "eth0", netip.PrefixFrom(n.addr, 24).String())
		addNoDAD(t, n.ns.NL, n.eth0, netip.PrefixFrom(n.addr6, 64))
		c, err := subnet.ParseConfig([]byte(cfg))
		if err != nil {
			t.Fatal(err)
		}
		at := n.eth0.Attrs()
		ext := backend.ExternalInterface{
			Iface:       &net.Interface{Index: at.Index, MTU: at.MTU, Name: at.Name, HardwareAddr: at.HardwareAddr},
			IfaceAddrV6: n.addr6, PublicIPv6: n.addr6,
		}
		n.lease = subnet.Lease{
			IPv6Subnet: netip.MustParsePrefix(fmt.Sprintf("fc00:5:0:%d::/64", i+1)),
			Attrs:      subnet.LeaseAttrs{PublicIPv6: n.addr6, BackendType: Type},
		}
		if c.EnableIPv4 {
			ext.IfaceAddr, ext.PublicIP = n.addr, n.addr
			n.lease.Subnet = netip.MustParsePrefix(fmt.Sprintf("10.5.%d.0/24", i+1))
			n.lease.Attrs.PublicIP = n.addr
		}
		n.be, err = backend.New(Type, backend.Options{Ext: ext, Config: c, Netlink: n.ns.NL, Logger: n.logs.logger()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { n.be.Close() })
		pub, err := n.be.Init(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if pub.MTU != at.MTU || pub.BackendData != nil || pub.BackendV6Data != nil {
			t.Errorf("Publish = %+v, want MTU %d and no backend data", pub, at.MTU)
		}
	}
	return a, b
}

func addNoDAD(t *testing.T, h *nlbatch.Handle, l netlink.Link, p netip.Prefix) {
	t.Helper()
	if err := h.AddrAdd(l, &netlink.Addr{IPNet: ip.HostNet(p.Addr(), p.Bits()), Flags: unix.IFA_F_NODAD}); err != nil {
		t.Fatalf("adding %s: %v", p, err)
	}
}

// gatewayRoutes6 lists the IPv6 main table's routes with a gateway, sorted.
func gatewayRoutes6(t *testing.T, h *nlbatch.Handle) []string {
	t.Helper()
	rs, err := h.RouteListFiltered(netlink.FAMILY_V6, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, r := range rs {
		if r.Gw == nil {
			continue
		}
		l, err := h.LinkByIndex(r.LinkIndex)
		if err != nil {
			t.Fatal(err)
		}
		lines = append(lines, fmt.Sprintf("%s via %s dev %s", r.Dst, r.Gw, l.Attrs().Name))
	}
	slices.Sort(lines)
	return lines
}

func ping(t *testing.T, ns *nstest.NS, args ...string) {
	t.Helper()
	if _, err := exec.LookPath("ping"); err != nil {
		t.Skip("skipping the ping: no ping binary (apt-get install iputils-ping)")
	}
	argv := append([]string{"ping", "-n", "-c1", "-W5"}, args...)
	if out, err := ns.Command(context.Background(), argv...).CombinedOutput(); err != nil {
		t.Fatalf("%v in %s: %v\n%s", argv, ns.Name, err, out)
	}
}

func TestHostGWDualStackInNetns(t *testing.T) {
	a, b := newDualNodes(t, `{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00:5::/48","Backend":{"Type":"host-gw"}}`)
	ctx := context.Background()
	// Not on eth0's IPv6 network: skipped, its IPv4 route still installed.
	far := lease("10.5.7.0/24", "10.250.0.7", Type)
	far.IPv6Subnet = netip.MustParsePrefix("fc00:5:0:7::/64")
	far.Attrs.PublicIPv6 = netip.MustParseAddr("fd99::7")
	// An IPv4-only lease in the dual-stack cluster: IPv4 route only.
	v4only := lease("10.5.8.0/24", "10.250.0.8", Type)

	check := func(step string, remote []subnet.Lease, want4, want6 []string) {
		t.Helper()
		if err := a.be.Apply(ctx, a.lease, remote); err != nil {
			t.Fatalf("%s: Apply: %v", step, err)
		}
		if got := gatewayRoutes(t, a.ns.NL); !slices.Equal(got, want4) {
			t.Errorf("%s: IPv4 routes:\n%s\nwant:\n%s", step, strings.Join(got, "\n"), strings.Join(want4, "\n"))
		}
		if got := gatewayRoutes6(t, a.ns.NL); !slices.Equal(got, want6) {
			t.Errorf("%s: IPv6 routes:\n%s\nwant:\n%s", step, strings.Join(got, "\n"), strings.Join(want6, "\n"))
		}
	}
	all := []subnet.Lease{b.lease, far, v4only}
	want4 := []string{"10.5.2.0/24 via 10.250.0.2 dev eth0", "10.5.7.0/24 via 10.250.0.7 dev eth0", "10.5.8.0/24 via 10.250.0.8 dev eth0"}
	want6 := []string{"fc00:5:0:2::/64 via fd5e::2 dev eth0"}
	check("first apply", all, want4, want6)
	skipped := a.logs.take("Ignoring lease")
	// An IPv4-only lease among dual-stack nodes is not a fault: only its
	// IPv4 subnet is routed, silently.
	if len(skipped) != 1 || !strings.Contains(skipped[0], "its PublicIPv6 fd99::7 is not on a network directly connected to eth0") {
		t.Errorf("logged as ignored:\n%s\nwant the far lease's PublicIPv6 only", strings.Join(skipped, "\n"))
	}
	check("second apply", all, want4, want6)
	if n := len(a.logs.take("Ignoring lease")); n != 0 {
		t.Errorf("%d leases logged as ignored again", n)
	}

	if err := b.be.Apply(ctx, b.lease, []subnet.Lease{a.lease}); err != nil {
		t.Fatal(err)
	}
	addNoDAD(t, a.ns.NL, mustLink(t, a.ns.NL, "lo"), netip.MustParsePrefix("fc00:5:0:1::1/128"))
	addNoDAD(t, b.ns.NL, mustLink(t, b.ns.NL, "lo"), netip.MustParsePrefix("fc00:5:0:2::1/128"))
	ping(t, a.ns, "-6", "-I", "fc00:5:0:1::1", "fc00:5:0:2::1")

	// A route deleted by hand comes back.
	if err := a.ns.NL.RouteDel(&netlink.Route{Dst: ip.IPNet(b.lease.IPv6Subnet), LinkIndex: a.eth0.Attrs().Index}); err != nil {
		t.Fatal(err)
	}
	if got := gatewayRoutes6(t, a.ns.NL); len(got) != 0 {
		t.Fatalf("route still there after deleting it: %v", got)
	}
	check("route deleted by hand", all, want4, want6)

	// A changed PublicIPv6 moves the route.
	moved := b.lease
	moved.Attrs.PublicIPv6 = netip.MustParseAddr("fd5e::22")
	check("PublicIPv6 changed", []subnet.Lease{moved, far, v4only}, want4, []string{"fc00:5:0:2::/64 via fd5e::22 dev eth0"})

	check("lease removed", []subnet.Lease{far, v4only}, want4[1:], nil)
	check("no leases", nil, nil, nil)
}

func TestHostGWIPv6OnlyInNetns(t *testing.T) {
	a, b := newDualNodes(t, `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00:5::/48","Backend":{"Type":"host-gw"}}`)
	ctx := context.Background()
	for _, x := range []struct{ n, peer *dualNode }{{a, b}, {b, a}} {
		if err := x.n.be.Apply(ctx, x.n.lease, []subnet.Lease{x.peer.lease}); err != nil {
			t.Fatal(err)
		}
	}
	if got, want := gatewayRoutes6(t, a.ns.NL), []string{"fc00:5:0:2::/64 via fd5e::2 dev eth0"}; !slices.Equal(got, want) {
		t.Errorf("IPv6 routes %v, want %v", got, want)
	}
	if got := gatewayRoutes(t, a.ns.NL); len(got) != 0 {
		t.Errorf("IPv4 routes in an IPv6-only overlay: %v", got)
	}
	addNoDAD(t, a.ns.NL, mustLink(t, a.ns.NL, "lo"), netip.MustParsePrefix("fc00:5:0:1::1/128"))
	addNoDAD(t, b.ns.NL, mustLink(t, b.ns.NL, "lo"), netip.MustParsePrefix("fc00:5:0:2::1/128"))
	ping(t, b.ns, "-6", "-I", "fc00:5:0:2::1", "fc00:5:0:1::1")
}

func mustLink(t *testing.T, h *nlbatch.Handle, name string) netlink.Link {
	t.Helper()
	l, err := h.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// TestHostGWIPv6InitErrors: IPv6 without an IPv6 address, or with a
// --public-ipv6 other than the interface's, fails Init with one line.
func TestHostGWIPv6InitErrors(t *testing.T) {
	cfg := mustConfig(t, `{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00:5::/48","Backend":{"Type":"host-gw"}}`)
	for _, tt := range []struct {
		name    string
		ext     func(*backend.ExternalInterface)
		wantErr string
	}{
		{"no IPv6 address", func(*backend.ExternalInterface) {}, "EnableIPv6 is set but interface eth0 has no global IPv6 address"},
		{"other public IPv6", func(e *backend.ExternalInterface) {
			e.IfaceAddrV6, e.PublicIPv6 = netip.MustParseAddr("fd5e::1"), netip.MustParseAddr("fd5e::99")
		}, "--public-ipv6 fd5e::99 is not fd5e::1"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			o := testOptions(t, nil)
			o.Config = cfg
			tt.ext(&o.Ext)
			be, err := newHostGW(o, newFakeKernel())
			if err != nil {
				t.Fatal(err)
			}
			_, err = be.Init(context.Background())
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) || strings.Contains(err.Error(), "\n") {
				t.Errorf("Init = %v, want one line containing %q", err, tt.wantErr)
			}
		})
	}
}
