package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
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
	err = nh.ListRoutes(func(e *nlbatch.Route) bool {
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

// TestNexthopObjects runs host-gw and vxlan with the default route form:
// every overlay route goes through a nexthop object whose ID is its
// gateway's address, and traffic flows. Then host1 goes back and forth
// between the default and a plain-route daemon (--nexthop-objects=false),
// in a cluster whose other hosts stay on nexthops: each restart turns its
// routes into the other form (plain: no nexthop object left), all 6 pings
// pass after each, and a ping stream between host1 and host2 loses nothing
// across the switches.
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
			envs := startAll(t, l)
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
			there := startPingStream(t, h0, envs[0].Subnet.Addr(), envs[1].Subnet.Addr())
			back := startPingStream(t, hosts[1], envs[1].Subnet.Addr(), envs[0].Subnet.Addr())
			for _, nexthops := range []bool{false, true, false, true} {
				if code := stop(t, h0.Daemon()); code != 0 {
					t.Fatalf("flanneld on %s exited with %d after SIGTERM", h0.Name, code)
				}
				var args []string
				if !nexthops {
					args = append(args, "--nexthop-objects=false")
				}
				startDaemon(t, h0, args...)
				if env := waitEnv(t, h0); env.Subnet != envs[0].Subnet {
					t.Fatalf("after restart %s has subnet %s, want %s", h0.Name, env.Subnet, envs[0].Subnet)
				}
				form := map[bool]string{true: "nexthop", false: "plain"}[nexthops]
				eventually(t, form+" routes on "+h0.Name, check(0, nexthops))
				if !nexthops {
					eventually(t, "no nexthop objects on "+h0.Name, func() error {
						out, err := nexthopObjects(ctx, h0)
						if err == nil && out != "" {
							err = fmt.Errorf("%s still has nexthop objects:\n%s", h0.Name, out)
						}
						return err
					})
				}
				for i := 1; i < len(hosts); i++ {
					if err := check(i, true)(); err != nil {
						t.Error(err)
					}
				}
				pingAll(t, hosts, envs)
			}
			for _, s := range []*pingStream{there, back} {
				sent, received := s.stop(t)
				t.Logf("ping stream %s: %d sent, %d received", s.name, sent, received)
				if sent < 10 || received != sent {
					t.Errorf("ping stream %s across the switches: %d sent, %d received; want at least 10, all answered", s.name, sent, received)
				}
			}
		})
	}
}

// pingStream is a ping running in a host namespace until stopped.
type pingStream struct {
	name string
	cmd  *exec.Cmd
	out  bytes.Buffer
}

// startPingStream pings dst from src inside h every 10 ms until stop.
func startPingStream(t *testing.T, h *lab.Host, src, dst netip.Addr) *pingStream {
	t.Helper()
	s := &pingStream{name: fmt.Sprintf("%s %s -> %s", h.Name, src, dst)}
	// ip netns exec execs ping in place: the signal reaches ping itself.
	s.cmd = exec.Command("ip", "netns", "exec", h.NS, "ping", "-n", "-q", "-i", "0.01", "-W", "2", "-I", src.String(), dst.String())
	s.cmd.Stdout, s.cmd.Stderr = &s.out, &s.out
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("starting ping on %s: %v", h.Name, err)
	}
	t.Cleanup(func() {
		if s.cmd.ProcessState == nil {
			s.cmd.Process.Kill()
			s.cmd.Wait()
		}
	})
	return s
}

// stop interrupts the ping (which then prints its summary) and returns the
// packets sent and answered.
func (s *pingStream) stop(t *testing.T) (sent, received int) {
	t.Helper()
	if err := s.cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatalf("interrupting ping %s: %v", s.name, err)
	}
	s.cmd.Wait()
	sent, received, ok := pingCounts(s.out.String())
	if !ok {
		t.Fatalf("ping %s printed no counts:\n%s", s.name, s.out.String())
	}
	return sent, received
}
