package backend

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"iter"
	"net/netip"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/pkg/nlbatch"
)

// ErrRouteNotOwned is returned (wrapped) by Reconcile for a desired route it
// would not own, and so could never clean up: outside Network, overlapping
// the own subnet, on a link it was not given, or without a gateway.
var ErrRouteNotOwned = errors.New("route outside the reconciler's scope")

// RouteNetlink is the part of *nlbatch.Handle a RouteReconciler uses: a dump
// and batched writes.
type RouteNetlink interface {
	ListRoutes(fn func(*nlbatch.Route) bool) error
	ListRoutes6(fn func(*nlbatch.Route) bool) error
	ReplaceRoutes(routes []nlbatch.Route, errs []error) error
	DeleteRoutes(routes []nlbatch.Route, errs []error) error
	ReplaceNexthops(nhs []nlbatch.Nexthop, errs []error) error
	DeleteNexthops(ids []uint32, errs []error) error
}

// routeKey and hop are how the route table stores an nlbatch.Route in the
// Reconciler's desired set: routeKey is what the kernel tells routes of one table
// apart by, as far as a replace goes (the destination, the metric, the
// TOS), hop the rest. A route of an owned destination with another metric
// or TOS than the routes this reconciler writes is thus never desired, and
// is deleted. Both are arrays and numbers without pointers: 52 bytes a
// route instead of 112 with nlbatch.Route values, so that the desired set
// of 50,000 routes stays small (2.6 MB) and the garbage collector never
// scans it. Routes are nlbatch.Routes everywhere else.
type (
	routeKey struct {
		dst [16]byte // an IPv4 address in its IPv4-mapped form
		// meta is the prefix length, the TOS (<<8) and the metric (<<16),
		// packed: a key without padding hashes and compares as memory.
		meta uint64
	}
	hop struct {
		gw     [16]byte
		link   int32
		nh     uint32 // the nexthop object's ID; 0 for a plain route
		onlink bool
	}
)

// compareRouteKeys orders route keys by destination address, then prefix
// length (then TOS and metric).
func compareRouteKeys(a, b routeKey) int {
	if c := bytes.Compare(a.dst[:], b.dst[:]); c != 0 {
		return c
	}
	return cmp.Compare(a.meta, b.meta)
}

func keyOf(dst netip.Prefix, priority uint32, tos uint8) routeKey {
	return routeKey{dst: dst.Addr().As16(), meta: uint64(dst.Bits()) | uint64(tos)<<8 | uint64(priority)<<16}
}

func hopOf(r *nlbatch.Route) hop {
	return hop{gw: r.Gw.As16(), link: int32(r.LinkIndex), nh: r.NexthopID, onlink: r.Onlink}
}

func (k routeKey) prefix() netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom16(k.dst).Unmap(), int(uint8(k.meta)))
}

// route is the route of key k via h.
func (h hop) route(k routeKey) nlbatch.Route {
	return nlbatch.Route{Dst: k.prefix(), Gw: netip.AddrFrom16(h.gw).Unmap(), LinkIndex: int(h.link), Onlink: h.onlink,
		NexthopID: h.nh, Priority: uint32(k.meta >> 16), Tos: uint8(k.meta >> 8)}
}

// RouteReconciler keeps a backend's routes in the main table equal to a
// desired set, through a Reconciler. It works on the family of its Network
// (IPv4 or IPv6). It owns a route when the route is in the main table, is
// unicast with a single gateway of that family (so connected and kernel
// routes are never touched), leaves through one of the links it was given,
// and its destination lies strictly inside Network (never Network itself)
// without overlapping the node's own subnet. Everything else is foreign and
// left alone.
//
// Like every Reconciler it keeps no memory of what it installed: the first
// call after a restart removes routes of leases that went away while the
// daemon was down, and a route deleted by hand comes back on the next call.
// Use it from one goroutine at a time.
type RouteReconciler struct {
	nl       RouteNetlink
	network  netip.Prefix
	v6       bool // network is IPv6
	links    []int
	nexthops bool // install routes through nexthop objects

	rec *Reconciler[routeKey, hop]
	own netip.Prefix
	// nhs holds, during a call, the IDs of the nexthop objects desired
	// routes use, sorted.
	nhs []nhUse
	// view is, during a ReconcileSet, its desired set.
	view *routeView
	// unused holds, during a call, the IDs of this reconciler's making of
	// the nexthop objects dumped routes use and no desired route does.
	unused map[uint32]bool

	// Reused by each call.
	routes []nlbatch.Route
	moves  []nlbatch.Route
	nhBuf  []nlbatch.Nexthop
	ids    []uint32
	errs   []error
}

// NewRouteReconciler returns a reconciler for routes inside network that leave
// through the links with the given indexes. nl is the netlink handle of the
// namespace to program, usually an *nlbatch.Handle.
func NewRouteReconciler(nl RouteNetlink, network netip.Prefix, links ...int) *RouteReconciler {
	r := &RouteReconciler{
		nl:      nl,
		network: network.Masked(),
		v6:      network.Addr().Is6(),
		links:   slices.Clone(links),
	}
	r.rec = NewReconciler[routeKey, hop](routeTable{r}, compareRouteKeys, Same[hop])
	return r
}

// UseNexthops makes the reconciler install each route through a nexthop
// object, one per gateway, with the gateway's address (as a number) for
// its ID:
//
//	nexthop id <gw as uint32> via <gw> dev <link> [onlink]
//	<dst> nhid <gw as uint32>
//
// The kernel looks up a route's shared next-hop data by a hash that ignores
// the gateway, so inserting N routes with N distinct gateways costs O(N²);
// through nexthop objects it costs O(N): 50,000 routes take 0.2 s instead of
// about 25 s. Routes look the same to forwarding and to ip route (which
// adds "nhid N"). Routes of the other form are replaced on the next call,
// and nexthop objects no route uses any more are deleted. Needs Linux 5.3.
func (r *RouteReconciler) UseNexthops(on bool) { r.nexthops = on }

// nexthopID is the ID of the nexthop object for routes via gw, the same on
// every run and for every route via that gateway: an IPv4 address as a
// number; for an IPv6 one, 0xf followed by 28 bits of its FNV-1a hash (the
// IDs of IPv4 class E addresses, never a gateway of a flannel network). Two
// IPv6 gateways with one ID are handled as one gateway on two links: the
// one of the lowest destination gets the nexthop object, the other plain
// routes.
func nexthopID(gw netip.Addr) uint32 {
	if gw.Is4() {
		return ip.Uint32(gw)
	}
	const offset32, prime32 = 2166136261, 16777619 // FNV-1a, as hash/fnv
	h := uint32(offset32)
	for _, c := range gw.As16() {
		h = (h ^ uint32(c)) * prime32
	}
	return 0xf0000000 | h&0x0fffffff
}

// Reconcile makes the kernel's owned routes exactly desired (routes via Gw
// on LinkIndex, Onlink as given; other fields are ignored; of two routes
// to one destination the later counts): one dump, the missing or
// different routes replaced, then the owned routes no longer desired
// deleted, then the nexthop objects no route uses any more. own is the
// node's own lease subnet, never routed (its zero value excludes nothing).
// A desired route the reconciler would not own is skipped and reported
// with ErrRouteNotOwned; a failing kernel call does not stop the others.
// The error, if any, is the first failure; Changes counts what was done.
func (r *RouteReconciler) Reconcile(own netip.Prefix, desired []nlbatch.Route) (Changes, error) {
	return r.reconcileSeq(own, len(desired), slices.Values(desired))
}

// RouteSet is a desired set of routes read by index, for a caller that
// holds its routes in another form (leases): Len routes, the i-th
// Route(i). The reconciler reads it during ReconcileSet only.
type RouteSet interface {
	Len() int
	Route(i int) nlbatch.Route
}

// ReconcileSet is Reconcile of the routes of desired. Sorted by
// destination (address, then prefix length) with each destination once,
// and all owned, they are read through a view: no copy of the set is made
// (with nexthop objects, 8 bytes a route unless the gateways' IDs rise
// with the destinations, as the subnet IPs of onlink routes do).
// Otherwise they are copied and sorted, as Reconcile does.
func (r *RouteReconciler) ReconcileSet(own netip.Prefix, desired RouteSet) (Changes, error) {
	r.own = own
	v := r.newRouteView(desired)
	if v == nil {
		n := desired.Len()
		return r.reconcileSeq(own, n, func(yield func(nlbatch.Route) bool) {
			for i := range n {
				if !yield(desired.Route(i)) {
					return
				}
			}
		})
	}
	r.view = v
	defer func() { r.view = nil }()
	return r.reconcile(v, 0, nil)
}

// newRouteView returns the view of set, or nil if set is not sorted by
// destination with each once, or has a route the reconciler would not own
// (with r.own).
func (r *RouteReconciler) newRouteView(set RouteSet) *routeView {
	n := set.Len()
	v := &routeView{set: set, r: r, idsSorted: r.nexthops}
	var prev routeKey
	var prevID uint32
	for i := range n {
		d := set.Route(i)
		k := keyOf(d.Dst, 0, 0)
		if !r.ownsDst(d.Dst) || !r.onLink(d.LinkIndex) || !r.family(d.Gw) || (i > 0 && compareRouteKeys(prev, k) >= 0) {
			return nil
		}
		prev = k
		if v.idsSorted {
			id := nexthopID(d.Gw)
			v.idsSorted = i == 0 || prevID <= id
			prevID = id
		}
	}
	if r.nexthops && !v.idsSorted {
		v.uses = make([]nhUse, n)
		for i := range n {
			v.uses[i] = nhUse{nexthopID(set.Route(i).Gw), uint32(i)}
		}
		v.uses = firstUses(v.uses)
	}
	return v
}

// reconcileSeq is Reconcile of the routes desired yields, n of them (a
// hint), copied into a desired set.
func (r *RouteReconciler) reconcileSeq(own netip.Prefix, n int, desired iter.Seq[nlbatch.Route]) (Changes, error) {
	r.own = own
	// The desired set lives for this call only: between calls the
	// reconciler holds no route.
	want := make([]Entry[routeKey, hop], 0, n)
	var bad int
	var badErr error
	for d := range desired {
		if !r.ownsDst(d.Dst) || !r.onLink(d.LinkIndex) || !r.family(d.Gw) {
			bad++
			if badErr == nil {
				badErr = fmt.Errorf("installing route %s: %w (Network %s, own subnet %s, links %v)", routeString(&d), ErrRouteNotOwned, r.network, own, r.links)
			}
			continue
		}
		want = append(want, Entry[routeKey, hop]{keyOf(d.Dst, 0, 0), hop{gw: d.Gw.As16(), link: int32(d.LinkIndex), onlink: d.Onlink}})
	}
	want = SortEntries(want, compareRouteKeys)
	if r.nexthops {
		r.nhs = useNexthops(want)
	}
	return r.reconcile(Entries[routeKey, hop](want), bad, badErr)
}

// reconcile writes want, the routes of this call; bad desired routes were
// not owned, the first for badErr.
func (r *RouteReconciler) reconcile(want Desired[routeKey, hop], bad int, badErr error) (Changes, error) {
	r.unused = map[uint32]bool{}
	defer func() { r.nhs, r.unused = nil, nil }()
	if err := r.rec.PlanSet(want); err != nil {
		return Changes{Failed: bad}, fmt.Errorf("listing routes: %w", err)
	}
	r.rec.Add()
	r.rec.Remove()
	c, err := r.rec.Result()
	if err2 := r.collectNexthops(); err2 != nil {
		c.Failed++
		err = errors.Join(err, err2)
	}
	if cap(r.routes) > keepChanges {
		r.routes, r.moves, r.nhBuf, r.ids, r.errs = nil, nil, nil, nil, nil
	}
	if bad > 0 {
		c.Failed += bad
		if err == nil {
			err = failedErr(badErr, bad)
		}
	}
	return c, err
}

// nhUse is a nexthop object desired routes use: its ID and the index in
// the desired set of the first route through it.
type nhUse struct{ id, at uint32 }

// firstUses sorts uses by ID and keeps the first route of each.
func firstUses(uses []nhUse) []nhUse {
	slices.SortFunc(uses, func(a, b nhUse) int {
		if c := cmp.Compare(a.id, b.id); c != 0 {
			return c
		}
		return cmp.Compare(a.at, b.at)
	})
	return slices.CompactFunc(uses, func(a, b nhUse) bool { return a.id == b.id })
}

// useNexthops routes each route of want through the nexthop object of its
// gateway and returns the IDs in use, sorted: of routes whose gateways
// share an ID, those with the hop (gateway, link, onlink) of the lowest
// destination, the others stay plain.
func useNexthops(want []Entry[routeKey, hop]) []nhUse {
	uses := make([]nhUse, len(want))
	for i := range want {
		uses[i] = nhUse{nexthopID(netip.AddrFrom16(want[i].Val.gw).Unmap()), uint32(i)}
	}
	uses = firstUses(uses)
	for i := range want {
		h := &want[i].Val
		id := nexthopID(netip.AddrFrom16(h.gw).Unmap())
		j, _ := slices.BinarySearchFunc(uses, id, func(u nhUse, id uint32) int { return cmp.Compare(u.id, id) })
		if via := want[uses[j].at].Val; h.gw == via.gw && h.link == via.link && h.onlink == via.onlink {
			h.nh = id
		}
	}
	return uses
}

// routeView is a RouteSet as the Reconciler's desired set: keys and hops
// computed from its routes on demand, the nexthop IDs too. With nexthop
// objects, either idsSorted (the IDs of the routes' gateways rise with
// the routes: the set itself is searched by ID) or uses holds the first
// route of each ID.
type routeView struct {
	set       RouteSet
	r         *RouteReconciler
	idsSorted bool
	uses      []nhUse
	last      int // the route nexthopUsed found last
	// cache holds the routes read last, by index modulo 4 (i+1; 0:
	// none): a dump in order reads each route a few times.
	cache [4]struct {
		i int
		r nlbatch.Route
	}
}

// route returns the i-th route of the set.
func (v *routeView) route(i int) nlbatch.Route {
	c := &v.cache[i&3]
	if c.i != i+1 {
		c.i, c.r = i+1, v.set.Route(i)
	}
	return c.r
}

func (v *routeView) Len() int { return v.set.Len() }

func (v *routeView) Key(i int) routeKey { return keyOf(v.route(i).Dst, 0, 0) }

func (v *routeView) Val(i int) hop {
	d := v.route(i)
	h := hop{gw: d.Gw.As16(), link: int32(d.LinkIndex), onlink: d.Onlink}
	if !v.r.nexthops {
		return h
	}
	id := nexthopID(d.Gw)
	first := -1
	switch {
	case v.idsSorted && (i == 0 || v.id(i-1) != id):
		first = i
	case v.idsSorted:
		first = v.searchID(id)
	default:
		j, _ := slices.BinarySearchFunc(v.uses, id, func(u nhUse, id uint32) int { return cmp.Compare(u.id, id) })
		first = int(v.uses[j].at)
	}
	if first != i {
		f := v.route(first)
		if f.Gw != d.Gw || f.LinkIndex != d.LinkIndex || f.Onlink != d.Onlink {
			return h
		}
	}
	h.nh = id
	return h
}

func (v *routeView) id(i int) uint32 { return nexthopID(v.route(i).Gw) }

// searchID returns the first route (by index) whose gateway's ID is id, or
// -1; idsSorted only.
func (v *routeView) searchID(id uint32) int {
	lo, hi := 0, v.set.Len()
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if v.id(m) < id {
			lo = m + 1
		} else {
			hi = m
		}
	}
	if lo < v.set.Len() && v.id(lo) == id {
		return lo
	}
	return -1
}

// used reports whether a route of the view uses the nexthop object id:
// first at the route found last or the next (a dump in order), then by
// binary search.
func (v *routeView) used(id uint32) bool {
	if !v.idsSorted {
		_, used := slices.BinarySearchFunc(v.uses, id, func(u nhUse, id uint32) int { return cmp.Compare(u.id, id) })
		return used
	}
	for i := v.last; i < v.set.Len() && i <= v.last+1; i++ {
		if v.id(i) == id {
			v.last = i
			return true
		}
	}
	if i := v.searchID(id); i >= 0 {
		v.last = i
		return true
	}
	return false
}

// FailedRoutes returns the destinations whose install failed in the last
// Reconcile.
func (r *RouteReconciler) FailedRoutes() []netip.Prefix {
	keys := r.rec.FailedSets()
	out := make([]netip.Prefix, len(keys))
	for i, k := range keys {
		out[i] = k.prefix()
	}
	return out
}

// ip6DefaultMetric is the metric the kernel gives an IPv6 route added
// without one (IP6_RT_PRIO_USER): the routes this reconciler installs.
const ip6DefaultMetric = 1024

// family reports whether a is an address of the reconciler's family.
func (r *RouteReconciler) family(a netip.Addr) bool {
	if r.v6 {
		return a.Is6() && !a.Is4In6()
	}
	return a.Is4()
}

// ownsDst reports whether dst is a destination the reconciler manages.
func (r *RouteReconciler) ownsDst(dst netip.Prefix) bool {
	return r.family(dst.Addr()) && dst.Masked() == dst &&
		dst.Bits() > r.network.Bits() && r.network.Contains(dst.Addr()) &&
		!(r.own.IsValid() && dst.Overlaps(r.own))
}

func (r *RouteReconciler) onLink(index int) bool {
	return index > 0 && slices.Contains(r.links, index)
}

// routeTable is the main table's owned routes of one family as a Table.
type routeTable struct{ r *RouteReconciler }

// Dump reports the owned routes, in the form Reconcile writes them (the
// IPv6 default metric as 0), and notes the nexthop objects of this
// reconciler's making they use that no desired route does.
func (t routeTable) Dump(add func(routeKey, hop)) error {
	r := t.r
	clear(r.unused)
	collect := func(k *nlbatch.Route) bool {
		if k.Table != unix.RT_TABLE_MAIN || k.Type != unix.RTN_UNICAST || k.Multipath || !r.onLink(k.LinkIndex) ||
			!r.family(k.Gw) || k.Gw.IsUnspecified() || !r.ownsDst(k.Dst) {
			return true
		}
		pri := k.Priority
		if r.v6 && pri == ip6DefaultMetric {
			pri = 0
		}
		h := hopOf(k)
		if h.nh != 0 && h.nh == nexthopID(k.Gw) && !r.nexthopUsed(h.nh) {
			r.unused[h.nh] = true
		}
		add(keyOf(k.Dst, pri, k.Tos), h)
		return true
	}
	if r.v6 {
		return r.nl.ListRoutes6(collect)
	}
	return r.nl.ListRoutes(collect)
}

// nexthopUsed reports whether a desired route uses nexthop object id.
func (r *RouteReconciler) nexthopUsed(id uint32) bool {
	if r.view != nil {
		return r.view.used(id)
	}
	_, used := slices.BinarySearchFunc(r.nhs, id, func(u nhUse, id uint32) int { return cmp.Compare(u.id, id) })
	return used
}

// Set replaces the routes in one batch, after the nexthop objects they use.
func (t routeTable) Set(keys []routeKey, hops []hop, errs []error) {
	r := t.r
	r.moves = r.moves[:0]
	if r.v6 {
		r.rec.Replacing(func(k routeKey, want, have hop) {
			if have.link != want.link {
				r.moves = append(r.moves, have.route(k))
			}
		})
	}
	if len(r.moves) > 0 {
		// The kernel refuses an IPv6 onlink gateway that a route through
		// another link covers, the route being replaced included: a route
		// moving to another link (DirectRouting turned off, say) goes
		// first. A failure here shows in the replace that follows. (A
		// foreign route for the whole IPv6 network through another link
		// makes every onlink route fail the same way; the error says
		// "invalid argument" for each.)
		_ = r.nl.DeleteRoutes(r.moves, Results(&r.errs, len(r.moves)))
	}
	nhFailed := r.writeNexthops(hops)
	t.chunks(keys, hops, errs, func(routes []nlbatch.Route, errs []error) {
		_ = r.nl.ReplaceRoutes(routes, errs) // a socket failure is in errs too
		for i, err := range errs {
			if err == nil {
				continue
			}
			if nhErr, bad := nhFailed[routes[i].NexthopID]; bad {
				err = fmt.Errorf("%w (installing its nexthop object: %w)", err, nhErr)
			}
			errs[i] = fmt.Errorf("installing route %s: %w", routeString(&routes[i]), err)
		}
	})
}

// Delete deletes the routes in one batch, naming gateway, link, metric and
// TOS so that only that route goes.
func (t routeTable) Delete(keys []routeKey, hops []hop, errs []error) {
	t.chunks(keys, hops, errs, func(routes []nlbatch.Route, errs []error) {
		_ = t.r.nl.DeleteRoutes(routes, errs)
		for i, err := range errs {
			if err != nil {
				errs[i] = fmt.Errorf("deleting route %s: %w", routeString(&routes[i]), err)
			}
		}
	})
}

// routeChunk is how many routes one write converts at a time: the batch
// buffer stays small (350 KB) however many routes change.
const routeChunk = 4096

// chunks calls write with the routes of keys via hops, routeChunk at a
// time, and the matching part of errs.
func (t routeTable) chunks(keys []routeKey, hops []hop, errs []error, write func([]nlbatch.Route, []error)) {
	r := t.r
	if n := min(len(keys), routeChunk); cap(r.routes) < n {
		r.routes = make([]nlbatch.Route, 0, n)
	}
	for start := 0; start < len(keys); start += routeChunk {
		end := min(start+routeChunk, len(keys))
		r.routes = r.routes[:0]
		for i := start; i < end; i++ {
			r.routes = append(r.routes, hops[i].route(keys[i]))
		}
		write(r.routes, errs[start:end])
	}
	clear(r.routes)
}

// routeString renders a route as ip-route does, with the link index as dev.
func routeString(r *nlbatch.Route) string {
	s := fmt.Sprintf("%s via %s dev %d", r.Dst, r.Gw, r.LinkIndex)
	if r.Onlink {
		s += " onlink"
	}
	if r.Priority != 0 {
		s += fmt.Sprintf(" metric %d", r.Priority)
	}
	if r.Tos != 0 {
		s += fmt.Sprintf(" tos %d", r.Tos)
	}
	return s
}

// writeNexthops adds or replaces the nexthop objects of the routes about to
// be set, before them, and returns the failures by ID (a route through a
// failed nexthop object then fails too, and says why).
func (r *RouteReconciler) writeNexthops(hops []hop) map[uint32]error {
	n := 0
	for i := range hops {
		if hops[i].nh != 0 {
			n++
		}
	}
	if n == 0 {
		return nil
	}
	if cap(r.nhBuf) < n {
		r.nhBuf = make([]nlbatch.Nexthop, 0, n)
	}
	r.nhBuf = r.nhBuf[:0]
	for i := range hops {
		if h := &hops[i]; h.nh != 0 {
			r.nhBuf = append(r.nhBuf, nlbatch.Nexthop{ID: h.nh, Gw: netip.AddrFrom16(h.gw).Unmap(), LinkIndex: int(h.link), Onlink: h.onlink})
		}
	}
	// Routes through one object have one hop: keep one of each ID.
	slices.SortFunc(r.nhBuf, func(a, b nlbatch.Nexthop) int { return cmp.Compare(a.ID, b.ID) })
	r.nhBuf = slices.CompactFunc(r.nhBuf, func(a, b nlbatch.Nexthop) bool { return a.ID == b.ID })
	errs := Results(&r.errs, len(r.nhBuf))
	_ = r.nl.ReplaceNexthops(r.nhBuf, errs)
	var failed map[uint32]error
	for i, err := range errs {
		if err != nil {
			if failed == nil {
				failed = map[uint32]error{}
			}
			failed[r.nhBuf[i].ID] = err
		}
	}
	clear(r.nhBuf)
	return failed
}

// collectNexthops deletes the nexthop objects that owned routes used before
// this call (as the dump found them) and no desired route uses now: those
// of removed routes, and all of them when nexthop objects are turned off.
// Only IDs of this reconciler's making (the gateway's address) are touched.
func (r *RouteReconciler) collectNexthops() error {
	r.ids = r.ids[:0]
	for id := range r.unused {
		r.ids = append(r.ids, id)
	}
	if len(r.ids) == 0 {
		return nil
	}
	errs := Results(&r.errs, len(r.ids))
	_ = r.nl.DeleteNexthops(r.ids, errs)
	for i, err := range errs {
		if err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("deleting nexthop object %d: %w", r.ids[i], err)
		}
	}
	return nil
}
