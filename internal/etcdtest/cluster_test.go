package etcdtest

import (
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

	begin = time.Now()
	c.Member(1).Stop()
	t.Logf("stopped in %v", time.Since(begin))
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
