package agent

import (
	"context"
	"fmt"
	"runtime/debug"
	"time"

	"github.com/flanneld-go/flanneld/subnet"
)

// loop is the owner loop: everything that changes the node's state happens
// here, one event at a time, and nothing here waits for the store (renewals
// and acquisitions run in goroutines and come back as events), so routes are
// repaired and lease events handled while etcd is down.
func (n *node) loop(ctx context.Context, events <-chan []subnet.Event, werr <-chan error, configs <-chan subnet.ConfigUpdate) error {
	clk := n.o.Clock
	renew := clk.NewTimer(n.renewDelay())
	defer renew.Stop()
	resync := clk.NewTicker(n.o.RouteResync)
	defer resync.Stop()
	var coalesce <-chan time.Time // non-nil while an Apply is pending
	pending := 0                  // lease events since the last Apply
	apply := func(cause string) {
		coalesce = nil
		err := n.apply(ctx, cause)
		if err != nil && ctx.Err() == nil {
			n.log.Error(err, "Programming the backend failed; retrying", "cause", cause)
		}
		n.repair.applied(clk, err, n.o.RepairRetry, n.o.RouteResync)
		if pending >= burstEvents {
			debug.FreeOSMemory()
		}
		pending = 0
	}
	n.kick(ctx) // a loss seen in the first batch
	for {
		select {
		case <-ctx.Done():
			n.log.Info("Stopping; routes, devices and rules stay in place")
			return nil
		case err := <-werr:
			return ctxOr(ctx, fmt.Errorf("watching leases: %w", err))
		case batch := <-events:
			pending += len(batch)
			if n.update(batch) {
				n.store.lost = true
				n.kick(ctx)
			}
			if coalesce == nil {
				coalesce = clk.After(n.o.Coalesce)
			}
		case <-coalesce:
			apply("leases")
		case <-resync.C():
			apply("resync")
		case c := <-n.repair.events:
			n.repair.schedule(clk, c, n.o.RepairDelay, n.o.RepairMax)
		case <-n.repair.timer:
			apply(n.repair.cause)
		case <-n.repair.retry:
			apply("retry")
		case <-renew.C():
			n.store.renew = true
			n.kick(ctx)
		case <-n.store.retry:
			n.store.retry = nil
			n.kick(ctx)
		case r := <-n.store.results:
			if n.stored(ctx, r) {
				apply("lease")
			}
			switch {
			case r.op == opRenew && r.err != nil && !n.store.lost:
				renew.Reset(n.o.RenewRetry)
			case r.err == nil:
				renew.Reset(n.renewDelay())
			}
			n.kick(ctx)
		case err := <-n.rules.status:
			n.rulesInstalled(err)
		case u := <-configs:
			n.configSeen(u)
		}
	}
}

// update folds a batch of events into the lease set. It reports whether our
// own lease was removed or taken by another node.
func (n *node) update(batch []subnet.Event) (lost bool) {
	// Room for the new keys only: a burst of changes to known leases must
	// not grow the set's slice.
	adds := 0
	for i := range batch {
		if batch[i].Type == subnet.EventAdded && !n.leases.has(batch[i].Lease.Key()) {
			adds++
		}
	}
	n.leases.reserve(adds)
	for _, ev := range batch {
		l := ev.Lease
		key := l.Key()
		own := key == n.lease.Key()
		if ev.Type == subnet.EventRemoved {
			n.leases.remove(key)
			n.adm.forget(key)
			if own {
				n.log.Info("Own lease was removed from the store", "subnet", key)
				lost = true
			}
			continue
		}
		// Our lease as the store published it (a Kubernetes node may
		// publish public-ip-overwrite instead of our address).
		if own && l.Attrs.PublicIP == n.lease.Attrs.PublicIP && l.Attrs.PublicIPv6 == n.lease.Attrs.PublicIPv6 {
			n.leases.put(l)
			continue
		}
		if own {
			n.log.Info("Own subnet is now leased by another node", "subnet", key, "publicIP", l.Attrs.PublicIP)
			lost = true
		}
		if !n.adm.admit(l) {
			n.leases.remove(key)
			continue
		}
		n.leases.put(l)
	}
	return lost
}
