package hostgw

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/subnet"
)

// newTestNetNS creates a named network namespace for the test, deleted in
// Cleanup even if the test fails, and returns a netlink handle into it.
// Nothing is done in the caller's namespace.
func newTestNetNS(t *testing.T) *netlink.Handle {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: creating a network namespace needs root")
	}
	name := fmt.Sprintf("flhgw-%d", os.Getpid())
	t.Cleanup(func() {
		if err := netns.DeleteNamed(name); err != nil && !os.IsNotExist(err) {
			t.Errorf("deleting network namespace %s: %v", name, err)
		}
		if _, err := os.Stat("/run/netns/" + name); !os.IsNotExist(err) {
			t.Errorf("network namespace %s left behind", name)
		}
	})
	type result struct {
		ns  netns.NsHandle
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// NewNamed moves this thread into the new namespace; move it back.
		// If that fails the thread stays locked and dies with the goroutine.
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
		t.Fatalf("creating network namespace %s: %v", name, r.err)
	}
	t.Cleanup(func() { r.ns.Close() })
	h, err := netlink.NewHandleAt(r.ns)
	if err != nil {
		t.Fatalf("opening netlink in %s: %v", name, err)
	}
	t.Cleanup(h.Close)
	return h
}

// addLink creates an up veth link (its peer name+"p" up too, for carrier)
// with address cidr in the namespace of h.
func addLink(t *testing.T, h *netlink.Handle, name, cidr string) netlink.Link {
	t.Helper()
	if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}); err != nil {
		t.Fatalf("adding link %s: %v", name, err)
	}
	for _, n := range []string{name + "p", name} {
		l, err := h.LinkByName(n)
		if err != nil {
			t.Fatal(err)
		}
		if err := h.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	l, err := h.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	p := netip.MustParsePrefix(cidr)
	if err := h.AddrAdd(l, &netlink.Addr{IPNet: ip.HostNet(p.Addr(), p.Bits())}); err != nil {
		t.Fatalf("adding %s to %s: %v", cidr, name, err)
	}
	return l
}

// gatewayRoutes lists the main table's routes with a gateway, sorted.
func gatewayRoutes(t *testing.T, h *netlink.Handle) []string {
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
	h := newTestNetNS(t)
	eth0 := addLink(t, h, "eth0", "10.250.0.1/24")
	eth1 := addLink(t, h, "eth1", "10.251.0.1/24")
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
		lease("10.5.4.0/24", "10.250.0.4", "vxlan"),
		lease("10.5.5.0/24", "192.0.2.5", Type), // not on eth0's network
	}
	check("first apply", leases, "10.5.2.0/24 via 10.250.0.2 dev eth0", "10.5.3.0/24 via 10.250.0.3 dev eth0")
	if n := len(logs.take("Ignoring lease")); n != 2 {
		t.Errorf("%d leases logged as ignored, want 2", n)
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
