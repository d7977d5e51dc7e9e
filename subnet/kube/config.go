package kube

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/flanneld-go/flanneld/subnet"
)

// readConfig reads and parses the config file. Its errors name the file:
// ErrConfigMissing when it does not exist, a *subnet.ConfigError (Key = the
// path) when it does not parse, else the read error.
func (m *Manager) readConfig() (*subnet.Config, []byte, error) {
	data, err := os.ReadFile(m.path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, fmt.Errorf("%w: %s does not exist; mount the ConfigMap's net-conf.json there or set --net-config-path", subnet.ErrConfigMissing, m.path)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("reading network config: %w", err)
	}
	cfg, err := subnet.ParseConfig(data)
	if err != nil {
		return nil, data, subnet.ConfigErrorAt(m.path, err)
	}
	return cfg, data, nil
}

// GetNetworkConfig reads the network config file, waiting (retrying every
// PollInterval, with one log line) while it does not exist. An invalid
// config is returned at once as an error naming the file.
func (m *Manager) GetNetworkConfig(ctx context.Context) (*subnet.Config, error) {
	logged := false
	for {
		cfg, _, err := m.readConfig()
		switch {
		case err == nil:
			return cfg, nil
		case errors.Is(err, subnet.ErrConfigMissing):
			if !logged {
				logged = true
				m.log.Info("Waiting for the network config file", "reason", err)
			}
		default:
			return nil, err
		}
		if err := sleep(ctx, m.poll); err != nil {
			return nil, err
		}
	}
}

// WatchConfig re-reads the config file every ConfigInterval and sends its
// state when it changes (the first update is the current state): the
// config, ErrConfigMissing when the file is gone, or the ErrInvalidConfig
// error. Other read errors are logged and retried at the next interval.
func (m *Manager) WatchConfig(ctx context.Context, updates chan<- subnet.ConfigUpdate) error {
	var last []byte
	sent, wasMissing := false, false
	for {
		cfg, data, err := m.readConfig()
		missing := errors.Is(err, subnet.ErrConfigMissing)
		switch {
		case err != nil && !missing && !errors.Is(err, subnet.ErrInvalidConfig):
			m.log.Error(err, "Reading the network config file failed; retrying", "in", m.cfgEvery)
		case !sent || missing != wasMissing || !bytes.Equal(data, last):
			select {
			case updates <- subnet.ConfigUpdate{Config: cfg, Err: err}:
			case <-ctx.Done():
				return ctx.Err()
			}
			sent, wasMissing, last = true, missing, data
		}
		if err := sleep(ctx, m.cfgEvery); err != nil {
			return err
		}
	}
}
