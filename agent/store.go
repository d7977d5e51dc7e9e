package agent

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/flanneld-go/flanneld/internal/metrics"
	"github.com/flanneld-go/flanneld/subnet"
)

// storeOp is a blocking call to the lease store that the owner loop runs in
// a goroutine of its own.
type storeOp int

const (
	opRenew storeOp = iota
	opAcquire
)

func (op storeOp) String() string {
	if op == opAcquire {
		return "acquire"
	}
	return "renew"
}

// storeResult is what a store goroutine reports back to the loop.
type storeResult struct {
	op    storeOp
	lease subnet.Lease
	err   error
}

// storeState is the loop's view of its store I/O: at most one call runs at
// a time, and what is due waits for it.
type storeState struct {
	results chan storeResult
	busy    bool // a call is running
	lost    bool // the own lease is gone: acquire again (before any renewal)
	renew   bool // the renewal is due
	// retry is non-nil while a failed acquisition waits to be retried.
	retry <-chan time.Time
	wait  time.Duration // the next acquisition back-off
}

// kick starts the store call that is due, if none runs: acquiring a lost
// lease goes before a renewal, and waits out its back-off.
func (n *node) kick(ctx context.Context) {
	s := &n.store
	switch {
	case s.busy:
	case s.lost && s.retry == nil:
		n.startStore(ctx, opAcquire)
	case !s.lost && s.renew:
		n.startStore(ctx, opRenew)
	}
}

// startStore runs op in a goroutine on a copy of the lease; the result comes
// back on n.store.results (or is dropped when ctx ends).
func (n *node) startStore(ctx context.Context, op storeOp) {
	n.store.busy = true
	lease, cfg, attrs := n.lease, n.cfg, n.attrs
	n.goRun(func() {
		r := storeResult{op: op, lease: lease}
		switch op {
		case opRenew:
			r.err = n.o.Manager.RenewLease(ctx, &r.lease)
		case opAcquire:
			var l *subnet.Lease
			// Prefer the subnet held so far.
			if l, r.err = n.o.Manager.AcquireLease(ctx, cfg, attrs, lease); l != nil {
				r.lease = *l
			}
		}
		select {
		case n.store.results <- r:
		case <-ctx.Done():
		}
	})
}

// stored folds a store result into the node's state. It reports whether
// the kernel must be programmed again (the lease moved).
func (n *node) stored(ctx context.Context, r storeResult) (reapply bool) {
	s := &n.store
	s.busy = false
	if ctx.Err() != nil {
		return false
	}
	switch r.op {
	case opRenew:
		s.renew = false
		switch err := r.err; {
		case err == nil:
			if r.lease.Key() != n.lease.Key() {
				return false // renewed a lease given up meanwhile
			}
			n.lease.Expiration = r.lease.Expiration
			metrics.LeaseRenewals.WithLabelValues("ok").Inc()
			metrics.LeaseExpiration.Set(expiry(n.lease))
			n.log.V(1).Info("Renewed lease", "subnet", n.lease.Subnet, "expires", n.lease.Expiration)
		case errors.Is(err, subnet.ErrLeaseLost):
			metrics.LeaseRenewals.WithLabelValues("lost").Inc()
			n.log.Info("Own lease is gone; acquiring again", "subnet", n.lease.Subnet, "reason", err)
			s.lost = true
		default:
			metrics.LeaseRenewals.WithLabelValues("error").Inc()
			n.log.Error(err, "Renewing lease failed; retrying", "in", n.o.RenewRetry)
		}
		return false
	default: // opAcquire
		if r.err != nil {
			if s.wait == 0 {
				s.wait = n.o.AcquireRetry
			}
			n.log.Error(r.err, "Re-acquiring lease failed; retrying", "in", s.wait)
			s.retry = n.o.Clock.After(s.wait)
			s.wait = min(2*s.wait, maxRetry)
			return false
		}
		s.lost, s.renew, s.wait = false, false, 0
		n.adopt(ctx, r.lease)
		return true
	}
}

// adopt makes l the own lease after a re-acquisition. A lease that moved to
// another subnet is logged loudly and republished (subnet.env, rules).
func (n *node) adopt(ctx context.Context, l subnet.Lease) {
	old := n.lease
	n.setLease(l)
	if l.Subnet == old.Subnet && l.IPv6Subnet == old.IPv6Subnet {
		n.log.Info("Re-acquired lease", "subnet", l.Subnet, "ipv6Subnet", l.IPv6Subnet, "expires", l.Expiration)
		return
	}
	n.log.Error(nil, "LEASE MOVED: the previous subnet could not be kept; containers on this host must be restarted to use the new one",
		"previous", old.Subnet, "subnet", l.Subnet, "previousIPv6", old.IPv6Subnet, "ipv6Subnet", l.IPv6Subnet)
	// Our old subnet is no lease of ours any more; one of another node
	// stays.
	if o, ok := n.leases.get(old.Key()); ok && old.Key() != l.Key() && o.Attrs.PublicIP == n.attrs.PublicIP && o.Attrs.PublicIPv6 == n.attrs.PublicIPv6 {
		n.leases.remove(old.Key())
	}
	if err := n.writeEnv(); err != nil {
		n.log.Error(err, "Writing the subnet file for the new lease failed")
	}
	if err := n.startRules(ctx); err != nil {
		n.log.Error(err, "Setting up the rules for the new lease failed")
	}
}

// renewDelay is the wait until the next renewal; a reservation never expires.
func (n *node) renewDelay() time.Duration {
	if n.lease.Reservation() {
		return 1<<63 - 1
	}
	return max(n.lease.Expiration.Sub(n.o.Clock.Now())-n.o.RenewMargin, 0)
}

// acquire obtains the first lease, retrying transient errors with back-off
// until ctx ends; nothing else runs yet. A full range, or a lease the
// network config refuses (a podCIDR outside Network), is returned as an
// error: the daemon stops with it.
func (n *node) acquire(ctx context.Context, prev subnet.Lease) (*subnet.Lease, error) {
	wait := n.o.AcquireRetry
	for {
		l, err := n.o.Manager.AcquireLease(ctx, n.cfg, n.attrs, prev)
		if err == nil {
			n.log.Info("Acquired lease", "subnet", l.Subnet, "reservation", l.Reservation(), "expires", l.Expiration)
			return l, nil
		}
		if errors.Is(err, subnet.ErrNoFreeSubnets) || errors.Is(err, subnet.ErrInvalidConfig) || ctx.Err() != nil {
			return nil, fmt.Errorf("acquiring lease: %w", err)
		}
		n.log.Error(err, "Acquiring lease failed; retrying", "in", wait)
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-n.o.Clock.After(wait):
		}
		wait = min(wait*2, maxRetry)
	}
}
