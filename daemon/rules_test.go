package daemon

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// fakeRules is a rule keeper whose first install waits for release.
type fakeRules struct {
	network, lease netip.Prefix
	ensuring       chan struct{} // closed when Ensure starts
	release        chan error    // Ensure returns what is sent
	mu             sync.Mutex
	runs           int
}

func (f *fakeRules) Ensure(ctx context.Context) error {
	close(f.ensuring)
	select {
	case err := <-f.release:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (f *fakeRules) Run(ctx context.Context) error {
	f.mu.Lock()
	f.runs++
	f.mu.Unlock()
	<-ctx.Done()
	return nil
}

func (f *fakeRules) runCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.runs
}

// rulesFor returns an Options.Rules that hands out f (once).
func rulesFor(f *fakeRules) func(netip.Prefix, netip.Prefix, bool) (Rules, error) {
	return func(network, lease netip.Prefix, _ bool) (Rules, error) {
		f.network, f.lease = network, lease
		return f, nil
	}
}

func newFakeRules() *fakeRules {
	return &fakeRules{ensuring: make(chan struct{}), release: make(chan error, 1)}
}

// TestReadyWaitsForRules: the rules are installed while the backend is
// programmed and subnet.env written, and ready comes only once both are in
// place; the keeper's loop starts after its first install.
func TestReadyWaitsForRules(t *testing.T) {
	l := newLab(t)
	l.config("")
	f := newFakeRules()
	r := l.start(Options{Rules: rulesFor(f)})
	envPath := filepath.Join(l.dir, "subnet.env")

	select {
	case <-f.ensuring:
	case err := <-r.done:
		t.Fatalf("daemon ended before installing rules: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("rules not being installed after 20s")
	}
	// subnet.env does not wait for the rules...
	eventually(t, "subnet.env while the rules are being installed", func() bool {
		_, err := os.Stat(envPath)
		return err == nil
	})
	// ...but ready does.
	select {
	case <-r.ready:
		t.Fatal("ready before the rules were installed")
	default:
	}
	if f.runCount() != 0 {
		t.Error("the keeper's loop started before its first install finished")
	}
	f.release <- nil
	r.waitReady(t)
	eventually(t, "the keeper's loop", func() bool { return f.runCount() == 1 })
	if f.network.String() != "10.5.0.0/16" || !f.lease.IsValid() || !f.network.Contains(f.lease.Addr()) {
		t.Errorf("rules built for network %v lease %v", f.network, f.lease)
	}
}

// TestRulesInstallFailureStopsStart: a failed first install is returned and
// ready never comes.
func TestRulesInstallFailureStopsStart(t *testing.T) {
	l := newLab(t)
	l.config("")
	f := newFakeRules()
	errIPT := errors.New("iptables-restore: line 2 failed")
	f.release <- errIPT
	r := l.start(Options{Rules: rulesFor(f)})
	select {
	case err := <-r.done:
		if !errors.Is(err, errIPT) {
			t.Fatalf("Run = %v, want an error wrapping %v", err, errIPT)
		}
		r.done <- err // for the cleanup
	case <-r.ready:
		t.Fatal("ready although the rules failed to install")
	case <-time.After(20 * time.Second):
		t.Fatal("daemon still running 20s after the rules failed")
	}
	select {
	case <-r.ready:
		t.Fatal("ready although the rules failed to install")
	default:
	}
	if f.runCount() != 0 {
		t.Error("the keeper's loop started although its first install failed")
	}
}
