// Package extension is the extension backend (flannel v0.28.9's): the data
// path is whatever four configured commands make it.
//
//	PreStartupCommand    before the lease; its trimmed output, as a JSON
//	                     string, is published as the lease's BackendData
//	PostStartupCommand   once the lease is held; env NETWORK, SUBNET,
//	                     IPV6SUBNET, PUBLIC_IP, PUBLIC_IPV6
//	SubnetAddCommand     per remote extension lease; env SUBNET, PUBLIC_IP
//	SubnetRemoveCommand  of that lease, stdin its BackendData string + "\n"
//
// A command is split on white space (no shell, no quoting), each field has
// $VAR and ${VAR} expanded from those variables and the daemon's
// environment, and it is run directly. PreStartupCommand gets "\n" on stdin.
//
// Beyond flannel: each run is killed (with its process group) after a
// timeout, its captured output is bounded, and the leases are reconciled:
// the backend keeps the set of leases whose SubnetAddCommand succeeded, runs
// SubnetAddCommand again at each Apply (every resync) for a lease it failed
// for, and SubnetRemoveCommand for a lease that is gone (again at each Apply
// until it succeeds). Each failure is one log line with the exit status and
// the start of the output. FLANNEL_MTU is the external interface's MTU.
package extension

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/subnet"
)

// Type is the backend's name in the network config (Backend.Type).
const Type = "extension"

func init() {
	backend.Register(Type, func(opts backend.Options) (backend.Backend, error) {
		return newExtension(opts, DefaultTimeout)
	})
}

// peer is what a remote lease's commands are run with.
type peer struct {
	subnet   netip.Prefix
	publicIP netip.Addr
	data     string // BackendData decoded as a JSON string
}

type extension struct {
	ext     backend.ExternalInterface
	cfg     *subnet.Config
	log     klog.Logger
	timeout time.Duration

	pre, post, add, remove command

	// postFor is the own lease PostStartupCommand last succeeded for.
	postFor subnet.Lease
	postRan bool
	// added holds, by lease key, the leases whose SubnetAddCommand
	// succeeded (every lease seen, without a SubnetAddCommand), with what
	// it was run for.
	added map[netip.Prefix]peer
	// badData records the leases skipped for BackendData that is not a JSON
	// string, so each is logged once.
	badData map[netip.Prefix]string
}

func newExtension(opts backend.Options, timeout time.Duration) (*extension, error) {
	if opts.Ext.Iface == nil {
		return nil, errors.New("extension backend: no external interface given")
	}
	if opts.Config == nil {
		return nil, errors.New("extension backend: no network config given")
	}
	keys, err := parseConfig(opts.Config.Backend)
	if err != nil {
		return nil, err
	}
	return &extension{
		ext:     opts.Ext,
		cfg:     opts.Config,
		log:     opts.Logger,
		timeout: timeout,
		pre:     parseCommand("PreStartupCommand", keys.PreStartupCommand),
		post:    parseCommand("PostStartupCommand", keys.PostStartupCommand),
		add:     parseCommand("SubnetAddCommand", keys.SubnetAddCommand),
		remove:  parseCommand("SubnetRemoveCommand", keys.SubnetRemoveCommand),
		added:   map[netip.Prefix]peer{},
		badData: map[netip.Prefix]string{},
	}, nil
}

// keys is the extension Backend block.
type keys struct {
	PreStartupCommand   string
	PostStartupCommand  string
	SubnetAddCommand    string
	SubnetRemoveCommand string
}

// configError is a mistake in the Backend block; it wraps
// subnet.ErrInvalidConfig because the block is part of the network config.
type configError string

func (e configError) Error() string { return "extension backend: " + string(e) }

func (configError) Unwrap() error { return subnet.ErrInvalidConfig }

// parseConfig reads the four command keys (matched case-insensitively;
// unknown keys ignored).
func parseConfig(raw json.RawMessage) (keys, error) {
	var k keys
	if len(raw) == 0 || string(raw) == "null" {
		return k, nil
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(raw, &m); err != nil {
		return k, configError(`the Backend block is not a JSON object; write it like {"Type":"extension","SubnetAddCommand":"ip route replace $SUBNET via $PUBLIC_IP"}`)
	}
	if err := json.Unmarshal(raw, &k); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			return k, configError(fmt.Sprintf("%s must be a string (a command line), not a JSON %s", te.Field, te.Value))
		}
		return k, configError(err.Error())
	}
	return k, nil
}

// Init runs PreStartupCommand, whose trimmed output becomes BackendData,
// and publishes the external interface's MTU.
func (e *extension) Init(ctx context.Context) (backend.Publish, error) {
	if e.ext.Iface.MTU <= 0 {
		return backend.Publish{}, fmt.Errorf("interface %s reports MTU %d; the extension backend publishes the interface MTU, so it must be positive", e.ext.Iface.Name, e.ext.Iface.MTU)
	}
	pub := backend.Publish{MTU: e.ext.Iface.MTU}
	if !e.pre.set() {
		e.log.Info("No PreStartupCommand configured; the lease has no BackendData")
		return pub, nil
	}
	out, dropped, err := e.pre.run(ctx, e.timeout, nil, "\n")
	if err != nil {
		return backend.Publish{}, err
	}
	if dropped > 0 {
		return backend.Publish{}, fmt.Errorf("PreStartupCommand printed %d bytes, more than the %d a lease's BackendData may hold; make it print less", maxOutput+dropped, maxOutput)
	}
	e.log.Info("Ran PreStartupCommand", "output", head(out, logOutput))
	data, err := json.Marshal(out)
	if err != nil {
		return backend.Publish{}, fmt.Errorf("encoding the output of PreStartupCommand: %w", err)
	}
	pub.BackendData = data
	return pub, nil
}

// Apply runs PostStartupCommand when the own lease is new (or its last run
// failed), then SubnetAddCommand for each remote extension lease not yet
// added (or changed since), then SubnetRemoveCommand for each lease added
// before and no longer given. A failing PostStartupCommand is returned (at
// start it stops the daemon, as flannel's does); a failing SubnetAdd or
// SubnetRemove command is logged and run again at the next Apply.
func (e *extension) Apply(ctx context.Context, own subnet.Lease, remote []subnet.Lease) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := e.postStartup(ctx, own); err != nil {
		return err
	}
	want := make(map[netip.Prefix]bool, len(remote))
	for i := range remote {
		l := &remote[i]
		key := l.Key()
		if l.Attrs.BackendType != Type {
			continue // admission lets only extension leases through; be sure
		}
		p, ok := e.peerOf(l)
		if !ok {
			continue
		}
		want[key] = true
		if prev, done := e.added[key]; done && prev == p {
			continue
		}
		ok, err := e.runPeer(ctx, e.add, p)
		if err != nil {
			return err
		}
		if ok {
			e.added[key] = p
		}
	}
	for key, p := range e.added {
		if want[key] {
			continue
		}
		ok, err := e.runPeer(ctx, e.remove, p)
		if err != nil {
			return err
		}
		if ok {
			delete(e.added, key)
		}
	}
	for key := range e.badData {
		if !inLeases(key, remote) {
			delete(e.badData, key)
		}
	}
	return nil
}

func inLeases(key netip.Prefix, ls []subnet.Lease) bool {
	for i := range ls {
		if ls[i].Key() == key {
			return true
		}
	}
	return false
}

// peerOf returns what l's commands run with; false (logged once) when its
// BackendData is not a JSON string.
func (e *extension) peerOf(l *subnet.Lease) (peer, bool) {
	p := peer{subnet: l.Subnet, publicIP: l.Attrs.PublicIP}
	if len(l.Attrs.BackendData) == 0 || string(l.Attrs.BackendData) == "null" {
		delete(e.badData, l.Key())
		return p, true
	}
	if err := json.Unmarshal(l.Attrs.BackendData, &p.data); err != nil {
		raw := string(l.Attrs.BackendData)
		if e.badData[l.Key()] != raw {
			e.badData[l.Key()] = raw
			e.log.Info("Ignoring lease: its BackendData is not a JSON string (the output of the PreStartupCommand of an extension node)", "subnet", l.Key(), "backendData", head(raw, logOutput))
		}
		return peer{}, false
	}
	delete(e.badData, l.Key())
	return p, true
}

// runPeer runs c (SubnetAdd or SubnetRemove) for p and reports whether it
// succeeded (an unset command does). A failure is logged in one line, to be
// run again at the next Apply; only the end of ctx is returned.
func (e *extension) runPeer(ctx context.Context, c command, p peer) (bool, error) {
	if !c.set() {
		return true, nil
	}
	vars := map[string]string{"SUBNET": prefixString(p.subnet), "PUBLIC_IP": addrString(p.publicIP)}
	out, _, err := c.run(ctx, e.timeout, vars, p.data+"\n")
	if err != nil {
		if ctx.Err() != nil {
			return false, ctx.Err()
		}
		e.log.Error(nil, c.key+" failed; running it again at the next resync", "subnet", p.subnet, "publicIP", p.publicIP, "err", err.Error())
		return false, nil
	}
	e.log.V(1).Info("Ran "+c.key, "subnet", p.subnet, "publicIP", p.publicIP, "output", head(out, logOutput))
	return true, nil
}

// postStartup runs PostStartupCommand for own unless it already succeeded
// for that lease.
func (e *extension) postStartup(ctx context.Context, own subnet.Lease) error {
	if e.postRan && e.postFor.Subnet == own.Subnet && e.postFor.IPv6Subnet == own.IPv6Subnet {
		return nil
	}
	if e.post.set() {
		vars := map[string]string{
			"NETWORK":     prefixString(e.cfg.Network),
			"SUBNET":      prefixString(own.Subnet),
			"IPV6SUBNET":  prefixString(own.IPv6Subnet),
			"PUBLIC_IP":   addrString(e.ext.PublicIP),
			"PUBLIC_IPV6": addrString(e.ext.PublicIPv6),
		}
		out, _, err := e.post.run(ctx, e.timeout, vars, "\n")
		if err != nil {
			return err
		}
		e.log.Info("Ran PostStartupCommand", "subnet", own.Subnet, "output", head(out, logOutput))
	}
	e.postRan, e.postFor = true, own
	return nil
}

func prefixString(p netip.Prefix) string {
	if !p.IsValid() {
		return ""
	}
	return p.String()
}

func addrString(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

// Close does nothing: the backend starts no goroutines, and what the
// commands set up stays for the next run. Idempotent.
func (e *extension) Close() error { return nil }
