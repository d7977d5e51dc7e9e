package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/backend/kwatch"
	"github.com/flanneld-go/flanneld/e2e/lab"
)

// repairArgs put the route resync an hour away, so that a repair can only
// come from a kernel event, and serve /metrics.
var repairArgs = []string{"--route-resync", "3600", "--healthz-port", "8471", "--healthz-ip", "127.0.0.1"}

var reconcileLine = regexp.MustCompile(`(?m)^flannel_reconciles_total\{cause="([^"]+)"\} (\S+)$`)

// reconciles reads flannel_reconciles_total of h's daemon by cause.
func reconciles(ctx context.Context, h *lab.Host) (map[string]float64, error) {
	_, body, err := httpGet(ctx, h, "http://127.0.0.1:8471/metrics")
	if err != nil {
		return nil, err
	}
	m := map[string]float64{}
	for _, s := range reconcileLine.FindAllStringSubmatch(body, -1) {
		v, err := strconv.ParseFloat(s[2], 64)
		if err != nil {
			return nil, fmt.Errorf("metric flannel_reconciles_total{cause=%q} = %q: %w", s[1], s[2], err)
		}
		m[s[1]] = v
	}
	return m, nil
}

// kernelReconciles is the number of reconciles kernel events called for.
func kernelReconciles(m map[string]float64) float64 {
	n := 0.0
	for _, c := range kwatch.Causes {
		n += m[string(c)]
	}
	return n
}

// wantCauses checks that h's daemon reconciled on kernel events, for each
// of causes at least once, and never for the resync.
func wantCauses(t *testing.T, h *lab.Host, causes ...string) {
	t.Helper()
	got, err := reconciles(testCtx(t, converge), h)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: reconciles by cause %v", h.Name, got)
	for _, c := range causes {
		if got[c] < 1 {
			t.Errorf("%s: no reconcile of cause %s: %v", h.Name, c, got)
		}
	}
	if kernelReconciles(got) < 1 {
		t.Errorf("%s: no reconcile caused by a kernel event: %v", h.Name, got)
	}
	if got["resync"] > 0 {
		t.Errorf("%s: %v reconciles of the resync, which is an hour away", h.Name, got["resync"])
	}
}

// delNeighs deletes the entries of family on dev whose keep returns false.
func delNeighs(nh *netlink.Handle, dev string, family int, match func(n netlink.Neigh) bool) error {
	link, err := nh.LinkByName(dev)
	if err != nil {
		return err
	}
	ns, err := nh.NeighList(link.Attrs().Index, family)
	if err != nil {
		return err
	}
	var errs []error
	n := 0
	for _, e := range ns {
		if e.LinkIndex == link.Attrs().Index && match(e) {
			errs = append(errs, nh.NeighDel(&e))
			n++
		}
	}
	if n == 0 {
		return fmt.Errorf("no entry of family %d on %s to delete", family, dev)
	}
	return errors.Join(errs...)
}

// vxlanEdit is a change to a host's vxlan state and the cause of the
// reconcile that undoes it ("" for any kernel event: a change that makes
// several events is counted under the first one seen).
type vxlanEdit struct {
	what, cause string
	edit        func(nh *netlink.Handle) error
}

// vxlanEdits are what TestRepairVXLAN and BenchmarkRepair do to host 1's
// vxlan state, each undone by the daemon on the kernel's events alone.
func vxlanEdits(w vxlanWorld) []vxlanEdit {
	peer := w.envs[1].Subnet.Masked()
	peerAddr := net.IP(w.hosts[1].Addr.AsSlice())
	return []vxlanEdit{
		{"deleting the route to host2's subnet", "route-deleted", func(nh *netlink.Handle) error {
			return nh.RouteDel(&netlink.Route{Dst: ipNet(peer)})
		}},
		{"deleting host2's fdb entry", "neigh-deleted", func(nh *netlink.Handle) error {
			return delNeighs(nh, vxlanDev, unix.AF_BRIDGE, func(n netlink.Neigh) bool { return n.IP.Equal(peerAddr) })
		}},
		{"deleting host2's neighbour", "neigh-deleted", func(nh *netlink.Handle) error {
			return delNeighs(nh, vxlanDev, netlink.FAMILY_V4, func(n netlink.Neigh) bool { return n.IP.Equal(peer.Addr().AsSlice()) })
		}},
		{"pointing host2's neighbour at another MAC", "neigh-changed", func(nh *netlink.Handle) error {
			time.Sleep(2 * kwatch.EchoWindow) // not right after the daemon's own writes
			link, err := nh.LinkByName(vxlanDev)
			if err != nil {
				return err
			}
			return nh.NeighSet(&netlink.Neigh{LinkIndex: link.Attrs().Index, Family: unix.AF_INET, State: unix.NUD_PERMANENT,
				IP: peer.Addr().AsSlice(), HardwareAddr: net.HardwareAddr{2, 0, 0, 0, 0, 0x99}})
		}},
		{"pointing host2's fdb entry at another host", "neigh-changed", func(nh *netlink.Handle) error {
			time.Sleep(2 * kwatch.EchoWindow) // not right after the daemon's own writes
			link, err := nh.LinkByName(vxlanDev)
			if err != nil {
				return err
			}
			mac, err := net.ParseMAC(w.macs[1])
			if err != nil {
				return err
			}
			return nh.NeighSet(&netlink.Neigh{LinkIndex: link.Attrs().Index, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF,
				State: unix.NUD_PERMANENT, IP: w.hosts[1].Addr.Next().AsSlice(), HardwareAddr: mac})
		}},
		{"removing the address of " + vxlanDev, "", func(nh *netlink.Handle) error {
			link, err := nh.LinkByName(vxlanDev)
			if err != nil {
				return err
			}
			return nh.AddrDel(link, &netlink.Addr{IPNet: &net.IPNet{IP: w.envs[0].Subnet.Masked().Addr().AsSlice(), Mask: net.CIDRMask(32, 32)}})
		}},
		{"setting " + vxlanDev + " down", "", func(nh *netlink.Handle) error {
			link, err := nh.LinkByName(vxlanDev)
			if err != nil {
				return err
			}
			return nh.LinkSetDown(link)
		}},
		{"deleting " + vxlanDev, "", func(nh *netlink.Handle) error {
			link, err := nh.LinkByName(vxlanDev)
			if err != nil {
				return err
			}
			return nh.LinkDel(link)
		}},
	}
}

// TestRepairVXLAN edits host1's vxlan state under daemons whose resync is
// an hour away: a route, an fdb entry and a neighbour deleted, the
// neighbour given another MAC, the fdb entry another host, the address of flannel.1 removed, flannel.1 set down, flannel.1 deleted (it
// comes back with the same MAC and all its entries), eth0 taken down and
// up. Each is undone on the kernel's events and traffic flows again; the
// metrics name the causes.
func TestRepairVXLAN(t *testing.T) {
	t.Parallel()
	l := newLab(t, 2, vxlanConfig)
	w := vxlanStart(t, l, repairArgs...)
	w.wait(t)
	setBridges(t, w.hosts, w.envs)
	pingAll(t, w.hosts, w.envs)
	h1 := l.Host(1)
	ctx := testCtx(t, 2*converge)
	for _, e := range append(vxlanEdits(w), vxlanEdit{"taking eth0 down and up", "ext-changed", flapEth0(t, h1)}) {
		before, err := reconciles(ctx, h1)
		if err != nil {
			t.Fatal(err)
		}
		// The repair may be quicker than a look at the state: the edit
		// itself fails when it finds nothing to change.
		heal(t, w, e.what, false, e.edit)
		after, err := reconciles(ctx, h1)
		if err != nil {
			t.Fatal(err)
		}
		if e.cause != "" && after[e.cause] <= before[e.cause] {
			t.Errorf("after %s: no reconcile of cause %s (before %v, after %v)", e.what, e.cause, before, after)
		}
		if kernelReconciles(after) <= kernelReconciles(before) {
			t.Errorf("after %s: no reconcile caused by a kernel event (before %v, after %v)", e.what, before, after)
		}
	}
	wantCauses(t, h1)
}

// TestRepairVXLANDirectRouting takes eth0 down and up under vxlan
// daemons with DirectRouting whose resync is an hour away: the kernel
// drops the routes via the peer's eth0 address, and they come back on the
// kernel's events.
func TestRepairVXLANDirectRouting(t *testing.T) {
	t.Parallel()
	l := newLab(t, 2, vxlanDirectConfig)
	w := vxlanStart(t, l, repairArgs...)
	w.direct = true
	w.wait(t)
	setBridges(t, w.hosts, w.envs)
	pingAll(t, w.hosts, w.envs)
	h1 := l.Host(1)
	if err := withNetlink(h1, flapEth0(t, h1)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "host1's routes back after the eth0 flap", func() error { return w.check(0) })
	pingAll(t, w.hosts, w.envs)
	wantCauses(t, h1, "ext-changed")
}

// TestRepairVXLANIPv6 deletes flannel-v6.1 on a dual-stack host under
// daemons whose resync is an hour away: it comes back at once with its
// MAC (the one published in the lease) and its address, and ping -6
// passes again.
func TestRepairVXLANIPv6(t *testing.T) {
	t.Parallel()
	cfg := `{"EnableIPv4":true,"EnableIPv6":true,"Network":"10.5.0.0/16","IPv6Network":"fc00:5::/48","Backend":{"Type":"vxlan"}}`
	l := newLabWith(t, lab.Options{Hosts: 2, LAN6: netip.MustParsePrefix("fd5e::/64")}, cfg)
	hosts := l.Hosts()
	envs := startAll(t, l, repairArgs...)
	ctx := testCtx(t, 2*converge)
	for i, h := range hosts {
		if err := h.SetBridgeAddr(envs[i].IPv6Subnet); err != nil {
			t.Fatal(err)
		}
	}
	if err := hosts[0].WaitPing(ctx, envs[0].IPv6Subnet.Addr(), envs[1].IPv6Subnet.Addr()); err != nil {
		t.Fatal(err)
	}
	const dev6 = "flannel-v6.1"
	h1 := hosts[0]
	state := func() (string, error) {
		var s string
		err := withNetlink(h1, func(nh *netlink.Handle) error {
			link, err := nh.LinkByName(dev6)
			if err != nil {
				return err
			}
			addrs, err := nh.AddrList(link, netlink.FAMILY_V6)
			if err != nil {
				return err
			}
			s = fmt.Sprintf("%s up=%t", link.Attrs().HardwareAddr, link.Attrs().Flags&net.FlagUp != 0)
			for _, a := range addrs {
				if !a.IP.IsLinkLocalUnicast() {
					s += " " + a.IPNet.String()
				}
			}
			return nil
		})
		return s, err
	}
	before, err := state()
	if err != nil {
		t.Fatal(err)
	}
	err = withNetlink(h1, func(nh *netlink.Handle) error {
		link, err := nh.LinkByName(dev6)
		if err != nil {
			return err
		}
		return nh.LinkDel(link)
	})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, dev6+" back as it was", func() error {
		now, err := state()
		if err == nil && now != before {
			err = fmt.Errorf("%s is %q, want %q", dev6, now, before)
		}
		return err
	})
	if err := hosts[0].WaitPing(ctx, envs[0].IPv6Subnet.Addr(), envs[1].IPv6Subnet.Addr()); err != nil {
		t.Errorf("ping -6 after deleting %s: %v", dev6, err)
	}
	if err := hosts[1].WaitPing(ctx, envs[1].IPv6Subnet.Addr(), envs[0].IPv6Subnet.Addr()); err != nil {
		t.Errorf("ping -6 back after deleting %s: %v", dev6, err)
	}
	wantCauses(t, h1)
}

// TestRepairHostGW deletes a route, points it at another gateway and takes
// eth0 down and up (the kernel drops the routes through it) under host-gw
// daemons whose resync is an hour away: the routes come back on the
// kernel's events.
func TestRepairHostGW(t *testing.T) {
	t.Parallel()
	l := newLab(t, 2, hostGWConfig)
	hosts := l.Hosts()
	envs := startAll(t, l, repairArgs...)
	waitRoutes(t, hosts, envs)
	setBridges(t, hosts, envs)
	pingAll(t, hosts, envs)
	h1 := l.Host(1)
	want := wantRoutes(hosts, envs, 0)
	if err := withNetlink(h1, func(nh *netlink.Handle) error {
		return nh.RouteDel(&netlink.Route{Dst: ipNet(envs[1].Subnet.Masked())})
	}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "host1's route back after its deletion", func() error { return routesAre(h1, want) })
	time.Sleep(2 * kwatch.EchoWindow) // not right after the daemon's own writes
	if out, err := h1.Exec(testCtx(t, converge), "ip", "route", "replace", envs[1].Subnet.Masked().String(), "via", "10.250.0.99", "dev", lab.ExternalIface); err != nil {
		t.Fatalf("pointing the route at another gateway: %v\n%s", err, out)
	}
	eventually(t, "host1's route corrected after pointing it at another gateway", func() error { return routesAre(h1, want) })
	if err := withNetlink(h1, flapEth0(t, h1)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "host1's routes back after the eth0 flap", func() error { return routesAre(h1, want) })
	pingAll(t, hosts, envs)
	wantCauses(t, h1, "route-deleted", "route-changed", "ext-changed")
}

// TestRepairUDP deletes flannel0, sets it down and removes its address
// under udp daemons whose resync is an hour away: each time flannel0 comes
// back as it was (a new TUN when deleted) and traffic flows again.
func TestRepairUDP(t *testing.T) {
	t.Parallel()
	l := newLab(t, 2, udpConfig)
	hosts := l.Hosts()
	envs := startAll(t, l, repairArgs...)
	setBridges(t, hosts, envs)
	pingAll(t, hosts, envs)
	h1 := l.Host(1)
	mtu, err := linkMTU(h1, lab.ExternalIface)
	if err != nil {
		t.Fatal(err)
	}
	ctx := testCtx(t, 2*converge)
	for _, edit := range [][]string{
		{"ip", "link", "del", "flannel0"},
		{"ip", "link", "set", "flannel0", "down"},
		{"ip", "addr", "flush", "dev", "flannel0"},
	} {
		if out, err := h1.Exec(ctx, edit...); err != nil {
			t.Fatalf("%v: %v\n%s", edit, err, out)
		}
		eventually(t, fmt.Sprintf("flannel0 back after %v", edit), func() error { return checkFlannel0(h1, envs[0].Subnet, mtu-28) })
		for _, p := range [][2]int{{0, 1}, {1, 0}} {
			if err := hosts[p[0]].WaitPing(ctx, envs[p[0]].Subnet.Addr(), envs[p[1]].Subnet.Addr()); err != nil {
				t.Errorf("after %v: %v", edit, err)
			}
		}
	}
	wantCauses(t, h1)
}

// TestIdleReconciles runs three vxlan daemons and, once they have
// converged, counts their reconciles over a minute of doing nothing: none.
// The daemons' own writes at the start must not call for more, and there
// is nothing else to repair (the resync is an hour away).
func TestIdleReconciles(t *testing.T) {
	t.Parallel()
	l := newLab(t, 3, vxlanConfig)
	w := vxlanStart(t, l, repairArgs...)
	w.wait(t)
	time.Sleep(2 * time.Second) // what the start still has due (IPv6 DAD on the new devices)
	ctx := testCtx(t, 2*converge)
	before := make([]map[string]float64, len(w.hosts))
	for i, h := range w.hosts {
		m, err := reconciles(ctx, h)
		if err != nil {
			t.Fatal(err)
		}
		before[i] = m
	}
	const idle = time.Minute
	time.Sleep(idle)
	ctx = testCtx(t, converge)
	for i, h := range w.hosts {
		m, err := reconciles(ctx, h)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: reconciles by cause at the start %v, after %v idle %v", h.Name, before[i], idle, m)
		for c, n := range m {
			if n != before[i][c] {
				t.Errorf("%s: %v reconciles of cause %s while idle for %v, want none", h.Name, n-before[i][c], c, idle)
			}
		}
		if before[i]["start"] != 1 {
			t.Errorf("%s: %v reconciles of cause start, want 1", h.Name, before[i]["start"])
		}
	}
}
