package main

import (
	"context"
	"errors"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/flanneld-go/flanneld/subnet"
)

// configManager answers GetNetworkConfig from a channel and counts calls.
type configManager struct {
	subnet.Manager // other methods are not called
	mu             sync.Mutex
	calls          int
	answers        chan *subnet.Config
}

func (m *configManager) GetNetworkConfig(ctx context.Context) (*subnet.Config, error) {
	m.mu.Lock()
	m.calls++
	m.mu.Unlock()
	select {
	case c := <-m.answers:
		return c, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (m *configManager) callCount() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.calls
}

func TestPrefetchConfig(t *testing.T) {
	m := &configManager{answers: make(chan *subnet.Config, 2)}
	first := &subnet.Config{Network: netip.MustParsePrefix("10.5.0.0/16")}
	second := &subnet.Config{Network: netip.MustParsePrefix("10.6.0.0/16")}
	m.answers <- first
	e := prefetchConfig(context.Background(), m)

	got, err := e.GetNetworkConfig(context.Background())
	if err != nil || got != first {
		t.Fatalf("first GetNetworkConfig = %v, %v; want the prefetched %v", got, err, first)
	}
	if n := m.callCount(); n != 1 {
		t.Errorf("manager asked %d times for the first config, want once (the prefetch)", n)
	}
	m.answers <- second
	if got, err := e.GetNetworkConfig(context.Background()); err != nil || got != second {
		t.Errorf("second GetNetworkConfig = %v, %v; want a new read %v", got, err, second)
	}
	if n := m.callCount(); n != 2 {
		t.Errorf("manager asked %d times, want 2", n)
	}
}

// TestPrefetchConfigCanceled: the caller's context ends the wait for the
// prefetch, and the prefetch ends with its own context.
func TestPrefetchConfigCanceled(t *testing.T) {
	m := &configManager{answers: make(chan *subnet.Config)}
	ctx, cancel := context.WithCancel(context.Background())
	e := prefetchConfig(ctx, m)
	waitCtx, waitCancel := context.WithCancel(context.Background())
	waitCancel()
	if _, err := e.GetNetworkConfig(waitCtx); !errors.Is(err, context.Canceled) {
		t.Errorf("GetNetworkConfig with a canceled context = %v, want context.Canceled", err)
	}
	cancel()
	select {
	case <-e.done:
	case <-time.After(20 * time.Second):
		t.Fatal("prefetch still running 20s after its context ended")
	}
	if !errors.Is(e.err, context.Canceled) {
		t.Errorf("prefetch error = %v, want context.Canceled", e.err)
	}
}
