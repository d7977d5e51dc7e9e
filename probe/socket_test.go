package probe

import (
	"context"
	"errors"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2/ktesting"

	"github.com/flanneld-go/flanneld/internal/etcdtest"
	"github.com/flanneld-go/flanneld/internal/nstest"
)

// inNS runs f on a thread inside ns (sockets made there stay there).
func inNS(t *testing.T, ns *nstest.NS, f func()) {
	t.Helper()
	if err := etcdtest.InNetNS(ns.Path, func() error { f(); return nil }); err != nil {
		t.Fatal(err)
	}
}

func openIn(t *testing.T, ns *nstest.NS, src netip.Addr) (conn, error) {
	var s *socket
	var err error
	inNS(t, ns, func() { s, err = openSocket(src) })
	if err != nil {
		return nil, err
	}
	return s, nil
}

// TestSocket: echo requests from a bound address are answered and matched
// by sequence number; a full-size probe above the link's MTU is refused
// (DF), not fragmented.
func TestSocket(t *testing.T) {
	a, b := nstest.New(t, "probe"), nstest.New(t, "probe")
	a.Up(t, "lo")
	a.Veth(t, "eth0", 1300, b, "eth0", "192.168.77.1/24")
	b.Up(t, "eth0", "192.168.77.2/24")
	c, err := openIn(t, a, netip.MustParseAddr("192.168.77.1"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.close()
	dst := netip.MustParseAddr("192.168.77.2")
	for _, size := range []int{smallSize, 1300} {
		if err := c.send(dst, uint16(size), size); err != nil {
			t.Fatalf("sending %d bytes: %v", size, err)
		}
		rep, err := c.read(make([]byte, 1<<16), time.Now)
		if err != nil || rep.seq != uint16(size) || rep.from != dst {
			t.Errorf("reply to %d bytes: %+v, %v; want seq %d from %s", size, rep, err, size, dst)
		}
	}
	if err := c.send(dst, 9, 1301); !errors.Is(err, unix.EMSGSIZE) {
		t.Errorf("sending 1301 bytes over an MTU of 1300: %v, want EMSGSIZE (DF set)", err)
	}
	if _, err := openIn(t, a, netip.MustParseAddr("192.168.78.1")); err == nil {
		t.Error("bound to an address the host does not have")
	}
}

// TestSocket6: the same over ICMPv6.
func TestSocket6(t *testing.T) {
	a, b := nstest.New(t, "probe"), nstest.New(t, "probe")
	a.Up(t, "lo")
	a.Veth(t, "eth0", 1300, b, "eth0", "fd77::1/64")
	b.Up(t, "eth0", "fd77::2/64")
	for _, ns := range []*nstest.NS{a, b} {
		if out, err := ns.Command(context.Background(), "sh", "-c", "sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.eth0.accept_dad=0").CombinedOutput(); err != nil {
			t.Logf("turning DAD off: %v: %s", err, out)
		}
	}
	var c conn
	var err error
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if c, err = openIn(t, a, netip.MustParseAddr("fd77::1")); err == nil {
			break // the address left tentative (DAD) state
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	defer c.close()
	dst := netip.MustParseAddr("fd77::2")
	type result struct {
		rep reply
		err error
	}
	replies := make(chan result, 1)
	go func() {
		rep, err := c.read(make([]byte, 1<<16), time.Now)
		replies <- result{rep, err}
	}()
	var rep reply
	err = errors.New("no reply within 20 s")
	// The first sends may fail or go unanswered while b's address is
	// still tentative.
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); {
		if serr := c.send(dst, 1300, 1300); serr != nil {
			t.Logf("sending: %v", serr)
		}
		select {
		case r := <-replies:
			rep, err = r.rep, r.err
		case <-time.After(500 * time.Millisecond):
			continue
		}
		break
	}
	if err != nil || rep.seq != 1300 || rep.from != dst {
		t.Errorf("reply to 1300 bytes: %+v, %v; want seq 1300 from %s", rep, err, dst)
	}
	if err := c.send(dst, 9, 1301); !errors.Is(err, unix.EMSGSIZE) {
		t.Errorf("sending 1301 bytes over an MTU of 1300: %v, want EMSGSIZE", err)
	}
}

// TestRunRealSocket runs the prober on the real clock and a real socket:
// a peer whose address answers echo (no flanneld there) is reachable, one
// that does not exist is unreachable after LossThreshold timeouts; the
// report and Run's end follow.
func TestRunRealSocket(t *testing.T) {
	a, b := nstest.New(t, "probe"), nstest.New(t, "probe")
	a.Up(t, "lo")
	a.Veth(t, "eth0", 0, b, "eth0", "192.168.77.1/24")
	b.Up(t, "eth0", "192.168.77.2/24")
	log := ktesting.NewLogger(t, ktesting.NewConfig())
	pr := New(Options{Rate: 50, Timeout: 200 * time.Millisecond, Logger: &log})
	pr.open = func(src netip.Addr) (conn, error) { return openIn(t, a, src) }
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- pr.Run(ctx) }()
	path := Path{Backend: "host-gw", MTU: 1500, Source: netip.MustParseAddr("192.168.77.1")}
	pr.SetPeers(path, []Peer{
		{Subnet: netip.MustParsePrefix("10.5.2.0/24"), PublicIP: netip.MustParseAddr("192.168.77.2")},
		{Subnet: netip.MustParsePrefix("10.5.3.0/24"), PublicIP: netip.MustParseAddr("192.168.77.3")},
	})
	var rep Report
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		var err error
		if rep, err = pr.Report(ctx); err != nil {
			t.Fatal(err)
		}
		if rep.Counts["reachable"] == 1 && rep.Counts["unreachable"] == 1 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if len(rep.Peers) != 2 || rep.Peers[0].State != Unreachable || rep.Peers[1].State != Reachable || rep.Peers[1].LastRTTMs <= 0 {
		t.Errorf("report %+v: want 10.5.3.0/24 unreachable, 10.5.2.0/24 reachable with an RTT", rep)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Error(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not end")
	}
	if _, err := pr.Report(ctx); err == nil {
		t.Error("Report answered after Run ended")
	}
}
