package e2e

import (
	"fmt"
	"math"
	"regexp"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/e2e/lab"
)

// TestUDPRestart restarts host1's udp daemon under a ping stream to host2:
// flannel0 stays (same index) and no route into the overlay is deleted at
// any moment (netlink notifications), and the stream loses at most the
// packets sent during the restart window (SIGTERM until the new daemon's
// subnet.env), plus the ones in flight at either edge.
func TestUDPRestart(t *testing.T) {
	t.Parallel()
	l := newLab(t, 2, udpConfig)
	hosts := l.Hosts()
	envs := startAll(t, l)
	setBridges(t, hosts, envs)
	pingAll(t, hosts, envs)
	h1 := hosts[0]
	index := flannel0Index(t, h1)
	deleted := watchRouteDeletes(t, h1)

	const interval, count = 100 * time.Millisecond, 80
	type result struct {
		out string
		err error
	}
	ping := make(chan result, 1)
	ctx := testCtx(t, 2*time.Minute)
	go func() {
		out, err := h1.Exec(ctx, "ping", "-n", "-q", "-i", strconv.FormatFloat(interval.Seconds(), 'f', -1, 64), "-c", strconv.Itoa(count), "-W", "2",
			"-I", envs[0].Subnet.Addr().String(), envs[1].Subnet.Addr().String())
		ping <- result{out, err}
	}()
	time.Sleep(2 * time.Second)
	began := time.Now()
	if code := stop(t, h1.Daemon()); code != 0 {
		t.Fatalf("flanneld on %s exited with %d after SIGTERM", h1.Name, code)
	}
	startDaemon(t, h1)
	if env := waitEnv(t, h1); env.Subnet != envs[0].Subnet {
		t.Fatalf("after the restart %s has subnet %s, want %s", h1.Name, env.Subnet, envs[0].Subnet)
	}
	window := time.Since(began)
	r := <-ping
	sent, received, ok := pingCounts(r.out)
	if !ok {
		t.Fatalf("ping output without counts (%v):\n%s", r.err, r.out)
	}
	lost := sent - received
	allowed := int(math.Ceil(float64(window)/float64(interval))) + 2
	t.Logf("restart window %v: %d of %d pings lost (at most %d allowed)", window.Round(time.Millisecond), lost, sent, allowed)
	if sent != count || lost > allowed {
		t.Errorf("ping across the restart: %d sent, %d received; want %d sent and at most %d lost\n%s", sent, received, count, allowed, r.out)
	}
	if got := flannel0Index(t, h1); got != index {
		t.Errorf("flannel0 has index %d after the restart, was %d: the device was recreated", got, index)
	}
	if ds := deleted(); len(ds) > 0 {
		t.Errorf("routes into the overlay were deleted during the restart: %v", ds)
	}
	if err := checkFlannel0(h1, envs[0].Subnet, envs[0].MTU); err != nil {
		t.Error(err)
	}
	pingAll(t, hosts, envs)
}

var pingCountsRE = regexp.MustCompile(`(\d+) packets transmitted, (\d+) received`)

// pingCounts reads the packets sent and received from ping's summary.
func pingCounts(out string) (sent, received int, ok bool) {
	m := pingCountsRE.FindStringSubmatch(out)
	if m == nil {
		return 0, 0, false
	}
	sent, _ = strconv.Atoi(m[1])
	received, _ = strconv.Atoi(m[2])
	return sent, received, true
}

// flannel0Index is the index of h's flannel0.
func flannel0Index(t *testing.T, h *lab.Host) int {
	t.Helper()
	var index int
	err := withNetlink(h, func(nh *netlink.Handle) error {
		link, err := nh.LinkByName("flannel0")
		if err != nil {
			return fmt.Errorf("flannel0 on %s: %w", h.Name, err)
		}
		index = link.Attrs().Index
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return index
}

// watchRouteDeletes subscribes to h's route notifications and polls its
// Network route until the test ends; the function returned lists the
// routes into the overlay Network deleted so far, the moments the Network
// route was absent, and any error of the subscription.
func watchRouteDeletes(t *testing.T, h *lab.Host) func() []string {
	t.Helper()
	ns, err := netns.GetFromPath(nsPath(h))
	if err != nil {
		t.Fatalf("opening the namespace of %s: %v", h.Name, err)
	}
	defer ns.Close()
	var mu sync.Mutex
	var deleted []string
	updates := make(chan netlink.RouteUpdate, 256)
	done := make(chan struct{})
	err = netlink.RouteSubscribeWithOptions(updates, done, netlink.RouteSubscribeOptions{
		Namespace: &ns,
		ErrorCallback: func(err error) {
			mu.Lock()
			deleted = append(deleted, fmt.Sprintf("(route notifications failed: %v)", err))
			mu.Unlock()
		},
	})
	if err != nil {
		t.Fatalf("subscribing to the routes of %s: %v", h.Name, err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for u := range updates {
			if u.Type != unix.RTM_DELROUTE || u.Dst == nil {
				continue
			}
			if dst, ok := prefixOf(u.Dst); ok && network.Overlaps(dst) {
				mu.Lock()
				deleted = append(deleted, u.Route.String())
				mu.Unlock()
			}
		}
	}()
	// The kernel sends no notification for the connected route of an
	// address it flushes with its device: poll for the Network route too.
	nh, err := netlink.NewHandleAt(ns)
	if err != nil {
		close(done)
		t.Fatalf("opening netlink in %s: %v", h.Name, err)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer nh.Close()
		filter := &netlink.Route{Table: unix.RT_TABLE_MAIN, Dst: ipNet(network)}
		for {
			select {
			case <-done:
				return
			case <-time.After(5 * time.Millisecond):
			}
			rs, err := nh.RouteListFiltered(netlink.FAMILY_V4, filter, netlink.RT_FILTER_TABLE|netlink.RT_FILTER_DST)
			if err == nil && len(rs) == 0 {
				err = fmt.Errorf("no route to %s", network)
			}
			if err != nil {
				mu.Lock()
				deleted = append(deleted, fmt.Sprintf("(%s at %s)", err, time.Now().Format("15:04:05.000")))
				mu.Unlock()
			}
		}
	}()
	t.Cleanup(func() { close(done); wg.Wait() })
	// A notification is sent before the change's syscall returns; a
	// restart that follows this call is seen whole.
	return func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), deleted...)
	}
}
