package e2e

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/e2e/lab"
	"github.com/flanneld-go/flanneld/pkg/nlbatch"
)

// BenchmarkRepair measures how long the daemon takes to undo an edit of
// its kernel state, on the kernel's events (the resync is an hour away),
// on host1 of a two-host lab; median and p90 over the runs (use
// -benchtime 25x). The clock starts just before the edit's (last) netlink
// call, since the kernel announces a change before the call returns (a
// link deletion returns only after RCU grace periods), and stops when the benchmark's own netlink subscription in the host's
// namespace sees the state come back:
//
//   - route: vxlan, the route to host2's subnet deleted, until it is added;
//   - fdb: vxlan, host2's fdb entry deleted, until it is added;
//   - flannel.1: vxlan, flannel.1 deleted, until a ping from host1's
//     bridge to host2's is answered through it (one echo every 2 ms) and
//     host1's vxlan state is complete again (device with its MAC and
//     address, neighbour, fdb entry, route; read after the ping, so this
//     includes one read of the state); linkdel- is the deletion call
//     alone, which returns only after the kernel's RCU grace periods;
//   - host-gw-eth0: host-gw, eth0 set down (the kernel drops the routes
//     through it) and up: from the up until the route to host2 is back;
//   - storm: host-gw, 10,000 routes into Network (through docker0, not
//     the daemon's) deleted at once: the reconciles that cost, per storm
//     (median and max, counted in /metrics once the count stays put for
//     300 ms).
func BenchmarkRepair(b *testing.B) {
	needRoot(b)
	b.Run("route", func(b *testing.B) {
		w, ns := repairVXLANLab(b)
		peer := w.envs[1].Subnet.Masked()
		benchRepair(b, w.hosts[0], ns, func(nh *netlink.Handle) (time.Time, error) {
			start := time.Now()
			return start, nh.RouteDel(&netlink.Route{Dst: ipNet(peer)})
		}, func(ev any) bool {
			u, ok := ev.(netlink.RouteUpdate)
			return ok && u.Type == unix.RTM_NEWROUTE && u.Dst != nil && u.Dst.String() == peer.String()
		})
	})
	b.Run("fdb", func(b *testing.B) {
		w, ns := repairVXLANLab(b)
		peerAddr := net.IP(w.hosts[1].Addr.AsSlice())
		benchRepair(b, w.hosts[0], ns, func(nh *netlink.Handle) (start time.Time, err error) {
			return start, delNeighs(nh, vxlanDev, unix.AF_BRIDGE, func(n netlink.Neigh) bool {
				start = time.Now()
				return n.IP.Equal(peerAddr)
			})
		}, func(ev any) bool {
			u, ok := ev.(netlink.NeighUpdate)
			return ok && u.Type == unix.RTM_NEWNEIGH && u.Family == unix.AF_BRIDGE && u.HardwareAddr.String() == w.macs[1]
		})
	})
	b.Run("flannel.1", func(b *testing.B) {
		w, ns := repairVXLANLab(b)
		p := newNSPinger(b, ns, w.envs[0].Subnet.Addr(), w.envs[1].Subnet.Addr())
		if err := p.wait(10 * time.Second); err != nil {
			b.Fatalf("ping before the edits: %v", err)
		}
		var times, dels []time.Duration
		for b.Loop() {
			var start time.Time
			if err := withNetlink(w.hosts[0], func(nh *netlink.Handle) error {
				link, err := nh.LinkByName(vxlanDev)
				if err != nil {
					return err
				}
				start = time.Now()
				err = nh.LinkDel(link)
				dels = append(dels, time.Since(start))
				return err
			}); err != nil {
				b.Fatal(err)
			}
			if err := p.wait(10 * time.Second); err != nil {
				b.Fatalf("ping after deleting %s: %v\n%s", vxlanDev, err, w.hosts[0].Daemon().Log())
			}
			deadline := time.Now().Add(10 * time.Second)
			for err := w.check(0); err != nil; err = w.check(0) {
				if time.Now().After(deadline) {
					b.Fatalf("state after deleting %s: %v", vxlanDev, err)
				}
				time.Sleep(time.Millisecond)
			}
			times = append(times, time.Since(start))
			settle()
		}
		report(b, times, "")
		report(b, dels, "linkdel-") // the kernel's deletion call alone
		b.ReportMetric(float64(len(times)), "runs")
	})
	b.Run("host-gw-eth0", func(b *testing.B) {
		l := newLab(b, 2, hostGWConfig)
		hosts := l.Hosts()
		envs := startAll(b, l, repairArgs...)
		waitRoutes(b, hosts, envs)
		ns := hostNS(b, hosts[0])
		peer := envs[1].Subnet.Masked()
		routed := func(ev any) bool {
			u, ok := ev.(netlink.RouteUpdate)
			return ok && u.Type == unix.RTM_NEWROUTE && u.Dst != nil && u.Dst.String() == peer.String()
		}
		var eth0 netlink.Link
		if err := withNetlink(hosts[0], func(nh *netlink.Handle) (err error) {
			eth0, err = nh.LinkByName(lab.ExternalIface)
			return err
		}); err != nil {
			b.Fatal(err)
		}
		benchRepair(b, hosts[0], ns, func(nh *netlink.Handle) (time.Time, error) {
			if err := nh.LinkSetDown(eth0); err != nil {
				return time.Time{}, err
			}
			// The daemon sees eth0 down and its Apply fails meanwhile.
			time.Sleep(20 * time.Millisecond)
			start := time.Now()
			return start, nh.LinkSetUp(eth0)
		}, routed)
	})
	b.Run("storm", func(b *testing.B) {
		l := newLab(b, 2, hostGWConfig)
		hosts := l.Hosts()
		envs := startAll(b, l, repairArgs...)
		waitRoutes(b, hosts, envs)
		h := hosts[0]
		if err := h.SetBridgeAddr(envs[0].Subnet); err != nil {
			b.Fatal(err)
		}
		nh, err := nlbatch.NewHandleAt(hostNS(b, h))
		if err != nil {
			b.Fatal(err)
		}
		defer nh.Close()
		bridge, err := nh.LinkByName("docker0")
		if err != nil {
			b.Fatal(err)
		}
		gw := envs[0].Subnet.Addr().Next()
		storm := make([]nlbatch.Route, 10000)
		for i := range storm {
			storm[i] = nlbatch.Route{Dst: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 5, 200 + byte(i>>8), byte(i)}), 32),
				Gw: gw, LinkIndex: bridge.Attrs().Index}
		}
		ctx := testCtx(b, 10*time.Minute)
		// quiet waits until h's reconcile count stays the same for 300 ms
		// and returns it.
		quiet := func() float64 {
			last, same := -1.0, 0
			for same < 3 {
				m, err := reconciles(ctx, h)
				if err != nil {
					b.Fatal(err)
				}
				n := 0.0
				for _, v := range m {
					n += v
				}
				if n == last {
					same++
				} else {
					last, same = n, 0
				}
				time.Sleep(100 * time.Millisecond)
			}
			return last
		}
		var counts []time.Duration // reconciles, as durations for report
		for b.Loop() {
			b.StopTimer()
			if err := nh.ReplaceRoutes(storm, nil); err != nil {
				b.Fatal(err)
			}
			before := quiet()
			b.StartTimer()
			if err := nh.DeleteRoutes(storm, nil); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			n := quiet() - before
			if n < 1 {
				b.Fatalf("10,000 routes into Network deleted: %v reconciles, want at least one", n)
			}
			counts = append(counts, time.Duration(n)*time.Millisecond)
			b.StartTimer()
		}
		slices.Sort(counts)
		b.ReportMetric(ms(counts[len(counts)/2]), "reconciles-median")
		b.ReportMetric(ms(counts[len(counts)-1]), "reconciles-max")
		b.ReportMetric(float64(len(counts)), "runs")
	})
}

// settle lets the daemon finish what the edit still has due (a second
// reconcile for events of its own repair) before the next edit.
func settle() { time.Sleep(50 * time.Millisecond) }

// repairVXLANLab starts a two-host vxlan lab with repairArgs and bridges,
// and returns its world and host1's namespace.
func repairVXLANLab(b *testing.B) (vxlanWorld, netns.NsHandle) {
	l := newLab(b, 2, vxlanConfig)
	hosts := l.Hosts()
	envs := startAll(b, l, repairArgs...)
	w := vxlanWorld{hosts: hosts, envs: envs, macs: make([]string, len(hosts))}
	for i, h := range hosts {
		mac, err := vtepMAC(h)
		if err != nil {
			b.Fatal(err)
		}
		w.macs[i] = mac
		if err := h.SetBridgeAddr(envs[i].Subnet); err != nil {
			b.Fatal(err)
		}
	}
	w.wait(b)
	return w, hostNS(b, hosts[0])
}

// hostNS opens h's network namespace until the benchmark ends.
func hostNS(b *testing.B, h *lab.Host) netns.NsHandle {
	ns, err := netns.GetFromPath(nsPath(h))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ns.Close() })
	return ns
}

// benchRepair runs edit in ns once per iteration and measures the time
// from the start it returns until an event of ns matches back.
func benchRepair(b *testing.B, h *lab.Host, ns netns.NsHandle, edit func(nh *netlink.Handle) (time.Time, error), back func(ev any) bool) {
	b.Helper()
	nh, err := netlink.NewHandleAt(ns)
	if err != nil {
		b.Fatal(err)
	}
	defer nh.Close()
	done := make(chan struct{})
	defer close(done)
	routes := make(chan netlink.RouteUpdate, 1024)
	neighs := make(chan netlink.NeighUpdate, 1024)
	if err := netlink.RouteSubscribeWithOptions(routes, done, netlink.RouteSubscribeOptions{Namespace: &ns}); err != nil {
		b.Fatal(err)
	}
	if err := netlink.NeighSubscribeWithOptions(neighs, done, netlink.NeighSubscribeOptions{Namespace: &ns}); err != nil {
		b.Fatal(err)
	}
	// Each event with the time it was read.
	type stamped struct {
		ev any
		at time.Time
	}
	stampedEvents := make(chan stamped, 4096)
	go func() {
		for {
			select {
			case u, ok := <-routes:
				if !ok {
					return
				}
				stampedEvents <- stamped{u, time.Now()}
			case u, ok := <-neighs:
				if !ok {
					return
				}
				stampedEvents <- stamped{u, time.Now()}
			}
		}
	}()
	var times []time.Duration
	for b.Loop() {
		for len(stampedEvents) > 0 {
			<-stampedEvents
		}
		start, err := edit(nh)
		if err != nil {
			b.Fatalf("run %d: %v; %s log: %s", len(times)+1, err, h.Name, logSummary(h.Daemon().Log()))
		}
		timeout := time.After(10 * time.Second)
	wait:
		for {
			select {
			case s := <-stampedEvents:
				if s.at.After(start) && back(s.ev) {
					times = append(times, s.at.Sub(start))
					break wait
				}
			case <-timeout:
				b.Fatalf("run %d: not repaired within 10 s; %s log: %s", len(times)+1, h.Name, logSummary(h.Daemon().Log()))
			}
		}
		settle()
	}
	report(b, times, "")
	b.ReportMetric(float64(len(times)), "runs")
	b.Logf("%s log: %s", h.Name, logSummary(h.Daemon().Log()))
}

// nsPinger sends ICMP echo requests from src to dst through a raw socket
// made in a host's namespace.
type nsPinger struct {
	fd       int
	src, dst netip.Addr
	seq      uint16
}

func newNSPinger(b *testing.B, ns netns.NsHandle, src, dst netip.Addr) *nsPinger {
	fdc := make(chan int, 1)
	errc := make(chan error, 1)
	go func() {
		// The socket belongs to the namespace it is made in; this thread
		// is not switched back and dies with the goroutine.
		runtime.LockOSThread()
		if err := netns.Set(ns); err != nil {
			errc <- err
			return
		}
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
		if err != nil {
			errc <- err
			return
		}
		fdc <- fd
	}()
	var fd int
	select {
	case err := <-errc:
		b.Fatalf("opening an ICMP socket: %v", err)
	case fd = <-fdc:
	}
	b.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: src.As4()}); err != nil {
		b.Fatalf("binding the ICMP socket to %s: %v", src, err)
	}
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 2000}); err != nil {
		b.Fatal(err)
	}
	return &nsPinger{fd: fd, src: src, dst: dst}
}

// wait sends an echo request every 2 ms until one is answered.
func (p *nsPinger) wait(limit time.Duration) error {
	const id = 0x4b57
	deadline := time.Now().Add(limit)
	buf := make([]byte, 1500)
	for time.Now().Before(deadline) {
		p.seq++
		req := []byte{8, 0, 0, 0, id >> 8, id & 0xff, byte(p.seq >> 8), byte(p.seq)}
		binary.BigEndian.PutUint16(req[2:], icmpChecksum(req))
		if err := unix.Sendto(p.fd, req, 0, &unix.SockaddrInet4{Addr: p.dst.As4()}); err != nil {
			time.Sleep(2 * time.Millisecond) // no route yet
			continue
		}
		end := time.Now().Add(2 * time.Millisecond)
		for time.Now().Before(end) {
			n, _, err := unix.Recvfrom(p.fd, buf, 0)
			if err != nil {
				break
			}
			if n < 20 {
				continue
			}
			hl := int(buf[0]&0x0f) * 4
			if n < hl+8 || netip.AddrFrom4([4]byte(buf[12:16])) != p.dst {
				continue
			}
			icmp := buf[hl:n]
			if icmp[0] == 0 && binary.BigEndian.Uint16(icmp[4:]) == id && binary.BigEndian.Uint16(icmp[6:]) == p.seq {
				return nil
			}
		}
	}
	return fmt.Errorf("no echo reply from %s to %s within %v", p.dst, p.src, limit)
}

func icmpChecksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return ^uint16(s)
}
