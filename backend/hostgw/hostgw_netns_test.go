package hostgw

import (
	"context"
	"fmt"
	"net"
	"net/netip"
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

// gatewayRoutes lists the main table's routes with a gateway, sorted.
func gatewayRoutes(t *testing.T, h *nlbatch.Handle) []string {
	t.Helper()
	rs, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
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

// TestHostGWInNetns runs the registered backend against a real kernel in a
// fresh namespace.
func TestHostGWInNetns(t *testing.T) {
	// Up veth links, their peers up too for carrier.
	ns := nstest.New(t, "flhgw")
	h := ns.NL
	eth0 := ns.Veth(t, "eth0", 0, nil, "eth0p", "10.250.0.1/24")
	eth1 := ns.Veth(t, "eth1", 0, nil, "eth1p", "10.251.0.1/24")
	add := func(dst, gw string, link netlink.Link) {
		t.Helper()
		r := &netlink.Route{Dst: ip.IPNet(netip.MustParsePrefix(dst)), Gw: ip.IP(netip.MustParseAddr(gw)), LinkIndex: link.Attrs().Index}
		if err := h.RouteAdd(r); err != nil {
			t.Fatalf("adding route %s via %s: %v", dst, gw, err)
		}
	}
	// Foreign: inside Network on another link; outside Network on eth0.
	add("10.5.8.0/24", "10.251.0.8", eth1)
	add("172.16.0.0/24", "10.250.0.7", eth0)
	foreign := gatewayRoutes(t, h)
	// A lease that expired while the daemon was down.
	add("10.5.9.0/24", "10.250.0.9", eth0)

	cfg, err := subnet.ParseConfig([]byte(`{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}`))
	if err != nil {
		t.Fatal(err)
	}
	a := eth0.Attrs()
	addr := netip.MustParseAddr("10.250.0.1")
	logs := &logSink{}
	be, err := backend.New(Type, backend.Options{
		Ext: backend.ExternalInterface{
			Iface:     &net.Interface{Index: a.Index, MTU: a.MTU, Name: a.Name, HardwareAddr: a.HardwareAddr},
			IfaceAddr: addr,
			PublicIP:  addr,
		},
		Config:  cfg,
		Netlink: h,
		Logger:  logs.logger(),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { be.Close() })
	ctx := context.Background()
	pub, err := be.Init(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if pub.MTU != a.MTU || pub.BackendData != nil {
		t.Errorf("Publish = %+v, want MTU %d, no BackendData", pub, a.MTU)
	}

	own := lease("10.5.1.0/24", "10.250.0.1", Type)
	check := func(step string, remote []subnet.Lease, ours ...string) {
		t.Helper()
		if err := be.Apply(ctx, own, remote); err != nil {
			t.Fatalf("%s: Apply: %v", step, err)
		}
		want := append(slices.Clone(foreign), ours...)
		slices.Sort(want)
		if got := gatewayRoutes(t, h); !slices.Equal(got, want) {
			t.Errorf("%s: routes:\n%s\nwant:\n%s", step, strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
	}
	leases := []subnet.Lease{
		lease("10.5.2.0/24", "10.250.0.2", Type),
		lease("10.5.3.0/24", "10.250.0.3", Type),
		lease("10.5.5.0/24", "192.0.2.5", Type), // not on eth0's network
	}
	check("first apply", leases, "10.5.2.0/24 via 10.250.0.2 dev eth0", "10.5.3.0/24 via 10.250.0.3 dev eth0")
	if n := len(logs.take("Ignoring lease")); n != 1 {
		t.Errorf("%d leases logged as ignored, want 1", n)
	}
	check("second apply", leases, "10.5.2.0/24 via 10.250.0.2 dev eth0", "10.5.3.0/24 via 10.250.0.3 dev eth0")
	if n := len(logs.take("Ignoring lease")); n != 0 {
		t.Errorf("%d leases logged as ignored again", n)
	}

	if err := h.RouteDel(&netlink.Route{Dst: ip.IPNet(netip.MustParsePrefix("10.5.2.0/24")), LinkIndex: eth0.Attrs().Index}); err != nil {
		t.Fatal(err)
	}
	check("route deleted by hand", leases, "10.5.2.0/24 via 10.250.0.2 dev eth0", "10.5.3.0/24 via 10.250.0.3 dev eth0")

	leases[1].Attrs.PublicIP = netip.MustParseAddr("10.250.0.33")
	check("PublicIP changed", leases, "10.5.2.0/24 via 10.250.0.2 dev eth0", "10.5.3.0/24 via 10.250.0.33 dev eth0")

	check("lease removed", leases[1:], "10.5.3.0/24 via 10.250.0.33 dev eth0")
	check("no leases", nil)
	if err := be.Close(); err != nil {
		t.Fatal(err)
	}
}
