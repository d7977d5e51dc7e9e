package etcdv3

import (
	"context"
	"errors"
	"fmt"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flanneld-go/flanneld/subnet"
)

// WatchConfig implements subnet.Manager: one read of the config key, then a
// watch of it from the read's revision + 1. Each event, and each check (on
// reconnection, and every checkInterval while quiet) that finds the store
// went back, leads to a fresh read; an update is sent only when what the read found differs from the
// last one sent (the value, or that the key is missing).
func (m *Manager) WatchConfig(ctx context.Context, updates chan<- subnet.ConfigUpdate) error {
	key := m.configKey()
	bo := subnet.Backoff{Min: m.minBackoff, Max: m.maxBackoff}
	var last string // the value sent last; "" with sent: the key was missing
	sent, failed := false, false
	var reconnected <-chan struct{}
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		resp, err := m.get(ctx, key)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if !failed {
				m.log.V(1).Info("Reading the network config failed; retrying", "key", key, "err", err.Error())
				failed = true
			}
			if !subnet.Sleep(ctx, bo.Next()) {
				return ctx.Err()
			}
			continue
		}
		bo.Reset()
		failed = false
		state, u := "\x00missing", subnet.ConfigUpdate{Err: fmt.Errorf("%w: %s does not exist", subnet.ErrConfigMissing, key)}
		if len(resp.Kvs) > 0 {
			state = string(resp.Kvs[0].Value)
			if cfg, err := subnet.ParseConfig(resp.Kvs[0].Value); err != nil {
				u.Err = subnet.ConfigErrorAt(key, err)
			} else {
				u.Config, u.Err = cfg, nil
			}
		}
		if !sent || state != last {
			select {
			case updates <- u:
			case <-ctx.Done():
				return ctx.Err()
			}
			last, sent = state, true
		}
		if reconnected == nil {
			if st, err := m.conn.get(ctx); err == nil {
				reconnected = connectionReady(ctx, st.ActiveConnection())
			}
		}
		if err := m.waitConfigChange(ctx, key, resp.Header.Revision, resp.Header.ClusterId, reconnected); err != nil && ctx.Err() == nil {
			if !subnet.Sleep(ctx, bo.Next()) {
				return ctx.Err()
			}
		}
	}
}

// waitConfigChange returns when the config key may have changed since rev:
// an event on it, a compacted revision, or a store that went back. A failed
// watch returns its error.
func (m *Manager) waitConfigChange(ctx context.Context, key string, rev int64, clusterID uint64, reconnected <-chan struct{}) error {
	st, err := m.conn.get(ctx)
	if err != nil {
		return err
	}
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	wch := st.Watch(wctx, key, clientv3.WithRev(rev+1), clientv3.WithCreatedNotify())
	check := newTicker(m.checkInterval)
	defer check.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case wr, ok := <-wch:
			switch {
			case !ok:
				return errors.New("the watch stream ended")
			case wr.CompactRevision != 0 || errors.Is(wr.Err(), rpctypes.ErrCompacted):
				return nil
			case wr.Err() != nil:
				countError(ctx, "watch", wr.Err())
				return wr.Err()
			case len(wr.Events) > 0:
				return nil
			case wr.Header.Revision != 0 && (wr.Header.Revision < rev || wr.Header.ClusterId != clusterID):
				return nil // the store went back
			}
		case <-reconnected:
			if m.wentBack(ctx, key, rev, clusterID) {
				return nil
			}
		case <-check.C:
			if m.wentBack(ctx, key, rev, clusterID) {
				return nil
			}
		}
	}
}

// wentBack reads key to learn whether the store's revision is now below rev
// or its cluster ID differs; a failed read says no.
func (m *Manager) wentBack(ctx context.Context, key string, rev int64, clusterID uint64) bool {
	resp, err := m.get(ctx, key, clientv3.WithKeysOnly())
	return err == nil && (resp.Header.Revision < rev || resp.Header.ClusterId != clusterID)
}
