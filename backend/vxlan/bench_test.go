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
