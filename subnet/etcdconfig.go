package subnet

import (
	"context"
	"errors"
	"fmt"
)

// WatchConfig implements Manager: one read of the config key, then a watch
// of it from the read's revision. An event, a compacted history, a store
// that went back, and every checkInterval of quiet lead to a fresh read; an
// update is sent only when what the read found differs from the last one
// sent (the value, or that the key is missing).
func (m *EtcdManager) WatchConfig(ctx context.Context, updates chan<- ConfigUpdate) error {
	key := m.ConfigKey()
	bo := Backoff{Min: m.minBackoff, Max: m.maxBackoff}
	var last string // the value sent last; "\x00missing" the key was missing
	sent, failed := false, false
	for ctx.Err() == nil {
		kv, rev, err := m.ks.Get(ctx, key)
		if err != nil && !errors.Is(err, ErrDirectory) {
			if !failed && ctx.Err() == nil {
				m.log.V(1).Info("Reading the network config failed; retrying", "key", key, "err", err.Error())
				failed = true
			}
			Sleep(ctx, bo.Next())
			continue
		}
		bo.Reset()
		failed = false
		state, u := "\x00missing", ConfigUpdate{Err: fmt.Errorf("%w: %s does not exist", ErrConfigMissing, key)}
		switch {
		case err != nil:
			state, u.Err = "\x00directory", directoryConfig(key)
		case kv != nil:
			state = string(kv.Value)
			if cfg, err := ParseConfig(kv.Value); err != nil {
				u.Err = ConfigErrorAt(key, err)
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
		if err := m.waitConfigChange(ctx, key, rev); err != nil {
			Sleep(ctx, bo.Next())
		}
	}
	return ctx.Err()
}

// waitConfigChange returns when the config key may have changed since rev.
// A failed watch returns its error.
func (m *EtcdManager) waitConfigChange(ctx context.Context, key string, rev Rev) error {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	watch := m.ks.Watch(wctx, key, rev.Index)
	for {
		nctx, ncancel := context.WithTimeout(wctx, m.checkInterval)
		changes, now, err := watch.Next(nctx)
		quiet := nctx.Err() != nil
		ncancel()
		switch {
		case ctx.Err() != nil || errors.Is(err, ErrCompacted) || (err != nil && quiet):
			return nil
		case err != nil:
			return err
		case len(changes) > 0 || now.wentBack(rev):
			return nil
		}
	}
}
