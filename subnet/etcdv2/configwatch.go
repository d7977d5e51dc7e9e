package etcdv2

import (
	"context"
	"errors"
	"fmt"

	client "go.etcd.io/etcd/client/v2"

	"github.com/flanneld-go/flanneld/subnet"
)

// WatchConfig implements subnet.Manager: one read of the config key, then a
// long poll on it until it changes (at most pollTimeout), then a read again.
// An update is sent only when what the read found differs from the last one
// sent (the value, or that the key is missing).
func (m *Manager) WatchConfig(ctx context.Context, updates chan<- subnet.ConfigUpdate) error {
	key := m.configKey()
	bo := subnet.Backoff{Min: m.minBackoff, Max: m.maxBackoff}
	var last string // the value sent last; "" with sent: the key was missing
	sent, failed := false, false
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		resp, err := m.get(ctx, key, &client.GetOptions{Quorum: true})
		var index uint64
		var value string
		var present bool
		switch {
		case err == nil && resp.Node != nil && !resp.Node.Dir:
			index, value, present = resp.Index, resp.Node.Value, true
		case err == nil:
			index, value, present = resp.Index, "", true // a directory: invalid
		case etcdCode(err) == client.ErrorCodeKeyNotFound:
			var e client.Error
			errors.As(err, &e)
			index = e.Index
		default:
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
		state := "\x00missing"
		if present {
			state = value
		}
		if !sent || state != last {
			u := subnet.ConfigUpdate{Err: fmt.Errorf("%w: %s does not exist", subnet.ErrConfigMissing, key)}
			if present {
				if resp.Node == nil || resp.Node.Dir {
					u.Err = fmt.Errorf("%w at %s: it is a directory; store the JSON config as the value of this key", subnet.ErrInvalidConfig, key)
				} else if cfg, err := subnet.ParseConfig([]byte(value)); err != nil {
					u.Err = subnet.ConfigErrorAt(key, err)
				} else {
					u.Config, u.Err = cfg, nil
				}
			}
			select {
			case updates <- u:
			case <-ctx.Done():
				return ctx.Err()
			}
			last, sent = state, true
		}
		// Wait for the next change of the key; a timeout, a cleared index or
		// an error all end in a fresh read.
		pctx, cancel := context.WithTimeout(ctx, m.pollTimeout)
		_, err = m.api.Watcher(key, &client.WatcherOptions{AfterIndex: index}).Next(pctx)
		cancel()
		if err != nil && ctx.Err() == nil && pctx.Err() == nil && etcdCode(err) != client.ErrorCodeEventIndexCleared {
			if !subnet.Sleep(ctx, bo.Next()) {
				return ctx.Err()
			}
		}
	}
}
