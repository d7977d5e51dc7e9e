package network

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/pkg/ip"
)

// Blackhole keeps a blackhole route for each of the node's own subnets in
// the main table (--ip-blackhole-route, flannel v0.28): traffic to an
// address of the subnet that no local route (a bridge) covers is dropped
// instead of following the default route out of the host. As flannel's, it
// adds the route when no blackhole route for the prefix exists, and never
// removes one.
type Blackhole struct {
	nl       blackholeNetlink
	subnets  []netip.Prefix
	interval time.Duration
	log      klog.Logger
}

// blackholeNetlink is the part of *netlink.Handle Blackhole uses.
type blackholeNetlink interface {
	RouteListFiltered(family int, filter *netlink.Route, filterMask uint64) ([]netlink.Route, error)
	RouteAdd(route *netlink.Route) error
}

// NewBlackhole returns a keeper of blackhole routes for subnets (invalid
// ones are skipped), checked every interval (DefaultResyncInterval when
// zero) by Run. nl must be used by nothing else while Run runs; nil means a
// netlink handle of the process's namespace.
func NewBlackhole(nl *netlink.Handle, subnets []netip.Prefix, interval time.Duration, log klog.Logger) *Blackhole {
	if nl == nil {
		nl = &netlink.Handle{}
	}
	if interval <= 0 {
		interval = DefaultResyncInterval
	}
	b := &Blackhole{nl: nl, interval: interval, log: log}
	for _, p := range subnets {
		if p.IsValid() {
			b.subnets = append(b.subnets, p.Masked())
		}
	}
	return b
}

// Ensure adds the blackhole route of each subnet that has none. The
// subnets' errors are joined.
func (b *Blackhole) Ensure(ctx context.Context) error {
	var errs []error
	for _, p := range b.subnets {
		if err := ctx.Err(); err != nil {
			return err
		}
		family := netlink.FAMILY_V4
		if p.Addr().Is6() {
			family = netlink.FAMILY_V6
		}
		want := &netlink.Route{Dst: ip.IPNet(p), Type: unix.RTN_BLACKHOLE, Table: unix.RT_TABLE_MAIN}
		have, err := b.nl.RouteListFiltered(family, want, netlink.RT_FILTER_DST|netlink.RT_FILTER_TYPE|netlink.RT_FILTER_TABLE)
		if err != nil {
			errs = append(errs, fmt.Errorf("listing the blackhole route of %s: %w", p, err))
			continue
		}
		if len(have) > 0 {
			continue
		}
		if err := b.nl.RouteAdd(want); err != nil && !errors.Is(err, unix.EEXIST) {
			errs = append(errs, fmt.Errorf("adding the blackhole route of %s: %w", p, err))
			continue
		}
		b.log.Info("Added blackhole route", "subnet", p)
	}
	return errors.Join(errs...)
}

// Run calls Ensure every interval until ctx ends, logging failures. It
// returns nil when ctx ends.
func (b *Blackhole) Run(ctx context.Context) error {
	t := time.NewTicker(b.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		if err := b.Ensure(ctx); err != nil && ctx.Err() == nil {
			b.log.Error(err, "Failed to keep the blackhole routes in place; retrying", "interval", b.interval)
		}
	}
}
