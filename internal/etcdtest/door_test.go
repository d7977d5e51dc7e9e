package etcdtest

import (
	"testing"
	"time"

	"go.etcd.io/etcd/client/v2"
)

// TestStopEndsPendingWatch stops a server while a v2 watch long-polls it:
// the watch ends with an error at once, as when the member dies (embedded
// etcd alone leaves it hanging), and after Restart a new watch sees new
// writes.
func TestStopEndsPendingWatch(t *testing.T) {
	s := Start(t)
	ctx := ctxT(t)
	kapi := s.KeysAPI()
	r, err := kapi.Set(ctx, "/w", "1", nil)
	if err != nil {
		t.Fatalf("set: %v", err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := kapi.Watcher("/w", &client.WatcherOptions{AfterIndex: r.Index}).Next(ctx)
		done <- err
	}()
	time.Sleep(200 * time.Millisecond) // let the long poll reach the server
	begin := time.Now()
	s.Stop()
	t.Logf("Stop took %v", time.Since(begin))
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("the pending watch returned an event, want an error: nothing was written")
		}
		t.Logf("pending watch ended %v after Stop began: %v", time.Since(begin), err)
	case <-time.After(20 * time.Second):
		t.Fatal("the pending watch is still open 20 s after Stop")
	}

	if err := s.Restart(); err != nil {
		t.Fatalf("restart: %v", err)
	}
	next := make(chan *client.Response, 1)
	go func() {
		resp, err := kapi.Watcher("/w", &client.WatcherOptions{AfterIndex: r.Index}).Next(ctx)
		if err != nil {
			t.Errorf("watch after restart: %v", err)
		}
		next <- resp
	}()
	if _, err := kapi.Set(ctx, "/w", "2", nil); err != nil {
		t.Fatalf("set after restart: %v", err)
	}
	if resp := <-next; resp != nil && resp.Node.Value != "2" {
		t.Fatalf("watch after restart saw %q, want 2", resp.Node.Value)
	}
}
