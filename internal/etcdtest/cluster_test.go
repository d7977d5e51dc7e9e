package etcdtest

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/client/v2"
)

// TestCluster starts three members: a write through one is read through
// each; with one member stopped the others still take writes; restarted,
// it has caught up.
func TestCluster(t *testing.T) {
	begin := time.Now()
	c := StartCluster(t, 3)
	t.Logf("started in %v", time.Since(begin))
	ctx := ctxT(t)
	eps := c.Endpoints()
	if len(eps) != 3 || eps[0] == eps[1] || eps[1] == eps[2] || eps[0] == eps[2] {
		t.Fatalf("endpoints %v, want three distinct ones", eps)
	}
	if _, err := c.Member(0).KeysAPI().Set(ctx, "/c", "one", nil); err != nil {
		t.Fatalf("set through member 0: %v", err)
	}
	for i, m := range c.Members() {
		resp, err := m.KeysAPI().Get(ctx, "/c", &client.GetOptions{Quorum: true})
		if err != nil || resp.Node.Value != "one" {
			t.Fatalf("get through member %d: %v, %v; want one", i, resp, err)
		}
	}

	leaders := 0
	for _, m := range c.Members() {
		if m.IsLeader() {
			leaders++
		}
	}
	if leaders != 1 {
		t.Errorf("%d members say they lead, want 1", leaders)
	}
	begin = time.Now()
	c.Member(1).Stop()
	t.Logf("stopped in %v", time.Since(begin))
	if c.Member(1).IsLeader() {
		t.Error("a stopped member says it leads")
	}
	if _, err := c.KeysAPI().Set(ctx, "/c", "two", nil); err != nil {
		t.Fatalf("set with member 1 stopped: %v", err)
	}
	begin = time.Now()
	if err := c.Member(1).Restart(); err != nil {
		t.Fatalf("restarting member 1: %v", err)
	}
	t.Logf("restarted in %v", time.Since(begin))
	resp, err := c.Member(1).KeysAPI().Get(ctx, "/c", &client.GetOptions{Quorum: true})
	if err != nil || resp.Node.Value != "two" {
		t.Fatalf("get through the restarted member: %v, %v; want two", resp, err)
	}
	begin = time.Now()
	if err := c.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	t.Logf("closed in %v", time.Since(begin))
	if err := c.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	if _, err := NewCluster(0); err == nil {
		t.Error("NewCluster(0) succeeded")
	}
	if _, err := NewCluster(3, WithTLS()); err == nil {
		t.Error("NewCluster with WithTLS succeeded")
	}
}

// TestClusterInNetNS puts a cluster's client ports in a namespace: clients
// there reach every member, a stopped member's clients move on, and no
// socket of the caller's namespace ever points at the namespace's address
// (the members talk to each other on the caller's loopback, never through
// the caller's routes).
func TestClusterInNetNS(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("creating a network namespace needs root")
	}
	ns := fmt.Sprintf("etcdtest-cl-%d", os.Getpid())
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	run("netns", "add", ns)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	addr := netip.MustParseAddr("10.251.0.1")
	run("-n", ns, "addr", "add", addr.String()+"/32", "dev", "lo")
	run("-n", ns, "link", "set", "lo", "up")

	c := StartCluster(t, 3, WithNetNS("/run/netns/"+ns), WithListen(addr, 0, 0))
	ctx := ctxT(t)
	for _, ep := range c.Endpoints() {
		if !strings.HasPrefix(ep, "http://"+addr.String()+":") {
			t.Fatalf("endpoint %s is not on %s", ep, addr)
		}
	}
	if _, err := c.KeysAPI().Set(ctx, "/ns", "1", nil); err != nil {
		t.Fatalf("set: %v", err)
	}
	c.Member(0).Stop()
	if _, err := c.KeysAPI().Set(ctx, "/ns", "2", nil); err != nil {
		t.Fatalf("set with member 0 stopped: %v", err)
	}
	if err := c.Member(0).Restart(); err != nil {
		t.Fatal(err)
	}
	resp, err := c.Member(0).KeysAPI().Get(ctx, "/ns", &client.GetOptions{Quorum: true})
	if err != nil || resp.Node.Value != "2" {
		t.Fatalf("get through the restarted member: %v, %v; want 2", resp, err)
	}
	out, err := exec.Command("ss", "-Htna").CombinedOutput()
	if err != nil {
		t.Fatalf("ss: %v: %s", err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if strings.Contains(line, addr.String()+":") {
			t.Errorf("a socket of the caller's namespace points at %s: %s", addr, line)
		}
	}
}
