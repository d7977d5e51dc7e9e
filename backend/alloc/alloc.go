// Package alloc is the alloc backend: the node acquires and renews its lease
// and writes subnet.env (FLANNEL_MTU = the external interface's MTU), and
// nothing is programmed. Something else (an operator's routes, another
// overlay) carries the traffic.
//
// As flannel's, its lease has a PublicIP (the interface address) and no
// BackendType or BackendData: on the wire it is the same as a udp lease, so
// nodes of the udp backend (flannel's or ours) take an alloc node for a udp
// peer and send its subnet's traffic to it in UDP datagrams (port 8285,
// which nothing on the alloc node answers), while nodes of every other
// backend skip its lease.
package alloc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/subnet"
)

// Type is the backend's name in the network config (Backend.Type).
const Type = "alloc"

func init() {
	backend.Register(Type, func(opts backend.Options) (backend.Backend, error) {
		if opts.Ext.Iface == nil {
			return nil, errors.New("alloc backend: no external interface given")
		}
		if opts.Config == nil {
			return nil, errors.New("alloc backend: no network config given")
		}
		return &alloc{ext: opts.Ext, cfg: opts.Config}, nil
	})
}

type alloc struct {
	ext backend.ExternalInterface
	cfg *subnet.Config
}

// Init publishes the external interface's MTU and no BackendData. alloc has
// no config keys of its own; unknown keys are ignored.
func (a *alloc) Init(context.Context) (backend.Publish, error) {
	if len(a.cfg.Backend) > 0 {
		var keys map[string]json.RawMessage
		if err := json.Unmarshal(a.cfg.Backend, &keys); err != nil {
			return backend.Publish{}, fmt.Errorf("reading alloc config: Backend is not a JSON object (%v); write it like {\"Type\":\"alloc\"}", err)
		}
	}
	if a.ext.Iface.MTU <= 0 {
		return backend.Publish{}, fmt.Errorf("interface %s reports MTU %d; alloc publishes the interface MTU, so it must be positive", a.ext.Iface.Name, a.ext.Iface.MTU)
	}
	return backend.Publish{MTU: a.ext.Iface.MTU}, nil
}

// Apply programs nothing.
func (a *alloc) Apply(ctx context.Context, _ subnet.Lease, _ []subnet.Lease) error {
	return ctx.Err()
}

// Close does nothing. Idempotent.
func (a *alloc) Close() error { return nil }
