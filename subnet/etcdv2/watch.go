package etcdv2

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path"
	"time"

	client "go.etcd.io/etcd/client/v2"
	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/internal/metrics"
	"github.com/flanneld-go/flanneld/subnet"
)

// WatchLeases implements subnet.Manager. The first batch is always sent,
// even when empty, so the receiver knows the initial set is complete.
// Batches after it are never empty. events is not closed.
func (m *Manager) WatchLeases(ctx context.Context, events chan<- []subnet.Event) error {
	w := &watcher{
		m:      m,
		dir:    m.subnetsDir(),
		known:  map[netip.Prefix]subnet.LeaseSummary{},
		logged: map[string]uint64{},
		bo:     subnet.Backoff{Min: m.minBackoff, Max: m.maxBackoff},
	}
	return w.run(ctx, events)
}

// watcher is the state of one WatchLeases call, owned by its goroutine.
type watcher struct {
	m   *Manager
	dir string
	// known is the set of leases last sent, by subnet, as summaries.
	known map[netip.Prefix]subnet.LeaseSummary
	// logged maps each key skipped as invalid to the ModifiedIndex it was
	// logged at, so that each bad version is logged once.
	logged map[string]uint64
	// cursor is the etcd index the set is current to.
	cursor uint64
	// clusterID is the X-Etcd-Cluster-ID of the store the set was read
	// from ("" before the first answer).
	clusterID string
	// check asks for a look at the store's index and cluster ID before the
	// next long poll: after a failed request the store may have been
	// restored from a backup or replaced by an empty one.
	check bool
	bo    subnet.Backoff
	// failures counts failed requests since etcd last answered.
	failures int
}

func (w *watcher) run(ctx context.Context, events chan<- []subnet.Event) error {
	log := w.m.log.WithValues("dir", w.dir)
	needList, first := true, true
	cleared := 0 // index-cleared answers in a row
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
				w.logFailure(log, err, "Listing leases failed; retrying", d)
				if !subnet.Sleep(ctx, d) {
					return ctx.Err()
				}
				continue
			}
			w.bo.Reset()
			w.recovered(log)
			needList = false
			if first || len(evs) > 0 {
				if err := send(ctx, events, evs); err != nil {
					return err
				}
				first = false
			}
			continue
		}

		if w.check {
			// A short read of the config key: the index and cluster ID of
			// the answer tell whether the store went back in time. It also
			// moves the client off a member that hangs without closing.
			index, clusterID, err := w.m.peek(ctx)
			if err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				d := w.bo.Next()
				w.logFailure(log, err, "Checking etcd failed; retrying", d)
				if !subnet.Sleep(ctx, d) {
					return ctx.Err()
				}
				continue
			}
			w.check = false
			if w.replaced(log, index, clusterID) {
				needList = true
				continue
			}
		}

		resp, err := w.poll(ctx)
		if err != nil {
			switch {
			case ctx.Err() != nil:
				return ctx.Err()
			case errors.Is(err, errPollTimeout):
				// A long poll with no news: look at the store, then
				// watch again.
				w.check = true
			case etcdCode(err) == client.ErrorCodeEventIndexCleared:
				// etcd no longer has the events after our cursor: re-list
				// and send the difference.
				log.V(2).Info("Watch index cleared; re-listing leases", "cursor", w.cursor)
				needList = true
				metrics.WatchResyncs.Inc()
				cleared++
				if cleared > 1 && !subnet.Sleep(ctx, w.bo.Next()) {
					return ctx.Err()
				}
			default:
				w.check = true
				d := w.bo.Next()
				w.logFailure(log, err, "Watching leases failed; retrying", d)
				if !subnet.Sleep(ctx, d) {
					return ctx.Err()
				}
			}
			continue
		}
		if w.replaced(log, resp.Index, resp.ClusterID) {
			needList = true
			continue
		}
		w.bo.Reset()
		w.recovered(log)
		cleared = 0
		evs, relist := w.apply(resp)
		// Far behind etcd (a burst of writes): one listing catches up
		// faster than one request per event, and sends one batch.
		if relist || resp.Index > resp.Node.ModifiedIndex+relistLag {
			needList = true
		}
		if len(evs) > 0 {
			if err := send(ctx, events, evs); err != nil {
				return err
			}
		}
	}
}

// logFailure logs the first failure of an outage, and the rest only at -v=2,
// so an etcd outage costs a line, not one per retry.
func (w *watcher) logFailure(log klog.Logger, err error, msg string, retry time.Duration) {
	w.failures++
	if w.failures == 1 {
		log.Error(err, msg, "after", retry)
		return
	}
	log.V(2).Info(msg, "err", err.Error(), "after", retry, "failures", w.failures)
}

// recovered notes the end of an outage.
func (w *watcher) recovered(log klog.Logger) {
	if w.failures > 0 {
		log.Info("etcd answers again; watching leases", "failedAttempts", w.failures)
		w.failures = 0
	}
}

// replaced reports whether the store that answered with index and
// clusterID is not the one the set was read from: its index is below the
// cursor (restored from an older backup, or wiped and started anew) or its
// cluster ID changed. The set is then listed again and the difference sent,
// so that leases written since are followed and a node whose own key is gone
// writes it again.
func (w *watcher) replaced(log klog.Logger, index uint64, clusterID string) bool {
	switch {
	case w.clusterID != "" && clusterID != "" && clusterID != w.clusterID:
		log.Error(nil, "etcd's cluster ID changed: the store was replaced; listing the leases again", "was", w.clusterID, "now", clusterID)
	case index != 0 && index < w.cursor:
		log.Error(nil, "etcd's index went back: the store was restored from a backup or wiped; listing the leases again", "cursor", w.cursor, "index", index)
	default:
		if clusterID != "" {
			w.clusterID = clusterID
		}
		return false
	}
	metrics.StoreResets.Inc()
	return true
}

// peek reads the config key for the store's index and cluster ID (the
// latter "" when the key is missing). An answer that is an etcd error other
// than a missing key (access refused, say) gives index 0: nothing to
// compare, and no reason to stop watching.
func (m *Manager) peek(ctx context.Context) (index uint64, clusterID string, err error) {
	resp, err := m.get(ctx, m.configKey(), nil)
	var e client.Error
	switch {
	case err == nil:
		return resp.Index, resp.ClusterID, nil
	case errors.As(err, &e) && e.Code == client.ErrorCodeKeyNotFound:
		return e.Index, "", nil
	case etcdCode(err) != 0:
		return 0, "", nil
	}
	return 0, "", err
}

func send(ctx context.Context, events chan<- []subnet.Event, evs []subnet.Event) error {
	select {
	case events <- evs:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

var errPollTimeout = errors.New("watch long poll timed out")

// relistLag is how many etcd writes the watch may trail the store by before
// it re-lists instead of reading the events one by one.
const relistLag = 256

// poll waits for the next change after the cursor, at most pollTimeout.
func (w *watcher) poll(ctx context.Context) (*client.Response, error) {
	pctx, cancel := context.WithTimeout(ctx, w.m.pollTimeout)
	defer cancel()
	wt := w.m.api.Watcher(w.dir, &client.WatcherOptions{AfterIndex: w.cursor, Recursive: true})
	resp, err := wt.Next(pctx)
	if err != nil {
		if ctx.Err() == nil && pctx.Err() != nil {
			return nil, errPollTimeout
		}
		countError(ctx, "watch", err)
		return nil, flatError(err)
	}
	if resp.Node == nil {
		return nil, fmt.Errorf("watching %s: etcd sent an event without a node", w.dir)
	}
	return resp, nil
}

// list reads the whole directory, replaces the known set and returns the
// difference as events.
// The first list of a Manager's first watch uses the listing its lease
// acquisition just read, if any: the watch then resumes from that listing's
// index, so nothing written since is missed.
func (w *watcher) list(ctx context.Context) ([]subnet.Event, error) {
	root, index, kept := w.m.takeListing()
	if !kept {
		resp, err := w.m.get(ctx, w.dir, &client.GetOptions{Recursive: true})
		switch {
		case err == nil:
			root, index = resp.Node, resp.Index
			if resp.ClusterID != "" {
				w.clusterID = resp.ClusterID
			}
		case etcdCode(err) == client.ErrorCodeKeyNotFound:
			var e client.Error
			errors.As(err, &e)
			index = e.Index
		default:
			return nil, fmt.Errorf("listing %s: %w", w.dir, err)
		}
	}
	current := make(map[netip.Prefix]subnet.Lease, len(w.known))
	logged := make(map[string]uint64, len(w.logged))
	for _, n := range flatten(root) {
		e, err := parseNode(w.dir, n)
		if err != nil {
			w.logBad(n, err)
			logged[n.Key] = n.ModifiedIndex
			continue
		}
		l := e.lease()
		current[l.Key()] = l
	}
	evs := subnet.DiffLeases(w.known, current)
	clear(w.known)
	for p, l := range current {
		w.known[p] = subnet.SummarizeLease(l)
	}
	w.logged, w.cursor = logged, index
	return evs, nil
}

// apply folds one watch event into the known set. relist asks for a full
// re-list (a directory was changed as a whole).
func (w *watcher) apply(resp *client.Response) (evs []subnet.Event, relist bool) {
	n := resp.Node
	w.cursor = n.ModifiedIndex
	if n.Dir || n.Key == w.dir {
		return nil, resp.Action != "set" && resp.Action != "create"
	}
	var p netip.Prefix
	var keyOK bool
	if path.Dir(n.Key) == w.dir {
		p, keyOK = leaseKeyPrefix(path.Base(n.Key))
	}
	switch resp.Action {
	case "delete", "expire", "compareAndDelete":
		delete(w.logged, n.Key)
		if !keyOK {
			return nil, false
		}
		if k, ok := w.known[p]; ok {
			delete(w.known, p)
			return []subnet.Event{k.Removed(p)}, false
		}
		return nil, false
	}
	e, err := parseNode(w.dir, n)
	if err != nil {
		w.logBad(n, err)
		w.logged[n.Key] = n.ModifiedIndex
		// A key that no longer parses is no lease any more.
		if k, ok := w.known[p]; keyOK && ok {
			delete(w.known, p)
			return []subnet.Event{k.Removed(p)}, false
		}
		return nil, false
	}
	delete(w.logged, n.Key)
	l := e.lease()
	old, had := w.known[p]
	w.known[p] = subnet.SummarizeLease(l)
	if had && old == w.known[p] {
		return nil, false // a renewal
	}
	return []subnet.Event{{Type: subnet.EventAdded, Lease: l}}, false
}

// logBad logs a key that is skipped, once per version of it.
func (w *watcher) logBad(n *client.Node, err error) {
	if idx, ok := w.logged[n.Key]; ok && idx == n.ModifiedIndex {
		return
	}
	w.m.log.Info("Skipping a key in the subnets directory; fix its value or remove it from etcd", "key", n.Key, "modifiedIndex", n.ModifiedIndex, "reason", err.Error())
}
