package udp

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/flanneld-go/flanneld/subnet"
)

// TestNetnsRollbackToFlannel: host A is moved from this backend back to
// flannel's udp backend. Ours leaves flannel0 (persistent, vnet_hdr) with
// its address and Network route; flannel then creates its TUN as it does
// (name template flannel%d, IFF_TUN|IFF_NO_PI: it gets flannel1) with the
// same address. Its Network route (the kernel's metric 0) wins over ours
// (RouteMetric), so traffic takes flannel1 with no manual step: A and B
// ping, and flannel's data path carries the datagrams.
func TestNetnsRollbackToFlannel(t *testing.T) {
	needRoot(t)
	needPing(t)
	a, b, ba, bb := labPair(t, "")
	ctx := context.Background()
	routes, err := a.run(ctx, "ip", "-4", "route", "show", "dev", DeviceName)
	if err != nil || !strings.Contains(routes, fmt.Sprintf("10.5.0.0/16 proto kernel scope link src 10.5.1.0 metric %d", RouteMetric)) {
		t.Fatalf("flannel0's Network route: %v\n%s\nwant the prefix route with metric %d", err, routes, RouteMetric)
	}
	if ok, out := a.ping(t, "10.5.1.0", "10.5.2.0"); !ok {
		t.Fatalf("ping A->B on ours failed:\n%s", out)
	}

	if err := ba.Close(); err != nil {
		t.Fatal(err)
	}
	fp := startFlannelPeerNamed(t, a, "flannel%d", netip.MustParsePrefix("10.5.1.0/24"), netip.AddrPortFrom(b.addr, DefaultPort))
	if fp.name != "flannel1" {
		t.Errorf("flannel's TUN is %s, want flannel1 (flannel0 is ours, left in place)", fp.name)
	}
	got, err := a.run(ctx, "ip", "-4", "route", "get", "10.5.2.0", "from", "10.5.1.0")
	if err != nil || !strings.Contains(got, "dev "+fp.name) {
		t.Fatalf("route to 10.5.2.0 after flannel started: %v\n%s\nwant it via %s", err, got, fp.name)
	}
	if ok, out := a.ping(t, "10.5.1.0", "10.5.2.0"); !ok {
		all, _ := a.run(ctx, "ip", "-4", "route")
		t.Fatalf("ping A->B with flannel on A failed:\n%s\nroutes:\n%s\nstats B %+v", out, all, bb.Stats())
	}
	if fp.datagrams.Load() == 0 {
		t.Errorf("the replies did not come through flannel's socket")
	}
}

// TestNetnsRouteMetricSetInPlace: flannel0 left by an earlier version (its
// Network route with the kernel's metric 0) gets RouteMetric at the next
// Apply, without the route ever going away.
func TestNetnsRouteMetricSetInPlace(t *testing.T) {
	needRoot(t)
	a, b, ba, _ := labPair(t, "")
	ctx := context.Background()
	if out, err := a.run(ctx, "ip", "addr", "replace", "10.5.1.0/16", "dev", DeviceName, "metric", "0"); err != nil {
		t.Fatalf("setting metric 0: %v\n%s", err, out)
	}
	routes, _ := a.run(ctx, "ip", "-4", "route", "show", "dev", DeviceName)
	if strings.Contains(routes, "metric") {
		t.Fatalf("the route still has a metric:\n%s", routes)
	}
	if err := ba.Apply(ctx, a.lease("10.5.1.0/24"), []subnet.Lease{b.lease("10.5.2.0/24")}); err != nil {
		t.Fatal(err)
	}
	routes, _ = a.run(ctx, "ip", "-4", "route", "show", "dev", DeviceName)
	if want := fmt.Sprintf("10.5.0.0/16 proto kernel scope link src 10.5.1.0 metric %d", RouteMetric); strings.TrimSpace(strings.ReplaceAll(routes, " linkdown", "")) != want {
		t.Errorf("flannel0's routes after Apply:\n%s\nwant exactly %s", routes, want)
	}
}
