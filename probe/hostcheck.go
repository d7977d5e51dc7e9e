package probe

import (
	"context"
	"strconv"
	"sync/atomic"
	"time"

	"k8s.io/klog/v2"
	"k8s.io/utils/clock"
)

// Checker runs the host checks once it knows the host (Set), then every
// interval (the daemon's resync), in its own goroutine: they read /proc,
// netlink and iptables, which the owner loops must not wait for. Each check
// is logged once when it starts failing and once when it passes again;
// Results has the last outcome for /status.
type Checker struct {
	interval time.Duration
	clk      clock.WithTicker
	log      klog.Logger
	cfg      atomic.Pointer[HostConfig]
	results  atomic.Pointer[[]Check]
	wake     chan struct{}
}

// NewChecker returns a checker running every interval on clk (the real
// clock when nil).
func NewChecker(interval time.Duration, clk clock.WithTicker, log klog.Logger) *Checker {
	if clk == nil {
		clk = clock.RealClock{}
	}
	return &Checker{interval: interval, clk: clk, log: log, wake: make(chan struct{}, 1)}
}

// Set gives the checks the host to look at, and runs them soon if they
// never ran. It never blocks.
func (c *Checker) Set(h HostConfig) {
	first := c.cfg.Swap(&h) == nil
	if first {
		select {
		case c.wake <- struct{}{}:
		default:
		}
	}
}

// Results is the outcome of the last run (nil before the first).
func (c *Checker) Results() []Check {
	if r := c.results.Load(); r != nil {
		return *r
	}
	return nil
}

// Run runs the checks until ctx ends.
func (c *Checker) Run(ctx context.Context) error {
	t := c.clk.NewTicker(c.interval)
	defer t.Stop()
	failing := map[string]bool{}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-c.wake:
		case <-t.C():
		}
		h := c.cfg.Load()
		if h == nil {
			continue
		}
		res := RunChecks(ctx, *h)
		c.results.Store(&res)
		for i, ch := range res {
			key := ch.Name + "/" + strconv.Itoa(i)
			switch {
			case !ch.OK && !failing[key]:
				failing[key] = true
				c.log.Info("Host check failed: "+ch.Detail+"; "+ch.Fix, "check", ch.Name)
			case ch.OK && failing[key]:
				delete(failing, key)
				c.log.Info("Host check passes again: "+ch.Detail, "check", ch.Name)
			}
		}
	}
}
