package e2e

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	client "go.etcd.io/etcd/client/v2"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/e2e/lab"
	"github.com/flanneld-go/flanneld/pkg/nlbatch"
)

// benchNetwork6 holds the IPv6 subnets of the dual-stack benchmark's fake
// hosts (a /64 each).
var benchNetwork6 = netip.MustParsePrefix("fc00::/32")

// fakeDualLease is fakeLease with an IPv6 side: key
// "10.x.y.0-24&fc00:0:x:y::-64", PublicIPv6 fd5e::1:x:y and a second
// VtepMAC in BackendV6Data.
func fakeDualLease(l *lab.Lab, i int) (key, value string) {
	n := uint32(i + 1)
	sn := netip.AddrFrom4([4]byte{10, byte(n >> 8), byte(n), 0})
	sn6 := netip.AddrFrom16([16]byte{0xfc, 0, 0, 0, 0, byte(n >> 16), byte(n >> 8), byte(n)})
	pub := netip.AddrFrom4([4]byte{172, 17 + byte(n>>16), byte(n >> 8), byte(n)})
	pub6 := netip.AddrFrom16([16]byte{0xfd, 0x5e, 10: 0, 11: 1, 13: byte(n >> 16), 14: byte(n >> 8), 15: byte(n)})
	key = fmt.Sprintf("%s/subnets/%s-24&%s-64", l.EtcdPrefix(), sn, sn6)
	value = fmt.Sprintf(`{"PublicIP":"%s","PublicIPv6":"%s","BackendType":"vxlan","BackendData":{"VtepMAC":"0e:00:00:%02x:%02x:%02x"},"BackendV6Data":{"VtepMAC":"0e:01:00:%02x:%02x:%02x"}}`,
		pub, pub6, byte(n>>16), byte(n>>8), byte(n), byte(n>>16), byte(n>>8), byte(n))
	return key, value
}

// countDual counts the routes a dual-stack vxlan host holds into the
// benchmark's networks: IPv4 through flannel.1, IPv6 through flannel-v6.1.
func countDual(nh *nlbatch.Handle) (v4, v6 int, err error) {
	index := func(name string) int {
		l, err := nh.LinkByName(name)
		if err != nil {
			return -1
		}
		return l.Attrs().Index
	}
	dev4, dev6 := index(vxlanDev), index("flannel-v6.1")
	err = nh.ListRoutes(func(r *nlbatch.RouteEntry) bool {
		if r.Table == unix.RT_TABLE_MAIN && r.LinkIndex == dev4 && r.Gw.IsValid() && r.Dst.Bits() == 24 && benchNetwork.Contains(r.Dst.Addr()) {
			v4++
		}
		return true
	})
	if err != nil {
		return 0, 0, err
	}
	err = nh.ListRoutes6(func(r *nlbatch.RouteEntry) bool {
		if r.Table == unix.RT_TABLE_MAIN && r.LinkIndex == dev6 && r.Dst.Bits() == 64 && benchNetwork6.Contains(r.Dst.Addr()) {
			v6++
		}
		return true
	})
	return v4, v6, err
}

// BenchmarkControlPlaneStartDualStack is BenchmarkControlPlaneStart for a
// dual-stack vxlan network: N leases with an IPv4 and an IPv6 subnet each
// in etcd, the time from the daemon's start until all IPv4 and IPv6 routes
// are in, and its memory once settled (FLANNEL_BENCH_LEASES sets N: 5,000
// and 10,000 by default).
func BenchmarkControlPlaneStartDualStack(b *testing.B) {
	needRoot(b)
	for _, n := range envInts(b, envBenchLeases, benchMaxLeases, 5000, 10000) {
		b.Run(fmt.Sprintf("vxlan/leases=%d", n), func(b *testing.B) {
			bin := lab.BuildDaemon(b)
			l := lab.Start(b, lab.Options{Hosts: 1, DaemonPath: bin, LAN: benchLAN, LAN6: netip.MustParsePrefix("fd5e::/64"), Logf: func(string, ...any) {}})
			b.Cleanup(func() { stopAll(b, l) })
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
			defer cancel()
			cfg := fmt.Sprintf(`{"Network":%q,"SubnetLen":24,"EnableIPv6":true,"IPv6Network":%q,"Backend":{"Type":"vxlan"}}`, benchNetwork, benchNetwork6)
			if err := l.SetConfig(ctx, cfg); err != nil {
				b.Fatal(err)
			}
			kapi := benchKeys(b, l)
			err := forLeases(n, func(i int) error {
				key, value := fakeDualLease(l, i)
				_, err := kapi.Set(ctx, key, value, &client.SetOptions{TTL: 24 * time.Hour})
				return err
			})
			if err != nil {
				b.Fatal(err)
			}
			h := l.Host(1)
			kc := newKernelCounter(b, h, "vxlan")
			var times []time.Duration
			var mem memory
			for b.Loop() {
				b.StopTimer()
				if out, err := h.Exec(ctx, "ip", "nexthop", "flush"); err != nil && !strings.Contains(out, "Nothing to flush") {
					b.Fatal(err)
				}
				for _, dev := range []string{vxlanDev, "flannel-v6.1"} {
					if link, err := kc.nh.LinkByName(dev); err == nil {
						if err := kc.nh.LinkDel(link); err != nil {
							b.Fatal(err)
						}
					} else if !errors.As(err, new(netlink.LinkNotFoundError)) {
						b.Fatal(err)
					}
				}
				b.StartTimer()
				begin := time.Now()
				d := startDaemon(b, h)
				for {
					v4, v6, err := countDual(kc.nh)
					if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
						b.Fatal(err)
					}
					if v4 == n && v6 == n {
						break
					}
					if d.Exited() || time.Since(begin) > time.Minute {
						b.Fatalf("%d IPv4 and %d IPv6 routes of %d; log:\n%s", v4, v6, n, tailLines(d.Log(), 30))
					}
					time.Sleep(benchPoll)
				}
				b.StopTimer()
				times = append(times, time.Since(begin))
				if mem == (memory{}) { // the first daemon: settling takes memorySettle
					mem = settledMemory(b, h, d)
				}
				if code := stop(b, d); code != 0 {
					b.Fatalf("flanneld exited with %d after SIGTERM", code)
				}
				b.StartTimer()
			}
			b.ReportMetric(ms(median(times)), "converge-ms")
			mem.report(b)
		})
	}
}
