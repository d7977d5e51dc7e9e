package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/flanneld-go/flanneld/e2e/lab"
	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/pkg/nlbatch"
)

// nexthopRoute is an overlay route as the nexthop tests compare them.
type nexthopRoute struct {
	Dst       netip.Prefix
	Gw        netip.Addr
	NexthopID uint32
}

// nexthopRoutes lists h's routes into the lab network with their nexthop
// IDs, sorted.
func nexthopRoutes(h *lab.Host) ([]nexthopRoute, error) {
	ns, err := netns.GetFromPath(nsPath(h))
	if err != nil {
		return nil, fmt.Errorf("opening namespace of %s: %w", h.Name, err)
	}
	defer ns.Close()
	nh, err := nlbatch.NewHandleAt(ns)
	if err != nil {
		return nil, err
	}
	defer nh.Close()
	var got []nexthopRoute
	err = nh.ListRoutes(func(e *nlbatch.RouteEntry) bool {
		if e.Gw.IsValid() && network.Contains(e.Dst.Addr()) && e.Dst.Bits() > network.Bits() {
			got = append(got, nexthopRoute{e.Dst, e.Gw, e.NexthopID})
		}
		return true
	})
	slices.SortFunc(got, func(a, b nexthopRoute) int { return strings.Compare(a.Dst.String(), b.Dst.String()) })
	return got, err
}

// nexthopObjects lists the IDs of h's nexthop objects, as ip prints them.
func nexthopObjects(ctx context.Context, h *lab.Host) (string, error) {
	out, err := h.Exec(ctx, "ip", "nexthop", "show")
	return strings.TrimSpace(out), err
}

// TestNexthopObjects runs host-gw and vxlan with --nexthop-objects: every
// overlay route goes through a nexthop object whose ID is its gateway's
// address, traffic flows, and a restart without the flag turns the routes
// back into plain ones and deletes the nexthop objects.
func TestNexthopObjects(t *testing.T) {
	for _, tc := range []struct {
		name, config string
		gw           func(hosts []*lab.Host, envs []lab.SubnetEnv, j int) netip.Addr
	}{
		{"host-gw", hostGWConfig, func(hosts []*lab.Host, _ []lab.SubnetEnv, j int) netip.Addr { return hosts[j].Addr }},
		{"vxlan", vxlanConfig, func(_ []*lab.Host, envs []lab.SubnetEnv, j int) netip.Addr { return envs[j].Subnet.Masked().Addr() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			l := newLab(t, 3, tc.config)
			ctx := testCtx(t, 2*time.Minute)
			hosts := l.Hosts()
			envs := startAll(t, l, "--nexthop-objects")
			want := func(self int, nexthops bool) []nexthopRoute {
				var rs []nexthopRoute
				for j := range hosts {
					if j == self {
						continue
					}
					gw := tc.gw(hosts, envs, j)
					r := nexthopRoute{Dst: envs[j].Subnet.Masked(), Gw: gw}
					if nexthops {
						r.NexthopID = ip.Uint32(gw)
					}
					rs = append(rs, r)
				}
				slices.SortFunc(rs, func(a, b nexthopRoute) int { return strings.Compare(a.Dst.String(), b.Dst.String()) })
				return rs
			}
			check := func(i int, nexthops bool) func() error {
				return func() error {
					got, err := nexthopRoutes(hosts[i])
					if err != nil {
						return err
					}
					if w := want(i, nexthops); !slices.Equal(got, w) {
						return fmt.Errorf("%s has routes %+v, want %+v", hosts[i].Name, got, w)
					}
					return nil
				}
			}
			for i, h := range hosts {
				eventually(t, "nexthop routes on "+h.Name, check(i, true))
			}
			for i, h := range hosts {
				if err := h.SetBridgeAddr(envs[i].Subnet); err != nil {
					t.Fatal(err)
				}
			}
			pingAll(t, hosts, envs)

			h0 := hosts[0]
			if code := stop(t, h0.Daemon()); code != 0 {
				t.Fatalf("flanneld on %s exited with %d after SIGTERM", h0.Name, code)
			}
			startDaemon(t, h0)
			if env := waitEnv(t, h0); env.Subnet != envs[0].Subnet {
				t.Fatalf("after restart %s has subnet %s, want %s", h0.Name, env.Subnet, envs[0].Subnet)
			}
			eventually(t, "plain routes on "+h0.Name, check(0, false))
			eventually(t, "no nexthop objects on "+h0.Name, func() error {
				out, err := nexthopObjects(ctx, h0)
				if err == nil && out != "" {
					err = fmt.Errorf("%s still has nexthop objects:\n%s", h0.Name, out)
				}
				return err
			})
			pingAll(t, hosts, envs)
		})
	}
}
