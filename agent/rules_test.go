package agent

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"
)

// fakeRules is a rule keeper whose installs wait for release.
type fakeRules struct {
	network, lease netip.Prefix
	ensuring       chan struct{} // gets a value when an Ensure starts
	release        chan error    // Ensure returns what is sent
	mu             sync.Mutex
	runs, ensures  int
}

func (f *fakeRules) Ensure(ctx context.Context) error {
	f.mu.Lock()
	f.ensures++
	f.mu.Unlock()
	select {
	case f.ensuring <- struct{}{}:
	default:
	}
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

func (f *fakeRules) ensureCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ensures
}

// rulesFor returns an Options.Rules that hands out f (once).
func rulesFor(f *fakeRules) func(RuleSet) (Rules, error) {
	return func(set RuleSet) (Rules, error) {
		f.network, f.lease = set.Network, set.Lease
		return f, nil
	}
}

func newFakeRules() *fakeRules {
	return &fakeRules{ensuring: make(chan struct{}, 1), release: make(chan error, 1)}
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

// TestRulesInstallFailureIsRetried: a failed first install neither stops
// the daemon nor holds back subnet.env; it is reported (OnNotReady) and
// retried after the back-off, on the daemon's clock; ready comes once the
// rules are in.
func TestRulesInstallFailureIsRetried(t *testing.T) {
	l := newLab(t)
	l.config("")
	f := newFakeRules()
	errIPT := errors.New("iptables-restore: line 2 failed")
	f.release <- errIPT
	clk := clocktesting.NewFakeClock(time.Now())
	reasons := make(chan string, 10)
	r := l.start(Options{Rules: rulesFor(f), Clock: clk, RulesRetry: 4 * time.Second,
		OnNotReady: func(reason string) { reasons <- reason }})
	select {
	case reason := <-reasons:
		if !strings.Contains(reason, errIPT.Error()) {
			t.Errorf("not-ready reason %q does not name %q", reason, errIPT)
		}
	case err := <-r.done:
		t.Fatalf("daemon ended after a failed install: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("the failed install was not reported")
	}
	eventually(t, "subnet.env although the rules are not in", func() bool {
		_, err := os.Stat(filepath.Join(l.dir, "subnet.env"))
		return err == nil
	})
	// No retry before the back-off has passed on the daemon's clock.
	time.Sleep(50 * time.Millisecond) // the keeper starts waiting
	clk.Step(3 * time.Second)
	time.Sleep(50 * time.Millisecond)
	if n := f.ensureCount(); n != 1 {
		t.Fatalf("%d installs before the back-off passed, want 1", n)
	}
	select {
	case <-r.ready:
		t.Fatal("ready although the rules failed to install")
	default:
	}
	f.release <- nil
	eventually(t, "the retried install", func() bool {
		clk.Step(time.Second)
		select {
		case <-r.ready:
			return true
		default:
			return false
		}
	})
	if n := f.ensureCount(); n != 2 {
		t.Errorf("%d installs, want 2", n)
	}
	eventually(t, "the keeper's loop", func() bool { return f.runCount() == 1 })
}
