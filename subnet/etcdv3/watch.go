package etcdv3

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/internal/metrics"
	"github.com/flanneld-go/flanneld/subnet"
)

// WatchLeases implements subnet.Manager: a listing of the subnets prefix,
// then one prefix watch from the listing's revision + 1. The first batch is
// always sent, even when empty; batches after it are never empty. events is
// not closed.
//
// A compacted revision, and a store that went back (a member restored from
// an older snapshot, or wiped: its revision is below the watch's, or its
// cluster ID changed), end in a re-list whose difference from the known set
// is sent as events, so a lease that vanished is Removed. The store is
// checked for going back when the watch (re)connects and, while the watch
// is quiet, every checkInterval.
func (m *Manager) WatchLeases(ctx context.Context, events chan<- []subnet.Event) error {
	w := &watcher{
		m:      m,
		dir:    m.subnetsDir(),
		known:  map[netip.Prefix]subnet.LeaseSummary{},
		logged: map[string]int64{},
		bo:     subnet.Backoff{Min: m.minBackoff, Max: m.maxBackoff},
		log:    m.log.WithValues("prefix", m.subnetsDir()),
	}
	return w.run(ctx, events)
}

// watcher is the state of one WatchLeases call, owned by its goroutine.
type watcher struct {
	m   *Manager
	dir string
	log klog.Logger
	// known is the set of leases last sent, by subnet, as summaries.
	known map[netip.Prefix]subnet.LeaseSummary
	// logged maps each key skipped as invalid to the ModRevision it was
	// logged at, so that each bad version is logged once.
	logged map[string]int64
	// cursor is the store revision the known set is current to; clusterID
	// the cluster that revision belongs to.
	cursor    int64
	clusterID uint64
	bo        subnet.Backoff
	// failures counts failed requests since etcd last answered.
	failures int
}

// why a watch stream was left.
type leave int

const (
	leaveRelist leave = iota // the known set must be rebuilt from a listing
	leaveRetry               // the stream failed; watch again from the cursor
)

func (w *watcher) run(ctx context.Context, events chan<- []subnet.Event) error {
	needList, first := true, true
	relists := 0 // re-lists in a row without a watch response between them
	var reconnected <-chan struct{}
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		if needList {
			evs, err := w.list(ctx)
			if err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				d := w.bo.Next()
				w.logFailure(err, "Listing leases failed; retrying", d)
				if !subnet.Sleep(ctx, d) {
					return ctx.Err()
				}
				continue
			}
			w.bo.Reset()
			w.recovered()
			needList = false
			if first || len(evs) > 0 {
				if err := send(ctx, events, evs); err != nil {
					return err
				}
				first = false
			}
		}
		st, err := w.m.conn.get(ctx)
		if err != nil {
			needList = true // the client is closed or cannot be made
			continue
		}
		if reconnected == nil && w.m.checkOnReconnect {
			reconnected = connectionReady(ctx, st.ActiveConnection())
		}
		why, answered, err := w.follow(ctx, st, events, reconnected)
		if answered {
			relists = 0
		}
		switch {
		case ctx.Err() != nil:
			return ctx.Err()
		case why == leaveRelist:
			metrics.WatchResyncs.Inc()
			needList = true
			// A store that keeps going back (members of different pasts
			// answering in turn) is re-listed at the back-off's pace.
			if relists++; relists > 1 && !subnet.Sleep(ctx, w.bo.Next()) {
				return ctx.Err()
			}
		default:
			d := w.bo.Next()
			w.logFailure(err, "Watching leases failed; retrying", d)
			if !subnet.Sleep(ctx, d) {
				return ctx.Err()
			}
		}
	}
}

// follow watches the prefix from the cursor until the stream ends or the
// known set must be rebuilt. answered tells whether a watch response was
// applied.
func (w *watcher) follow(ctx context.Context, st store, events chan<- []subnet.Event, reconnected <-chan struct{}) (why leave, answered bool, err error) {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	wch := st.Watch(wctx, w.dir, clientv3.WithPrefix(), clientv3.WithRev(w.cursor+1), clientv3.WithCreatedNotify())
	check := newTicker(w.m.checkInterval)
	defer check.Stop()
	for {
		select {
		case <-ctx.Done():
			return leaveRetry, answered, ctx.Err()
		case wr, ok := <-wch:
			if !ok {
				return leaveRetry, answered, errors.New("the watch stream ended")
			}
			if wr.CompactRevision != 0 || errors.Is(wr.Err(), rpctypes.ErrCompacted) {
				w.log.V(2).Info("Watch revision compacted; re-listing leases", "cursor", w.cursor, "compacted", wr.CompactRevision)
				return leaveRelist, answered, nil
			}
			if err := wr.Err(); err != nil {
				countError(ctx, "watch", err)
				return leaveRetry, answered, err
			}
			if w.wentBack(wr.Header.Revision, wr.Header.ClusterId) {
				return leaveRelist, answered, nil
			}
			w.bo.Reset()
			w.recovered()
			answered = true
			if evs := w.apply(wr.Events); len(evs) > 0 {
				if err := send(ctx, events, evs); err != nil {
					return leaveRetry, answered, err
				}
			}
		case <-reconnected:
			if w.checkStore(ctx) {
				return leaveRelist, answered, nil
			}
		case <-check.C:
			if w.checkStore(ctx) {
				return leaveRelist, answered, nil
			}
		}
	}
}

// checkStore reads the config key to learn the store's revision and cluster
// ID, and reports whether the store went back. A failed read reports no.
func (w *watcher) checkStore(ctx context.Context) bool {
	resp, err := w.m.get(ctx, w.m.configKey(), clientv3.WithKeysOnly())
	if err != nil {
		if ctx.Err() == nil {
			w.log.V(2).Info("Checking the etcd revision failed", "err", err.Error())
		}
		return false
	}
	return w.wentBack(resp.Header.Revision, resp.Header.ClusterId)
}

// wentBack reports (and logs) a store whose revision is below the cursor or
// whose cluster ID changed: restored from an older snapshot, or wiped.
func (w *watcher) wentBack(rev int64, clusterID uint64) bool {
	if rev == 0 {
		return false // a response without header
	}
	if rev >= w.cursor && clusterID == w.clusterID {
		return false
	}
	w.log.Info("The etcd store went back (restored from an older snapshot, or wiped); re-listing leases",
		"revision", rev, "watchedRevision", w.cursor, "clusterID", fmt.Sprintf("%x", clusterID), "previousClusterID", fmt.Sprintf("%x", w.clusterID))
	return true
}

// list reads the whole prefix, replaces the known set and returns the
// difference as events. The first list of a Manager's first watch uses the
// listing its lease acquisition just read, if any.
func (w *watcher) list(ctx context.Context) ([]subnet.Event, error) {
	resp := w.m.takeListing()
	if resp == nil {
		var err error
		resp, err = w.m.get(ctx, w.dir, clientv3.WithPrefix())
		if err != nil {
			return nil, fmt.Errorf("listing %s: %w", w.dir, err)
		}
	}
	current := make(map[netip.Prefix]subnet.Lease, len(w.known))
	logged := make(map[string]int64, len(w.logged))
	for _, kv := range resp.Kvs {
		e, err := parseKV(w.dir, kv)
		if err != nil {
			w.logBad(kv, err)
			logged[string(kv.Key)] = kv.ModRevision
			continue
		}
		l := e.lease()
		l.Expiration = w.expiration(kv)
		current[l.Key()] = l
	}
	evs := subnet.DiffLeases(w.known, current)
	clear(w.known)
	for p, l := range current {
		w.known[p] = subnet.SummarizeLease(l)
	}
	w.logged, w.cursor, w.clusterID = logged, resp.Header.Revision, resp.Header.ClusterId
	return evs, nil
}

// expiration is unknown for a key attached to an etcd lease without asking
// etcd (one request per key); receivers only tell a reservation (zero) from
// a lease, so a lease key gets its longest possible expiry.
func (w *watcher) expiration(kv *mvccpb.KeyValue) (t time.Time) {
	if kv.Lease == 0 {
		return t
	}
	return w.m.now().Add(LeaseTTL)
}

// apply folds the events of one watch response into the known set.
func (w *watcher) apply(evs []*clientv3.Event) []subnet.Event {
	var out []subnet.Event
	for _, ev := range evs {
		kv := ev.Kv
		if kv.ModRevision > w.cursor {
			w.cursor = kv.ModRevision
		}
		name := string(kv.Key[min(len(w.dir), len(kv.Key)):])
		p, keyOK := leaseKeyPrefix(name)
		if ev.Type == clientv3.EventTypeDelete {
			delete(w.logged, string(kv.Key))
			if k, ok := w.known[p]; keyOK && ok {
				delete(w.known, p)
				out = append(out, k.Removed(p))
			}
			continue
		}
		e, err := parseKV(w.dir, kv)
		if err != nil {
			w.logBad(kv, err)
			w.logged[string(kv.Key)] = kv.ModRevision
			// A key that no longer parses is no lease any more.
			if k, ok := w.known[p]; keyOK && ok {
				delete(w.known, p)
				out = append(out, k.Removed(p))
			}
			continue
		}
		delete(w.logged, string(kv.Key))
		l := e.lease()
		l.Expiration = w.expiration(kv)
		sum := subnet.SummarizeLease(l)
		if old, had := w.known[p]; had && old == sum {
			continue // a renewal
		}
		w.known[p] = sum
		out = append(out, subnet.Event{Type: subnet.EventAdded, Lease: l})
	}
	return out
}

// logBad logs a key that is skipped, once per version of it.
func (w *watcher) logBad(kv *mvccpb.KeyValue, err error) {
	if rev, ok := w.logged[string(kv.Key)]; ok && rev == kv.ModRevision {
		return
	}
	w.log.Info("Skipping a key under the subnets prefix; fix its value or remove it from etcd", "key", string(kv.Key), "modRevision", kv.ModRevision, "reason", err.Error())
}

// logFailure logs the first failure of an outage, and the rest only at -v=2,
// so an etcd outage costs a line, not one per retry.
func (w *watcher) logFailure(err error, msg string, retry time.Duration) {
	w.failures++
	if w.failures == 1 {
		w.log.Error(err, msg, "after", retry)
		return
	}
	w.log.V(2).Info(msg, "err", err.Error(), "after", retry, "failures", w.failures)
}

// recovered notes the end of an outage.
func (w *watcher) recovered() {
	if w.failures > 0 {
		w.log.Info("etcd answers again; watching leases", "failedAttempts", w.failures)
		w.failures = 0
	}
}

func send(ctx context.Context, events chan<- []subnet.Event, evs []subnet.Event) error {
	select {
	case events <- evs:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// connectionReady returns a channel that receives when conn becomes ready
// again after having been down: the client reconnected (its watches resume
// by themselves, so this is the moment to check the store did not go
// back). The goroutine ends with ctx.
func connectionReady(ctx context.Context, conn *grpc.ClientConn) <-chan struct{} {
	ch := make(chan struct{}, 1)
	if conn == nil {
		return ch
	}
	go func() {
		state := conn.GetState()
		// Only a return to Ready after a first Ready is a reconnection.
		up := state == connectivity.Ready
		wasDown := false
		for conn.WaitForStateChange(ctx, state) {
			state = conn.GetState()
			switch state {
			case connectivity.Ready:
				if wasDown {
					select {
					case ch <- struct{}{}:
					default:
					}
				}
				up, wasDown = true, false
			case connectivity.TransientFailure, connectivity.Connecting, connectivity.Idle:
				wasDown = up
			case connectivity.Shutdown:
				return
			}
		}
	}()
	return ch
}

// newTicker is a ticker of d, or one that never fires when d <= 0.
func newTicker(d time.Duration) *time.Ticker {
	t := time.NewTicker(max(d, time.Hour))
	if d > 0 {
		t.Reset(d)
	} else {
		t.Stop()
	}
	return t
}
