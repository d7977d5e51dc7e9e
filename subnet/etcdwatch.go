package subnet

import (
	"context"
	"errors"

	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/internal/metrics"
)

// WatchLeases implements Manager: a listing of the subnets prefix, then a
// watch from the listing's revision. The first batch is always sent, even
// when empty; batches after it are never empty. events is not closed.
//
// A compacted history, and a store that went back (restored from an older
// backup or wiped: its revision is below the watch's, or its cluster
// changed), end in a re-list whose difference from the known set is sent
// as events, so a lease that vanished is Removed and a node whose own key
// is gone writes it again. The store is looked at after a failed request
// and, while the watch is quiet, every checkInterval.
func (m *EtcdManager) WatchLeases(ctx context.Context, events chan<- []Event) error {
	w := &watcher{
		m:      m,
		known:  NewSummaries(0),
		logged: map[string]int64{},
		bo:     Backoff{Min: m.minBackoff, Max: m.maxBackoff},
		log:    m.log.WithValues("prefix", m.subnetsDir()),
	}
	return w.run(ctx, events)
}

// watcher is the state of one WatchLeases call, owned by its goroutine.
type watcher struct {
	m   *EtcdManager
	log klog.Logger
	// known is the set of leases last sent, by subnet, as summaries.
	known *Summaries
	// logged maps each key skipped as invalid to the revision it was
	// logged at, so that each bad version is logged once.
	logged map[string]int64
	// cursor is the point of the store's history the known set is current
	// to.
	cursor Rev
	// check asks for a look at the store before watching again: after a
	// failed request it may have been restored or replaced.
	check bool
	bo    Backoff
	// failures counts failed requests since etcd last answered.
	failures int
}

func (w *watcher) run(ctx context.Context, events chan<- []Event) error {
	needList, first := true, true
	relists := 0 // re-lists in a row without a watch answer between them
	for ctx.Err() == nil {
		if needList {
			evs, err := w.list(ctx)
			if err != nil {
				w.retry(ctx, err, "Listing leases failed; retrying")
				continue
			}
			w.answered()
			needList = false
			if first || len(evs) > 0 {
				if err := SendEvents(ctx, events, evs); err != nil {
					return err
				}
				first = false
			}
		}
		relist, answered, err := w.follow(ctx, events)
		if answered {
			relists = 0
		}
		switch {
		case ctx.Err() != nil:
		case relist:
			metrics.WatchResyncs.Inc()
			needList = true
			// A store that keeps going back (members of different pasts
			// answering in turn) is re-listed at the back-off's pace.
			if relists++; relists > 1 {
				Sleep(ctx, w.bo.Next())
			}
		default:
			w.check = true
			w.retry(ctx, err, "Watching leases failed; retrying")
		}
	}
	return ctx.Err()
}

// retry logs the first failure of an outage, and the rest only at -v=2
// (an etcd outage costs a line, not one per retry), then waits the
// back-off.
func (w *watcher) retry(ctx context.Context, err error, msg string) {
	if ctx.Err() != nil {
		return
	}
	d := w.bo.Next()
	if w.failures++; w.failures == 1 {
		w.log.Error(err, msg, "after", d)
	} else {
		w.log.V(2).Info(msg, "err", err.Error(), "after", d, "failures", w.failures)
	}
	Sleep(ctx, d)
}

// answered notes that etcd answered: the back-off starts again, and the
// end of an outage is logged.
func (w *watcher) answered() {
	w.bo.Reset()
	if w.failures > 0 {
		w.log.Info("etcd answers again; watching leases", "failedAttempts", w.failures)
		w.failures = 0
	}
}

// follow watches from the cursor until the watch fails (err) or the known
// set must be rebuilt (relist). answered tells whether a watch answer was
// applied.
func (w *watcher) follow(ctx context.Context, events chan<- []Event) (relist, answered bool, err error) {
	if w.check {
		if relist, err := w.wentBack(ctx); err != nil || relist {
			return relist, false, err
		}
		w.check = false
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	watch := w.m.ks.Watch(wctx, w.m.subnetsDir(), w.cursor.Index)
	for {
		nctx, ncancel := context.WithTimeout(wctx, w.m.checkInterval)
		changes, rev, err := watch.Next(nctx)
		quiet := nctx.Err() != nil
		ncancel()
		switch {
		case ctx.Err() != nil:
			return false, answered, ctx.Err()
		case errors.Is(err, ErrCompacted):
			w.log.V(2).Info("Watch history compacted; re-listing leases", "cursor", w.cursor.Index)
			return true, answered, nil
		case err != nil && quiet:
			if relist, err := w.wentBack(ctx); err != nil || relist {
				return relist, answered, err
			}
			continue
		case err != nil:
			return false, answered, err
		case w.reset(rev):
			return true, answered, nil
		}
		w.answered()
		answered = true
		if evs := w.apply(changes); len(evs) > 0 {
			if err := SendEvents(ctx, events, evs); err != nil {
				return false, answered, err
			}
		}
	}
}

// wentBack reads the config key to learn the store's revision and
// cluster, and reports whether the store went back.
func (w *watcher) wentBack(ctx context.Context) (bool, error) {
	_, rev, err := w.m.ks.Get(ctx, w.m.ConfigKey())
	if err != nil && !errors.Is(err, ErrDirectory) {
		return false, err
	}
	return w.reset(rev), nil
}

// reset reports (and logs) a store whose answer rev is not the one the
// known set was read from: restored from an older backup, or wiped.
func (w *watcher) reset(rev Rev) bool {
	if !rev.wentBack(w.cursor) {
		if w.cursor.Cluster == "" {
			w.cursor.Cluster = rev.Cluster
		}
		return false
	}
	w.log.Error(nil, "The etcd store went back (restored from a backup, wiped or replaced); listing the leases again",
		"revision", rev.Index, "watchedRevision", w.cursor.Index, "cluster", rev.Cluster, "previousCluster", w.cursor.Cluster)
	metrics.StoreResets.Inc()
	return true
}

// list reads the whole prefix, replaces the known set and returns the
// difference as events. The first list of a Manager's first watch uses the
// listing its lease acquisition just read, if any: the watch then resumes
// from that listing's revision, so nothing written since is missed.
func (w *watcher) list(ctx context.Context) ([]Event, error) {
	kvs, rev, ok := w.m.takeListing()
	if !ok {
		var err error
		if kvs, rev, err = w.m.ks.List(ctx, w.m.subnetsDir()); err != nil {
			return nil, wrap(err, "listing %s", w.m.subnetsDir())
		}
	}
	// Two keys of one lease (10.5.34.0-24 and 10.5.34.0-24&fc00::-64):
	// the one listed last counts.
	current := make([]Lease, 0, len(kvs))
	at := make(map[PrefixKey]int32, len(kvs))
	logged := make(map[string]int64, len(w.logged))
	for _, kv := range kvs {
		e, err := w.m.parseKV(kv)
		if err != nil {
			w.logBad(kv, err)
			logged[kv.Key] = kv.Mod
			continue
		}
		k := KeyOf(e.lease.Key())
		if i, ok := at[k]; ok {
			current[i] = e.lease
			continue
		}
		at[k] = int32(len(current))
		current = append(current, e.lease)
	}
	at = nil
	evs, known := DiffLeases(w.known, current)
	w.known, w.logged, w.cursor = known, logged, rev
	return evs, nil
}

// apply folds the changes of one watch answer into the known set.
func (w *watcher) apply(changes []Change) []Event {
	var out []Event
	for _, ch := range changes {
		kv := ch.KV
		w.cursor.Index = max(w.cursor.Index, kv.Mod)
		p, keyOK := w.m.leaseKeyPrefix(kv.Key)
		e, err := w.m.parseKV(kv)
		if ch.Deleted {
			delete(w.logged, kv.Key)
		} else if err != nil {
			w.logBad(kv, err)
			w.logged[kv.Key] = kv.Mod
		}
		if ch.Deleted || err != nil {
			// A key deleted, or that no longer parses, is no lease.
			if k, ok := w.known.Get(KeyOf(p)); keyOK && ok {
				w.known.Delete(KeyOf(p))
				out = append(out, k.Removed(p))
			}
			continue
		}
		delete(w.logged, kv.Key)
		sum := SummarizeLease(e.lease)
		if old, had := w.known.Get(KeyOf(p)); had && old == sum {
			continue // a renewal
		}
		w.known.Set(KeyOf(p), sum)
		out = append(out, Event{Type: EventAdded, Lease: e.lease})
	}
	return out
}

// logBad logs a key that is skipped, once per version of it.
func (w *watcher) logBad(kv KV, err error) {
	if rev, ok := w.logged[kv.Key]; ok && rev == kv.Mod {
		return
	}
	w.log.Info("Skipping a key under the subnets prefix; fix its value or remove it from etcd", "key", kv.Key, "revision", kv.Mod, "reason", err.Error())
}
