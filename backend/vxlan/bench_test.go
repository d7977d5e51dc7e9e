package vxlan

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"testing"

	"github.com/go-logr/logr"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/subnet"
)

// manyLeases returns n vxlan leases of 10.0.0.0/8 /24s from 10.1.0.0 on,
// with distinct MACs and PublicIPs off the lab's networks.
func manyLeases(n int) []subnet.Lease {
	out := make([]subnet.Lease, n)
	for i := range out {
		v := uint32(i + 256)
		out[i] = subnet.Lease{
			Subnet: netip.PrefixFrom(ip.FromUint32(10<<24|v<<8), 24),
			Attrs: subnet.LeaseAttrs{
				PublicIP:    ip.FromUint32(172<<24 | 16<<16 | v),
				BackendType: "vxlan",
				BackendData: json.RawMessage(fmt.Sprintf(`{"VtepMAC":"0e:00:00:%02x:%02x:%02x"}`, v>>16&0xff, v>>8&0xff, v&0xff)),
			},
		}
	}
	return out
}

// benchBackend is a node of a lab with Network 10.0.0.0/8 and own lease
// 10.0.1.0/24.
func benchBackend(b testing.TB, nexthops bool) (*vxlanBackend, subnet.Lease) {
	a, _ := newPair(b)
	be, err := backend.New("vxlan", backend.Options{
		Ext:      backend.ExternalInterface{Iface: a.ext, IfaceAddr: a.addr, PublicIP: a.addr},
		Config:   &subnet.Config{Network: netip.MustParsePrefix("10.0.0.0/8"), SubnetLen: 24, BackendType: "vxlan"},
		Netlink:  a.h,
		Nexthops: nexthops,
		Logger:   logr.Discard(),
	})
	if err != nil {
		b.Fatal(err)
	}
	vb := be.(*vxlanBackend)
	if _, err := vb.Init(context.Background()); err != nil {
		b.Fatal(err)
	}
	return vb, subnet.Lease{Subnet: netip.MustParsePrefix("10.0.1.0/24"), Attrs: subnet.LeaseAttrs{PublicIP: a.addr, BackendType: "vxlan"}}
}

// BenchmarkApply measures one Apply of n leases: from an empty kernel (every
// neighbour, fdb entry and route added) and again with nothing to change
// (three dumps and the diff: the cost of each resync).
func BenchmarkApply(b *testing.B) {
	ctx := context.Background()
	for _, nh := range []bool{false, true} {
		routes := "plain"
		if nh {
			routes = "nexthops"
		}
		for _, n := range []int{5000, 10000, 50000} {
			leases := manyLeases(n)
			b.Run(fmt.Sprintf("%s/leases=%d/from-empty", routes, n), func(b *testing.B) {
				be, own := benchBackend(b, nh)
				for b.Loop() {
					b.StopTimer()
					if err := be.Apply(ctx, own, nil); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
					if err := be.Apply(ctx, own, leases); err != nil {
						b.Fatal(err)
					}
				}
				b.StopTimer()
				if got := be.last.Route.Added; got != n {
					b.Fatalf("last Apply added %d routes, want %d", got, n)
				}
			})
			b.Run(fmt.Sprintf("%s/leases=%d/no-op", routes, n), func(b *testing.B) {
				be, own := benchBackend(b, nh)
				if err := be.Apply(ctx, own, leases); err != nil {
					b.Fatal(err)
				}
				for b.Loop() {
					if err := be.Apply(ctx, own, leases); err != nil {
						b.Fatal(err)
					}
				}
				b.StopTimer()
				if be.last != (stats{}) {
					b.Fatalf("no-op Apply changed %+v", be.last)
				}
			})
		}
	}
}

// manyDualLeases is manyLeases with an IPv6 lease fc00:0:<n>::/64 each,
// PublicIPv6 fd99::<n> (off the lab's networks) and its own IPv6 VTEP MAC.
func manyDualLeases(n int) []subnet.Lease {
	out := manyLeases(n)
	for i := range out {
		v := uint32(i + 256)
		var a [16]byte
		a[0], a[1] = 0xfc, 0x00
		a[4], a[5] = byte(v>>8), byte(v)
		a[3] = byte(v >> 16)
		out[i].IPv6Subnet = netip.PrefixFrom(netip.AddrFrom16(a), 64)
		out[i].Attrs.PublicIPv6 = netip.MustParseAddr(fmt.Sprintf("fd99::%x", v))
		out[i].Attrs.BackendV6Data = json.RawMessage(fmt.Sprintf(`{"VtepMAC":"0e:06:00:%02x:%02x:%02x"}`, v>>16&0xff, v>>8&0xff, v&0xff))
	}
	return out
}

// benchDualBackend is benchBackend with IPv6Network fc00::/16 and own IPv6
// lease fc00:0:1::/64.
func benchDualBackend(b testing.TB, nexthops bool) (*vxlanBackend, subnet.Lease) {
	a, _ := newDualPair(b)
	be, err := backend.New("vxlan", backend.Options{
		Ext: backend.ExternalInterface{Iface: a.ext, IfaceAddr: a.addr, PublicIP: a.addr, IfaceAddrV6: a.addr6, PublicIPv6: a.addr6},
		Config: &subnet.Config{EnableIPv4: true, EnableIPv6: true,
			Network: netip.MustParsePrefix("10.0.0.0/8"), SubnetLen: 24,
			IPv6Network: netip.MustParsePrefix("fc00::/16"), IPv6SubnetLen: 64, BackendType: "vxlan"},
		Netlink:  a.h,
		Nexthops: nexthops,
		Logger:   logr.Discard(),
	})
	if err != nil {
		b.Fatal(err)
	}
	vb := be.(*vxlanBackend)
	if _, err := vb.Init(context.Background()); err != nil {
		b.Fatal(err)
	}
	return vb, subnet.Lease{Subnet: netip.MustParsePrefix("10.0.1.0/24"), IPv6Subnet: netip.MustParsePrefix("fc00:0:1::/64"),
		Attrs: subnet.LeaseAttrs{PublicIP: a.addr, PublicIPv6: a.addr6, BackendType: "vxlan"}}
}

// BenchmarkApplyDualStack is BenchmarkApply for dual-stack leases: each
// Apply programs (or checks) a neighbour, an fdb entry and a route per
// family per lease.
func BenchmarkApplyDualStack(b *testing.B) {
	ctx := context.Background()
	for _, nh := range []bool{false, true} {
		routes := "plain"
		if nh {
			routes = "nexthops"
		}
		for _, n := range []int{5000, 10000} {
			leases := manyDualLeases(n)
			b.Run(fmt.Sprintf("%s/leases=%d/from-empty", routes, n), func(b *testing.B) {
				be, own := benchDualBackend(b, nh)
				for b.Loop() {
					b.StopTimer()
					if err := be.Apply(ctx, own, nil); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
					if err := be.Apply(ctx, own, leases); err != nil {
						b.Fatal(err)
					}
				}
				b.StopTimer()
				if got4, got6 := be.last.Route.Added, be.v6.last.Route.Added; got4 != n || got6 != n {
					b.Fatalf("last Apply added %d IPv4 and %d IPv6 routes, want %d each", got4, got6, n)
				}
			})
			b.Run(fmt.Sprintf("%s/leases=%d/no-op", routes, n), func(b *testing.B) {
				be, own := benchDualBackend(b, nh)
				if err := be.Apply(ctx, own, leases); err != nil {
					b.Fatal(err)
				}
				for b.Loop() {
					if err := be.Apply(ctx, own, leases); err != nil {
						b.Fatal(err)
					}
				}
				b.StopTimer()
				if be.last != (stats{}) || be.v6.last != (stats{}) {
					b.Fatalf("no-op Apply changed IPv4 %+v, IPv6 %+v", be.last, be.v6.last)
				}
			})
		}
	}
}
