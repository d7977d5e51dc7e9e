package subnet

import (
	"context"
	"errors"
)

// ErrConfigMissing is sent by WatchConfig while the config key (or file) does
// not exist.
var ErrConfigMissing = errors.New("network config is missing")

// ConfigUpdate is one state of the stored network config: Config when it
// exists and is valid, else Err (wrapping ErrConfigMissing or
// ErrInvalidConfig).
type ConfigUpdate struct {
	Config *Config
	Err    error
}

// Manager is the lease store as the daemon uses it. Implementations are safe
// for use by several goroutines.
type Manager interface {
	// GetNetworkConfig waits, retrying each second, until the config key
	// exists, then returns it parsed. An invalid config is returned at once
	// as an error wrapping ErrInvalidConfig. It ends with ctx.
	GetNetworkConfig(ctx context.Context) (*Config, error)

	// AcquireLease obtains a lease for attrs: the lease whose PublicIP is
	// attrs.PublicIP (PublicIPv6 for IPv6 only) if it fits cfg (its value is
	// updated to attrs; a reservation stays TTL-less), else prev's subnets
	// (prev.Subnet, and prev.IPv6Subnet with IPv6) where they fit cfg and no
	// key holds them, else ones chosen at random among the first 100 free
	// subnets. It never overwrites or deletes another node's lease.
	// ErrNoFreeSubnets when the range is full.
	AcquireLease(ctx context.Context, cfg *Config, attrs LeaseAttrs, prev Lease) (*Lease, error)

	// RenewLease re-sets lease with a fresh TTL (a reservation is left
	// TTL-less) and updates lease.Expiration. It returns an error wrapping
	// ErrLeaseLost when the key is gone or holds another PublicIP.
	RenewLease(ctx context.Context, lease *Lease) error

	// WatchLeases sends batches of lease events until ctx ends, then returns
	// ctx.Err(). The first batch is the current set, all Added. Values that do
	// not parse are logged once and skipped. Connection errors are retried
	// with back-off; a cleared etcd index triggers a re-list whose diff
	// against the known set is sent as events.
	WatchLeases(ctx context.Context, events chan<- []Event) error

	// WatchConfig sends the stored network config each time it changes (the
	// first update is its current state) until ctx ends, then returns
	// ctx.Err(). A deleted key is sent as ErrConfigMissing, an unparsable
	// value as an ErrInvalidConfig error; store failures are retried with
	// back-off, not sent. The daemon applies nothing live: it reports a
	// change and keeps running on the config it started with.
	WatchConfig(ctx context.Context, updates chan<- ConfigUpdate) error
}
