package kube

import (
	"testing"
	"time"

	"github.com/flanneld-go/flanneld/internal/kubetest"
)

// TestWatchLeasesAfterOutage (issue 17 §3b): the API server is stopped for
// 10 s (a control-plane upgrade) and started again; a node that becomes a
// lease as soon as it answers reaches a running watch. The delay from the
// API server being ready to the event is logged (target: 2 s; client-go's
// own back-off would wait up to 30 s and more).
func TestWatchLeasesAfterOutage(t *testing.T) {
	if testing.Short() {
		t.Skip("a 10 s API server outage")
	}
	s := kubetest.Start(t) // its own server: the others' tests keep theirs
	f := &fixture{t: t, admin: s.Admin(t), cfg: s.Config(s.AdminToken), prefix: testPrefix(t), path: writeConf(t, netConf), logs: &logLines{}}
	f.leaseNode("o-a", "10.5.71.0/24", "192.168.8.71")
	events, _ := startWatch(t, f.manager(f.cfg, "me"))
	next(t, events)
	s.Stop()
	time.Sleep(10 * time.Second)
	began := time.Now()
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	answered := time.Now()
	t.Logf("the API server took %v to start", answered.Sub(began).Round(time.Millisecond))
	f.leaseNode("o-b", "10.5.72.0/24", "192.168.8.72")
	written := time.Now()
	got := describe(next(t, events))
	if want := `added 10.5.72.0/24 192.168.8.72 vxlan {"VNI":1,"VtepMAC":"82:4b:b6:2f:54:4e"}`; got != want {
		t.Errorf("after the outage: %s, want %s", got, want)
	}
	t.Logf("after a 10 s outage: the API server was ready, the node written %v later and watched %v after that",
		written.Sub(answered).Round(time.Millisecond), time.Since(written).Round(time.Millisecond))
}
