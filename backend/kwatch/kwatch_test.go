package kwatch

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2/ktesting"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/internal/nstest"
	"github.com/flanneld-go/flanneld/pkg/nlbatch"
)

func ipnet(s string) *net.IPNet {
	p := netip.MustParsePrefix(s)
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// TestFilter feeds events to the filter: only those that remove or
// disable owned state are causes, and a listing only records state.
func TestFilter(t *testing.T) {
	f := newFilter(backend.Owned{Devices: []string{"flannel.1"}, ExtIndex: 2,
		Prefixes: []netip.Prefix{netip.MustParsePrefix("10.5.0.0/16"), netip.MustParsePrefix("fd00:5::/56")}})
	dev := func(typ uint16, idx int32, flags uint32, name string, mtu int, multi bool) netlink.LinkUpdate {
		u := netlink.LinkUpdate{Link: &netlink.Vxlan{LinkAttrs: netlink.LinkAttrs{Name: name, Index: int(idx), MTU: mtu,
			HardwareAddr: net.HardwareAddr{2, 0, 0, 0, 0, 1}}}}
		u.Header.Type, u.Index, u.Flags = typ, idx, flags
		if multi {
			u.Header.Flags = unix.NLM_F_MULTI
		}
		return u
	}
	up := uint32(unix.IFF_UP | unix.IFF_LOWER_UP)
	steps := []struct {
		what string
		got  Cause
		want Cause
	}{
		{"listing: flannel.1 down", f.link(dev(unix.RTM_NEWLINK, 7, 0, "flannel.1", 1450, true)), ""},
		{"listing: eth0 up", f.link(dev(unix.RTM_NEWLINK, 2, up, "eth0", 1500, true)), ""},
		{"flannel.1 set up", f.link(dev(unix.RTM_NEWLINK, 7, up, "flannel.1", 1450, false)), ""},
		{"flannel.1 set down", f.link(dev(unix.RTM_NEWLINK, 7, 0, "flannel.1", 1450, false)), LinkChanged},
		{"flannel.1 MTU changed", f.link(dev(unix.RTM_NEWLINK, 7, up, "flannel.1", 1400, false)), LinkChanged},
		{"flannel.1 unchanged", f.link(dev(unix.RTM_NEWLINK, 7, up, "flannel.1", 1400, false)), ""},
		{"another link down", f.link(dev(unix.RTM_NEWLINK, 9, 0, "veth9", 1500, false)), ""},
		{"eth0 unchanged", f.link(dev(unix.RTM_NEWLINK, 2, up, "eth0", 1500, false)), ""},
		{"eth0 down", f.link(dev(unix.RTM_NEWLINK, 2, 0, "eth0", 1500, false)), ExtChanged},
		{"eth0 up", f.link(dev(unix.RTM_NEWLINK, 2, up, "eth0", 1500, false)), ExtChanged},
		{"route into Network deleted", f.route(netlink.RouteUpdate{Type: unix.RTM_DELROUTE, Route: netlink.Route{Dst: ipnet("10.5.7.0/24"), Table: unix.RT_TABLE_MAIN}}), RouteDeleted},
		{"IPv6 route into IPv6Network deleted", f.route(netlink.RouteUpdate{Type: unix.RTM_DELROUTE, Route: netlink.Route{Dst: ipnet("fd00:5:0:7::/64"), Table: unix.RT_TABLE_MAIN}}), RouteDeleted},
		{"route into Network added", f.route(netlink.RouteUpdate{Type: unix.RTM_NEWROUTE, Route: netlink.Route{Dst: ipnet("10.5.7.0/24"), Table: unix.RT_TABLE_MAIN}}), RouteChanged},
		{"route elsewhere added", f.route(netlink.RouteUpdate{Type: unix.RTM_NEWROUTE, Route: netlink.Route{Dst: ipnet("10.6.7.0/24"), Table: unix.RT_TABLE_MAIN}}), ""},
		{"route elsewhere deleted", f.route(netlink.RouteUpdate{Type: unix.RTM_DELROUTE, Route: netlink.Route{Dst: ipnet("10.6.7.0/24"), Table: unix.RT_TABLE_MAIN}}), ""},
		{"route larger than Network deleted", f.route(netlink.RouteUpdate{Type: unix.RTM_DELROUTE, Route: netlink.Route{Dst: ipnet("10.0.0.0/8"), Table: unix.RT_TABLE_MAIN}}), ""},
		{"route of another table deleted", f.route(netlink.RouteUpdate{Type: unix.RTM_DELROUTE, Route: netlink.Route{Dst: ipnet("10.5.7.0/24"), Table: 100}}), ""},
		{"default route deleted", f.route(netlink.RouteUpdate{Type: unix.RTM_DELROUTE, Route: netlink.Route{Table: unix.RT_TABLE_MAIN}}), ""},
		{"neighbour of flannel.1 deleted", f.neigh(netlink.NeighUpdate{Type: unix.RTM_DELNEIGH, Neigh: netlink.Neigh{LinkIndex: 7}}), NeighDeleted},
		{"resolved neighbour of flannel.1 added", f.neigh(netlink.NeighUpdate{Type: unix.RTM_NEWNEIGH, Neigh: netlink.Neigh{LinkIndex: 7, State: unix.NUD_REACHABLE}}), ""},
		{"permanent neighbour of flannel.1 added", f.neigh(netlink.NeighUpdate{Type: unix.RTM_NEWNEIGH, Neigh: netlink.Neigh{LinkIndex: 7, State: unix.NUD_PERMANENT}}), NeighChanged},
		{"permanent neighbour of eth0 added", f.neigh(netlink.NeighUpdate{Type: unix.RTM_NEWNEIGH, Neigh: netlink.Neigh{LinkIndex: 2, State: unix.NUD_PERMANENT}}), ""},
		{"neighbour of eth0 deleted", f.neigh(netlink.NeighUpdate{Type: unix.RTM_DELNEIGH, Neigh: netlink.Neigh{LinkIndex: 2}}), ""},
		{"address of flannel.1 deleted", f.addr(netlink.AddrUpdate{LinkIndex: 7, LinkAddress: *ipnet("10.5.1.0/32")}), AddrDeleted},
		{"address of flannel.1 added", f.addr(netlink.AddrUpdate{LinkIndex: 7, LinkAddress: *ipnet("10.5.1.0/32"), NewAddr: true}), ""},
		{"address of eth0 added", f.addr(netlink.AddrUpdate{LinkIndex: 2, LinkAddress: *ipnet("10.250.0.1/24"), NewAddr: true}), ExtChanged},
		{"address of eth0 announced again", f.addr(netlink.AddrUpdate{LinkIndex: 2, LinkAddress: *ipnet("10.250.0.1/24"), NewAddr: true}), ""},
		{"address of eth0 deleted", f.addr(netlink.AddrUpdate{LinkIndex: 2, LinkAddress: *ipnet("10.250.0.1/24")}), ExtChanged},
		{"link-local address of eth0 added", f.addr(netlink.AddrUpdate{LinkIndex: 2, LinkAddress: *ipnet("fe80::1/64"), NewAddr: true}), ""},
		{"address of another link deleted", f.addr(netlink.AddrUpdate{LinkIndex: 9, LinkAddress: *ipnet("10.5.9.1/24")}), ""},
		{"flannel.1 deleted", f.link(dev(unix.RTM_DELLINK, 7, 0, "flannel.1", 1400, false)), LinkChanged},
		{"neighbour of the deleted index deleted", f.neigh(netlink.NeighUpdate{Type: unix.RTM_DELNEIGH, Neigh: netlink.Neigh{LinkIndex: 7}}), ""},
		{"flannel.1 re-created down", f.link(dev(unix.RTM_NEWLINK, 8, 0, "flannel.1", 1450, false)), LinkChanged},
		{"flannel.1 set up again", f.link(dev(unix.RTM_NEWLINK, 8, up, "flannel.1", 1450, false)), ""},
		{"neighbour of the new flannel.1 deleted", f.neigh(netlink.NeighUpdate{Type: unix.RTM_DELNEIGH, Neigh: netlink.Neigh{LinkIndex: 8}}), NeighDeleted},
		{"flannel.1 renamed", f.link(dev(unix.RTM_NEWLINK, 8, up, "other", 1450, false)), LinkChanged},
		{"eth0 deleted", f.link(dev(unix.RTM_DELLINK, 2, 0, "eth0", 1500, false)), ExtChanged},
	}
	for _, s := range steps {
		if s.got != s.want {
			t.Errorf("%s: cause %q, want %q", s.what, s.got, s.want)
		}
	}
}

// kernelLab is a namespace with eth0 (a veth with an address) and
// flannel.1 (a vxlan device on it, address 10.5.1.0/32), a route into
// 10.5.0.0/16 through each, a neighbour and an fdb entry.
type kernelLab struct {
	ns         *nstest.NS
	eth0, vtep netlink.Link
	w          *Watcher
}

func newKernelLab(t *testing.T, recvBuffer int) *kernelLab {
	ns := nstest.New(t, "kwatch")
	eth0 := ns.Veth(t, "eth0", 0, nil, "eth0p", "10.250.0.1/24")
	vx := &netlink.Vxlan{LinkAttrs: netlink.LinkAttrs{Name: "flannel.1", MTU: 1450}, VxlanId: 1, VtepDevIndex: eth0.Attrs().Index,
		SrcAddr: net.IPv4(10, 250, 0, 1), Port: 8472}
	if err := ns.NL.LinkAdd(vx); err != nil {
		t.Fatal(err)
	}
	vtep := ns.Up(t, "flannel.1", "10.5.1.0/32")
	k := &kernelLab{ns: ns, eth0: eth0, vtep: vtep}
	k.w = New(Options{Owned: backend.Owned{Devices: []string{"flannel.1"}, ExtIndex: eth0.Attrs().Index,
		Prefixes: []netip.Prefix{netip.MustParsePrefix("10.5.0.0/16")}}, Netns: &ns.Handle, RecvBuffer: recvBuffer,
		Logger: ktesting.NewLogger(t, ktesting.NewConfig(ktesting.Verbosity(1)))})
	if err := k.w.Start(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- k.w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	return k
}

// want makes a change and waits until the watcher has been quiet for 200 ms (300 ms at
// first; 5 s when a cause is expected): the change must have been counted
// under cause c, or, for c == "", under none. A change may count under more
// than one (a link set down loses its IPv6 addresses too).
func (k *kernelLab) want(t *testing.T, what string, c Cause, change func() error) {
	t.Helper()
	before := k.w.Counts()
	if err := change(); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	wait := 300 * time.Millisecond
	if c != "" {
		wait = 5 * time.Second
	}
	for {
		select {
		case <-k.w.C():
			wait = 200 * time.Millisecond
			continue
		case <-time.After(wait):
		}
		break
	}
	seen := map[Cause]uint64{}
	for cause, n := range k.w.Counts() {
		if d := n - before[cause]; d > 0 {
			seen[cause] = d
		}
	}
	switch {
	case c == "" && len(seen) > 0:
		t.Errorf("%s: causes %v, want none", what, seen)
	case c != "" && seen[c] == 0:
		t.Errorf("%s: causes %v, want %q among them", what, seen, c)
	}
}

// TestWatcherKernelEvents makes changes in a namespace: the daemon's kind
// of writes (additions) cause nothing, removals and links going down do.
func TestWatcherKernelEvents(t *testing.T) {
	k := newKernelLab(t, 0)
	nl, vi, ei := k.ns.NL, k.vtep.Attrs().Index, k.eth0.Attrs().Index
	k.want(t, "idle after the start", "", func() error { return nil })

	routeVtep := nlbatch.Route{Dst: netip.MustParsePrefix("10.5.2.0/24"), Gw: netip.MustParseAddr("10.5.2.0"), LinkIndex: vi, Onlink: true}
	routeExt := nlbatch.Route{Dst: netip.MustParsePrefix("10.5.3.0/24"), Gw: netip.MustParseAddr("10.250.0.3"), LinkIndex: ei}
	routeElse := nlbatch.Route{Dst: netip.MustParsePrefix("10.7.3.0/24"), Gw: netip.MustParseAddr("10.250.0.3"), LinkIndex: ei}
	mac := [6]byte{2, 0, 0, 0, 0, 2}
	neigh := nlbatch.Neigh{LinkIndex: vi, Family: unix.AF_INET, State: unix.NUD_PERMANENT, IP: netip.MustParseAddr("10.5.2.0"), MAC: mac}
	fdb := nlbatch.Neigh{LinkIndex: vi, Family: unix.AF_BRIDGE, State: unix.NUD_PERMANENT, Flags: unix.NTF_SELF, IP: netip.MustParseAddr("10.250.0.2"), MAC: mac}
	k.want(t, "the daemon's writes: routes, a neighbour and an fdb entry added or replaced", "", func() error {
		k.w.Writing(true)
		defer k.w.Writing(false)
		return errors.Join(nl.SetNeighs([]nlbatch.Neigh{neigh, fdb}, nil),
			nl.ReplaceRoutes([]nlbatch.Route{routeVtep, routeExt, routeElse}, nil),
			nl.ReplaceRoutes([]nlbatch.Route{routeVtep, routeExt}, nil))
	})
	time.Sleep(EchoWindow)
	k.want(t, "someone else's route outside Network added", "", func() error {
		return nl.ReplaceRoutes([]nlbatch.Route{routeElse}, nil)
	})
	k.want(t, "someone else pointing a route at another gateway", RouteChanged, func() error {
		wrong := routeExt
		wrong.Gw = netip.MustParseAddr("10.250.0.99")
		return nl.ReplaceRoutes([]nlbatch.Route{wrong}, nil)
	})
	k.want(t, "someone else giving a neighbour another MAC", NeighChanged, func() error {
		wrong := neigh
		wrong.MAC = [6]byte{2, 0, 0, 0, 0, 0x99}
		return nl.SetNeighs([]nlbatch.Neigh{wrong}, nil)
	})
	k.want(t, "someone else pointing an fdb entry at another host", NeighChanged, func() error {
		wrong := fdb
		wrong.IP = netip.MustParseAddr("10.250.0.99")
		return nl.SetNeighs([]nlbatch.Neigh{wrong}, nil)
	})
	k.want(t, "the daemon's writes putting them back", "", func() error {
		k.w.Writing(true)
		defer k.w.Writing(false)
		return errors.Join(nl.SetNeighs([]nlbatch.Neigh{neigh, fdb}, nil), nl.ReplaceRoutes([]nlbatch.Route{routeExt}, nil))
	})
	time.Sleep(EchoWindow)
	k.want(t, "a route outside Network deleted", "", func() error { return nl.DeleteRoutes([]nlbatch.Route{routeElse}, nil) })
	k.want(t, "a route through eth0 deleted", RouteDeleted, func() error { return nl.DeleteRoutes([]nlbatch.Route{routeExt}, nil) })
	k.want(t, "a route through flannel.1 deleted", RouteDeleted, func() error { return nl.DeleteRoutes([]nlbatch.Route{routeVtep}, nil) })
	k.want(t, "an fdb entry deleted", NeighDeleted, func() error { return nl.DeleteNeighs([]nlbatch.Neigh{fdb}, nil) })
	k.want(t, "a neighbour deleted", NeighDeleted, func() error { return nl.DeleteNeighs([]nlbatch.Neigh{neigh}, nil) })

	k.want(t, "the address of flannel.1 deleted", AddrDeleted, func() error { return nl.AddrDel(k.vtep, &netlink.Addr{IPNet: ipnet("10.5.1.0/32")}) })
	k.want(t, "the address of flannel.1 added", "", func() error { return nl.AddrAdd(k.vtep, &netlink.Addr{IPNet: ipnet("10.5.1.0/32")}) })

	k.want(t, "flannel.1 set down", LinkChanged, func() error { return nl.LinkSetDown(k.vtep) })
	k.want(t, "flannel.1 set up", "", func() error { return nl.LinkSetUp(k.vtep) })
	k.want(t, "flannel.1's MAC changed", LinkChanged, func() error { return nl.LinkSetHardwareAddr(k.vtep, net.HardwareAddr{2, 0, 0, 0, 0, 9}) })

	k.want(t, "eth0 set down", ExtChanged, func() error { return nl.LinkSetDown(k.eth0) })
	k.want(t, "eth0 set up", ExtChanged, func() error { return nl.LinkSetUp(k.eth0) })
	k.want(t, "eth0's address deleted", ExtChanged, func() error { return nl.AddrDel(k.eth0, &netlink.Addr{IPNet: ipnet("10.250.0.1/24")}) })
	k.want(t, "eth0's address added", ExtChanged, func() error { return nl.AddrAdd(k.eth0, &netlink.Addr{IPNet: ipnet("10.250.0.1/24")}) })

	k.want(t, "flannel.1 deleted", LinkChanged, func() error { return nl.LinkDel(k.vtep) })
}

// TestWatcherOverflow deletes 10,000 routes at once with a receive
// buffer far too small for their notifications: the watcher says events
// were lost, subscribes again, and then sees changes as before.
func TestWatcherOverflow(t *testing.T) {
	k := newKernelLab(t, 16<<10)
	nl, ei := k.ns.NL, k.eth0.Attrs().Index
	routes := make([]nlbatch.Route, 10000)
	for i := range routes {
		routes[i] = nlbatch.Route{Dst: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 7, byte(i >> 8), byte(i)}), 32),
			Gw: netip.MustParseAddr("10.250.0.3"), LinkIndex: ei}
	}
	if err := nl.ReplaceRoutes(routes, nil); err != nil {
		t.Fatal(err)
	}
	k.want(t, "10,000 routes outside Network deleted", EventsLost, func() error { return nl.DeleteRoutes(routes, nil) })
	k.want(t, "flannel.1 set down after the overflow", LinkChanged, func() error { return nl.LinkSetDown(k.vtep) })
}
