package backend

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/pkg/nlbatch"
)

// ErrRouteNotOwned is returned (wrapped) by Reconcile for a desired route it
// would not own, and so could never clean up: outside Network, overlapping
// the own subnet, on a link it was not given, or without a gateway.
var ErrRouteNotOwned = errors.New("route outside the reconciler's scope")

// Route is a route a backend wants in the main table: Dst via Gw on link
// LinkIndex, with the onlink flag when Onlink. It is comparable, so route
// sets diff without allocating.
type Route struct {
	Dst       netip.Prefix
	Gw        netip.Addr
	LinkIndex int
	Onlink    bool
}

// String renders the route as ip-route does, with the link index as dev.
func (r Route) String() string {
	s := r.Dst.String() + " via " + r.Gw.String() + " dev " + strconv.Itoa(r.LinkIndex)
	if r.Onlink {
		s += " onlink"
	}
	return s
}

// batch converts r to the form nlbatch writes.
func (r Route) batch() nlbatch.Route {
	return nlbatch.Route{Dst: r.Dst, Gw: r.Gw, LinkIndex: r.LinkIndex, Onlink: r.Onlink}
}

// netlinkRoute converts r to the form vishvananda/netlink takes.
func (r Route) netlinkRoute() *netlink.Route {
	nr := &netlink.Route{
		LinkIndex: r.LinkIndex,
		Dst:       ip.IPNet(r.Dst),
		Gw:        ip.IP(r.Gw),
		Table:     unix.RT_TABLE_MAIN,
	}
	if r.Onlink {
		nr.Flags = int(netlink.FLAG_ONLINK)
	}
	return nr
}

// routeKey is an IPv4 destination packed into an integer (address << 8 |
// prefix length), and nextHop the rest of a Route: compact, cheap to hash
// and compare, so that diffing 50,000 routes stays in cache.
type (
	routeKey uint64
	nextHop  struct {
		gw     [4]byte
		link   int32
		onlink bool
	}
)

func keyOf(dst netip.Prefix) routeKey {
	return routeKey(uint64(ip.Uint32(dst.Addr()))<<8 | uint64(dst.Bits()))
}

func hopOf(r Route) nextHop {
	return nextHop{gw: r.Gw.As4(), link: int32(r.LinkIndex), onlink: r.Onlink}
}

func (h nextHop) route(k routeKey) Route {
	return Route{
		Dst:       netip.PrefixFrom(ip.FromUint32(uint32(k>>8)), int(k&0xff)),
		Gw:        netip.AddrFrom4(h.gw),
		LinkIndex: int(h.link),
		Onlink:    h.onlink,
	}
}

// routeNetlink is the part of *nlbatch.Handle the reconciler uses: a dump,
// batched writes, and a single delete for the odd route a batch cannot name
// (one with a metric or TOS).
type routeNetlink interface {
	RouteListFilteredIter(family int, filter *netlink.Route, filterMask uint64, f func(netlink.Route) bool) error
	ReplaceRoutes(routes []nlbatch.Route, errs []error) error
	DeleteRoutes(routes []nlbatch.Route, errs []error) error
	RouteDel(route *netlink.Route) error
}

// dumpAttempts bounds the re-dumps when the kernel reports that the table
// changed during a dump.
const dumpAttempts = 3

// RouteReconciler keeps a backend's routes in the main table equal to a
// desired set. It owns a route when the route is in the main table, is
// unicast with a single IPv4 gateway (so connected and kernel routes are never
// touched), leaves through one of the links it was given, and its destination
// lies strictly inside Network (never Network itself) without overlapping the
// node's own subnet. Everything else is foreign and left alone.
//
// It keeps no memory of what it installed: each Reconcile reads the kernel
// afresh, so the first call after a restart removes routes of leases that
// went away while the daemon was down, and a route deleted by hand comes back
// on the next call. Its buffers are reused between calls; use it from one
// goroutine at a time.
type RouteReconciler struct {
	nl      routeNetlink
	network netip.Prefix
	links   []int

	// Per-call state, kept to reuse the allocations.
	own   netip.Prefix
	want  map[routeKey]nextHop
	have  map[routeKey]nextHop
	extra []netlink.Route // owned routes that no desired route replaces
	sets  []nlbatch.Route // routes to replace
	upd   []bool          // whether sets[i] replaces a different route
	dels  []nlbatch.Route // routes to delete
	errs  []error         // the kernel's answer to each set or delete
}

// NewRouteReconciler returns a reconciler for routes inside network that leave
// through the links with the given indexes. nl is the netlink handle of the
// namespace to program, usually an *nlbatch.Handle.
func NewRouteReconciler(nl routeNetlink, network netip.Prefix, links ...int) *RouteReconciler {
	return &RouteReconciler{
		nl:      nl,
		network: network.Masked(),
		links:   slices.Clone(links),
		want:    map[routeKey]nextHop{},
		have:    map[routeKey]nextHop{},
	}
}

// Reconcile makes the kernel's owned routes exactly desired: it reads the main
// table with one dump, replaces each missing or different route, then deletes
// the owned routes no longer desired. own is the node's own lease subnet, never
// routed (its zero value excludes nothing). A desired route the reconciler
// would not own is skipped and reported with ErrRouteNotOwned; a failing
// kernel call does not stop the others. The error, if any, is the first
// failure; Changes counts what was done.
func (r *RouteReconciler) Reconcile(own netip.Prefix, desired []Route) (Changes, error) {
	r.own = own
	clear(r.want)
	var bad int
	var badErr error
	for _, d := range desired {
		if !r.ownsDst(d.Dst) || !r.onLink(d.LinkIndex) || !d.Gw.Is4() {
			bad++
			if badErr == nil {
				badErr = fmt.Errorf("installing route %s: %w (Network %s, own subnet %s, links %v)", d, ErrRouteNotOwned, r.network, own, r.links)
			}
			continue
		}
		r.want[keyOf(d.Dst)] = hopOf(d)
	}

	if err := r.dump(); err != nil {
		return Changes{Failed: bad}, fmt.Errorf("listing routes: %w", err)
	}

	c, err := r.write()
	clear(r.extra) // drop the references to the kernel's routes
	if bad > 0 {
		c.Failed += bad
		if err == nil {
			err = badErr
		}
	}
	return c, failedErr(err, c.Failed)
}

// dump fills have (and extra) from the kernel's main table. An interrupted
// dump (the table changed meanwhile) is retried; if it keeps being
// interrupted the last view is used, which is safe: an add is a replace, a
// delete of a route already gone succeeds, and whatever was missed is fixed
// by the next call.
func (r *RouteReconciler) dump() error {
	filter := netlink.Route{Table: unix.RT_TABLE_MAIN}
	var err error
	for range dumpAttempts {
		clear(r.have)
		clear(r.extra)
		r.extra = r.extra[:0]
		err = r.nl.RouteListFilteredIter(netlink.FAMILY_V4, &filter, netlink.RT_FILTER_TABLE, r.collect)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return err
		}
	}
	return nil
}

// collect is the dump callback: it keeps the owned routes.
func (r *RouteReconciler) collect(k netlink.Route) bool {
	if k.Table != unix.RT_TABLE_MAIN || k.Type != unix.RTN_UNICAST || len(k.MultiPath) > 0 || !r.onLink(k.LinkIndex) {
		return true
	}
	gw, ok := ip.FromIP(k.Gw)
	if !ok || !gw.IsValid() || gw.IsUnspecified() {
		return true
	}
	dst, ok := ip.FromIPNet(k.Dst)
	if !ok || !r.ownsDst(dst) {
		return true
	}
	if k.Priority != 0 || k.Tos != 0 {
		// Ours, but not a route we install: RouteReplace of the desired
		// route would not overwrite it.
		r.extra = append(r.extra, k)
		return true
	}
	key, got := keyOf(dst), nextHop{gw: gw.As4(), link: int32(k.LinkIndex), onlink: k.Flags&int(netlink.FLAG_ONLINK) != 0}
	prev, dup := r.have[key]
	if !dup {
		r.have[key] = got
		return true
	}
	// Two routes for one destination (ip route append): keep the desired
	// one, delete the other.
	if want, ok := r.want[key]; ok && got == want {
		r.have[key] = got
		got = prev
	}
	r.extra = append(r.extra, *got.route(key).netlinkRoute())
	return true
}

// ownsDst reports whether dst is a destination the reconciler manages.
func (r *RouteReconciler) ownsDst(dst netip.Prefix) bool {
	return dst.Addr().Is4() && dst.Masked() == dst &&
		dst.Bits() > r.network.Bits() && r.network.Contains(dst.Addr()) &&
		!(r.own.IsValid() && dst.Overlaps(r.own))
}

func (r *RouteReconciler) onLink(index int) bool {
	return index > 0 && slices.Contains(r.links, index)
}

// write replaces the missing or different routes in one batch, then
// deletes the stale ones in another (adding first keeps traffic flowing
// while a route moves), then the extra routes one by one.
func (r *RouteReconciler) write() (Changes, error) {
	var c Changes
	var first error
	fail := func(err error) {
		c.Failed++
		if first == nil {
			first = err
		}
	}
	r.sets, r.upd, r.dels = r.sets[:0], r.upd[:0], r.dels[:0]
	for k, want := range r.want {
		have, ok := r.have[k]
		if ok && have == want {
			continue
		}
		r.sets = append(r.sets, want.route(k).batch())
		r.upd = append(r.upd, ok)
	}
	for k, have := range r.have {
		if _, ok := r.want[k]; !ok {
			r.dels = append(r.dels, have.route(k).batch())
		}
	}
	errs := r.results(len(r.sets))
	if len(r.sets) > 0 {
		_ = r.nl.ReplaceRoutes(r.sets, errs) // a socket failure is in errs too
	}
	for i, err := range errs {
		switch {
		case err != nil:
			s := &r.sets[i]
			fail(fmt.Errorf("installing route %s: %w", Route{Dst: s.Dst, Gw: s.Gw, LinkIndex: s.LinkIndex, Onlink: s.Onlink}, err))
		case r.upd[i]:
			c.Updated++
		default:
			c.Added++
		}
	}
	errs = r.results(len(r.dels))
	if len(r.dels) > 0 {
		_ = r.nl.DeleteRoutes(r.dels, errs)
	}
	for i, err := range errs {
		if err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
			d := &r.dels[i]
			fail(fmt.Errorf("deleting route %s via %s dev %d: %w", d.Dst, d.Gw, d.LinkIndex, err))
			continue
		}
		c.Removed++
	}
	for i := range r.extra {
		if err := r.delNetlink(&r.extra[i]); err != nil {
			fail(err)
			continue
		}
		c.Removed++
	}
	return c, first
}

// results returns the reused result slice, n long.
func (r *RouteReconciler) results(n int) []error {
	if cap(r.errs) < n {
		r.errs = make([]error, n)
	}
	r.errs = r.errs[:n]
	clear(r.errs)
	return r.errs
}

// delNetlink deletes one route, naming its gateway and link so that only
// that route goes; a route already gone counts as deleted.
func (r *RouteReconciler) delNetlink(k *netlink.Route) error {
	err := r.nl.RouteDel(k)
	if err == nil || errors.Is(err, unix.ESRCH) || errors.Is(err, unix.ENOENT) {
		return nil
	}
	return fmt.Errorf("deleting route %s via %s dev %d: %w", k.Dst, k.Gw, k.LinkIndex, err)
}
