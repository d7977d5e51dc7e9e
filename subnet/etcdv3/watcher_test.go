package etcdv3

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/subnet"
)

const testDir = testPrefix + "/subnets/"

func newTestWatcher(log klog.Logger) *watcher {
	m := &Manager{now: time.Now, log: log}
	return &watcher{m: m, dir: testDir, log: log, known: map[netip.Prefix]subnet.LeaseSummary{}, logged: map[string]int64{}}
}

// evString renders events compactly: "+10.5.1.0/24@192.168.0.1 -10.5.2.0/24".
func evString(evs []subnet.Event) string {
	var parts []string
	for _, e := range evs {
		sign := "+"
		if e.Type == subnet.EventRemoved {
			sign = "-"
		}
		parts = append(parts, sign+e.Lease.Subnet.String()+"@"+e.Lease.Attrs.PublicIP.String())
	}
	return strings.Join(parts, " ")
}

// TestWatcherApply folds a sequence of watch events, one at a time, into a
// watcher and checks the events it reports, its cursor and what it logs.
func TestWatcherApply(t *testing.T) {
	var logs []string
	w := newTestWatcher(captureLogger(&logs))
	put := func(name, value string, rev int64) *clientv3.Event {
		return &clientv3.Event{Type: clientv3.EventTypePut, Kv: &mvccpb.KeyValue{Key: []byte(testDir + name), Value: []byte(value), ModRevision: rev, Lease: 7}}
	}
	del := func(name string, rev int64) *clientv3.Event {
		return &clientv3.Event{Type: clientv3.EventTypeDelete, Kv: &mvccpb.KeyValue{Key: []byte(testDir + name), ModRevision: rev}}
	}
	steps := []struct {
		ev   *clientv3.Event
		want string
		logs int
	}{
		{put("10.5.1.0-24", `{"PublicIP":"192.168.0.1"}`, 10), "+10.5.1.0/24@192.168.0.1", 0},
		{put("10.5.1.0-24", `{"PublicIP":"192.168.0.1"}`, 11), "", 0}, // a renewal
		{put("10.5.1.0-24", `{"PublicIP":"192.168.0.9"}`, 12), "+10.5.1.0/24@192.168.0.9", 0},
		{put("10.5.2.0-24&fc00:0:0:2::-64", `{"PublicIP":"192.168.0.2","PublicIPv6":null}`, 13), "+10.5.2.0/24@192.168.0.2", 0},
		{put("10.5.1.0-24", `{"PublicIP":"nope"}`, 14), "-10.5.1.0/24@192.168.0.9", 1}, // turned bad
		{put("10.5.1.0-24", `{"PublicIP":"nope"}`, 14), "", 1},                         // same version: logged once
		{put("junk", `{"PublicIP":"192.168.0.3"}`, 15), "", 2},
		{put("sub/10.5.3.0-24", `{"PublicIP":"192.168.0.3"}`, 16), "", 3},
		{del("10.5.1.0-24", 17), "", 3}, // not known any more
		{del("10.5.2.0-24&fc00:0:0:2::-64", 18), "-10.5.2.0/24@192.168.0.2", 3},
	}
	for i, s := range steps {
		got := evString(w.apply([]*clientv3.Event{s.ev}))
		if got != s.want {
			t.Errorf("step %d (%s %s): events %q, want %q", i, s.ev.Type, s.ev.Kv.Key, got, s.want)
		}
		if w.cursor != s.ev.Kv.ModRevision {
			t.Errorf("step %d: cursor %d, want %d", i, w.cursor, s.ev.Kv.ModRevision)
		}
		if len(logs) != s.logs {
			t.Errorf("step %d: %d log lines, want %d: %q", i, len(logs), s.logs, logs)
		}
	}
	if len(w.known) != 0 {
		t.Errorf("known = %v, want empty", w.known)
	}
}

// TestWentBack: a revision below the cursor or another cluster ID is a
// store that went back; a response without header is not.
func TestWentBack(t *testing.T) {
	for _, tc := range []struct {
		rev       int64
		clusterID uint64
		want      bool
	}{
		{100, 1, false},
		{250, 1, false},
		{99, 1, true},
		{1, 1, true},
		{100, 2, true},
		{0, 0, false},
	} {
		w := newTestWatcher(klog.Background())
		w.log = captureLogger(new([]string))
		w.cursor, w.clusterID = 100, 1
		if got := w.wentBack(tc.rev, tc.clusterID); got != tc.want {
			t.Errorf("wentBack(revision %d, cluster %d) after revision 100 of cluster 1 = %v, want %v", tc.rev, tc.clusterID, got, tc.want)
		}
	}
}
