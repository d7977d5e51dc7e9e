package agent

import (
	"context"
	"time"

	"k8s.io/utils/clock"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/backend/kwatch"
)

// repairState is the owner loop's part of the repair on kernel events: a
// kernel event that removes owned state schedules an Apply RepairDelay
// later (a burst of events is folded into one, see schedule), and a failed Apply
// is retried after RepairRetry, doubling up to RouteResync. The periodic
// resync stays as the safety net.
type repairState struct {
	w      *kwatch.Watcher     // nil without a watcher
	events <-chan kwatch.Cause // nil without a watcher
	t      clock.Timer         // the scheduled repair, nil if none
	timer  <-chan time.Time    // t's channel; nil if none
	first  time.Time           // when the first event of the repair came
	cause  string              // the cause of the scheduled repair
	retry  <-chan time.Time    // non-nil while a retry is scheduled
	wait   time.Duration       // the next retry's wait; 0 after a success
}

// watchKernel starts the kernel event watcher of what the backend owns, in
// the namespace Options.KernelEvents names. Without it, or when the
// subscription fails, kernel state is repaired by the resync alone.
func (n *node) watchKernel(ctx context.Context, owned backend.Owned) {
	if n.o.KernelEvents == nil || (len(owned.Devices) == 0 && owned.ExtIndex == 0 && len(owned.Prefixes) == 0) {
		return
	}
	w := kwatch.New(kwatch.Options{Owned: owned, Netns: n.o.KernelEvents, Logger: n.log.WithName("kwatch")})
	if err := w.Start(); err != nil {
		n.log.Error(err, "Kernel events unavailable; kernel state is repaired by the periodic resync only", "every", n.o.RouteResync)
		return
	}
	n.repair.w, n.repair.events = w, w.C()
	n.goRun(func() {
		if err := w.Run(ctx); err != nil {
			n.log.Error(err, "Watching kernel events stopped; kernel state is repaired by the periodic resync only")
		}
	})
}

// writing marks the backend's own writes, whose echo (additions and
// replacements) is not a cause (see kwatch.Watcher.Writing).
func (r *repairState) writing(on bool) {
	if r.w != nil {
		r.w.Writing(on)
	}
}

// schedule plans a repair for cause c: delay from now, and again delay
// from each further event (a burst is one repair), but never later than
// RepairMax after the first. While Apply keeps failing, deletions wait for
// the retry's back-off instead: a failing Apply may itself delete what it
// just wrote (a lease rolled back), which must not turn into a loop. Link
// changes are never held back.
func (r *repairState) schedule(clk clock.Clock, c kwatch.Cause, delay, limit time.Duration) {
	if r.wait > 0 && c != kwatch.LinkChanged && c != kwatch.ExtChanged {
		delay = max(delay, r.wait)
	}
	now := clk.Now()
	if r.t == nil {
		r.first, r.cause = now, string(c)
		r.t = clk.NewTimer(delay)
		r.timer = r.t.C()
		return
	}
	if now.Add(delay).After(r.first.Add(limit)) {
		return
	}
	r.t.Stop()
	r.t = clk.NewTimer(delay)
	r.timer = r.t.C()
}

// applied records the result of an Apply, whatever asked for it: the plans
// are done, and a failure schedules a retry.
func (r *repairState) applied(clk clock.Clock, err error, first, limit time.Duration) {
	if r.t != nil {
		r.t.Stop()
	}
	r.t, r.timer, r.retry = nil, nil, nil
	if err == nil {
		r.wait = 0
		return
	}
	r.wait = min(max(2*r.wait, first), limit)
	r.retry = clk.After(r.wait)
}
