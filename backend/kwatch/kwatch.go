// Package kwatch watches the kernel for changes to the state a backend owns
// (backend.Owned) and says when a reconcile is due: it subscribes to the
// rtnetlink link, address, route and neighbour notifications and passes on
// a Cause for each one that removes, disables or alters owned state, so
// that the daemon repairs it within milliseconds instead of at the next
// resync.
//
// What calls for a reconcile:
//   - a main-table route into an owned prefix deleted;
//   - a neighbour or fdb entry of an owned device deleted;
//   - an owned device deleted, set down, re-created (a new index), its MAC
//     or MTU changed; an address of it deleted;
//   - the external interface going down or up (IFF_UP or IFF_LOWER_UP
//     changing: the kernel drops the IPv4 routes through a link that goes
//     down without telling anyone), deleted, or an address of it (but an
//     IPv6 link-local one) added or deleted;
//   - a main-table route into an owned prefix, or a permanent neighbour or
//     fdb entry of an owned device, added or replaced (another gateway,
//     another MAC) by someone else;
//   - events lost (the socket's buffer overflowed, or a subscription
//     failed): the watcher subscribes again and asks for a reconcile, since
//     anything may have changed meanwhile.
//
// The daemon's own writes are additions and replacements too, which the
// watcher cannot tell from anyone else's: the daemon marks the time it
// writes (Writing), and additions seen then or up to EchoWindow after are
// taken for its own. One that is read later (a slow reader) or a foreign
// one within the window costs at most one reconcile too many or waits for
// the resync; deletions the daemon makes itself (stale entries) cause at
// most one more reconcile, which finds nothing to do and writes nothing.
package kwatch

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/pkg/ip"
)

// Cause says why a reconcile is due; it is a metric label.
type Cause string

// The causes, one per kind of event.
const (
	RouteDeleted Cause = "route-deleted" // a route into an owned prefix
	NeighDeleted Cause = "neigh-deleted" // a neighbour or fdb entry of an owned device
	LinkChanged  Cause = "link-changed"  // an owned device deleted, down, re-created, MAC or MTU changed
	AddrDeleted  Cause = "addr-deleted"  // an address of an owned device
	ExtChanged   Cause = "ext-changed"   // the external interface up/down, deleted, an address added or deleted
	EventsLost   Cause = "events-lost"   // a subscription overflowed or failed
	RouteChanged Cause = "route-changed" // a route into an owned prefix added or replaced by someone else
	NeighChanged Cause = "neigh-changed" // a permanent neighbour or fdb entry of an owned device added or replaced by someone else
)

// EchoWindow is how long after the daemon's writes end additions and
// replacements are still taken for their echo. The kernel has queued the
// notifications of a write when the write returns; the window only covers
// reading them.
const EchoWindow = 20 * time.Millisecond

// Causes lists every Cause.
var Causes = []Cause{RouteDeleted, NeighDeleted, LinkChanged, AddrDeleted, ExtChanged, EventsLost, RouteChanged, NeighChanged}

// Options configures a Watcher.
type Options struct {
	// Owned is what to watch.
	Owned backend.Owned
	// Netns is the network namespace to watch; nil means the process's.
	Netns *netns.NsHandle
	// RecvBuffer is the receive buffer of each subscription socket, set
	// past rmem_max when the process may (8 MiB: about 10,000 route
	// deletions without an overflow).
	RecvBuffer int
	// Logger receives the watcher's logs.
	Logger klog.Logger
}

// Watcher passes on the kernel events that call for a reconcile. Create it
// with New, then call Run.
type Watcher struct {
	o Options
	c chan Cause
	s *subs // the current subscriptions, once Start succeeded
	// noForce is set once a receive buffer past rmem_max was refused.
	noForce bool
	// counts are the events passed on, by cause (as in Causes).
	counts [8]atomic.Uint64
	// writing is the number of Writing(true) not yet ended; echoUntil
	// (Unix nanoseconds) is when the last one ended plus EchoWindow.
	writing   atomic.Int32
	echoUntil atomic.Int64
	// f decides about each event; only Run's goroutine uses it.
	f filter
}

// New returns a watcher of o.Owned; it subscribes to nothing until Run.
func New(o Options) *Watcher {
	if o.RecvBuffer == 0 {
		o.RecvBuffer = 8 << 20
	}
	return &Watcher{o: o, c: make(chan Cause, 1), f: newFilter(o.Owned)}
}

// C delivers a Cause when a reconcile is due. It holds one: while one is
// waiting to be read, further causes are dropped (the reconcile it asks for
// covers them), so a storm of events costs one receive.
func (w *Watcher) C() <-chan Cause { return w.c }

// Writing marks the daemon's own writes to the kernel: call it with true
// before and false after; additions and replacements seen in between and
// up to EchoWindow after are its echo, not a cause. Safe for concurrent use.
func (w *Watcher) Writing(on bool) {
	if on {
		w.writing.Add(1)
		return
	}
	w.echoUntil.Store(time.Now().Add(EchoWindow).UnixNano())
	w.writing.Add(-1)
}

// echo reports whether an addition seen now is the daemon's own.
func (w *Watcher) echo() bool {
	return w.writing.Load() > 0 || time.Now().UnixNano() < w.echoUntil.Load()
}

// Counts returns how many events called for a reconcile since the start,
// by cause (including those folded into one already waiting in C).
func (w *Watcher) Counts() map[Cause]uint64 {
	m := make(map[Cause]uint64, len(Causes))
	for i, c := range Causes {
		m[c] = w.counts[i].Load()
	}
	return m
}

// signal counts c and passes it on unless one is waiting; it reports
// whether it did.
func (w *Watcher) signal(c Cause) bool {
	if i := slices.Index(Causes, c); i >= 0 {
		w.counts[i].Add(1)
	}
	select {
	case w.c <- c:
		return true
	default:
		return false
	}
}

// subs is one set of subscriptions: their channels and what stops them.
// A channel holds few updates (a RouteUpdate is 384 bytes: 1,024 of them
// were 0.4 MB kept for the daemon's life): in a burst, the reading
// goroutine waits and the socket's buffer (RecvBuffer) holds the rest.
type subs struct {
	done   chan struct{}
	links  chan netlink.LinkUpdate
	addrs  chan netlink.AddrUpdate
	routes chan netlink.RouteUpdate
	neighs chan netlink.NeighUpdate
}

// subsQueue is the capacity of each subscription's channel.
const subsQueue = 64

// subscribe subscribes to the four kinds of events; the links are listed
// first (they tell the indexes of the owned devices and the state of the
// external interface), and the external interface's addresses are read.
func (w *Watcher) subscribe() (*subs, error) {
	s := &subs{
		done:   make(chan struct{}),
		links:  make(chan netlink.LinkUpdate, subsQueue),
		addrs:  make(chan netlink.AddrUpdate, subsQueue),
		routes: make(chan netlink.RouteUpdate, subsQueue),
		neighs: make(chan netlink.NeighUpdate, subsQueue),
	}
	errf := func(err error) { w.o.Logger.V(1).Info("Kernel event subscription error", "err", err.Error()) }
	ns, buf, force := w.o.Netns, w.o.RecvBuffer, !w.noForce
	err := netlink.LinkSubscribeWithOptions(s.links, s.done, netlink.LinkSubscribeOptions{Namespace: ns, ErrorCallback: errf, ListExisting: true, ReceiveBufferSize: buf, ReceiveBufferForceSize: force})
	if err == nil {
		err = netlink.AddrSubscribeWithOptions(s.addrs, s.done, netlink.AddrSubscribeOptions{Namespace: ns, ErrorCallback: errf, ReceiveBufferSize: buf, ReceiveBufferForceSize: force})
	}
	if err == nil {
		err = netlink.RouteSubscribeWithOptions(s.routes, s.done, netlink.RouteSubscribeOptions{Namespace: ns, ErrorCallback: errf, ReceiveBufferSize: buf, ReceiveBufferForceSize: force})
	}
	if err == nil {
		err = netlink.NeighSubscribeWithOptions(s.neighs, s.done, netlink.NeighSubscribeOptions{Namespace: ns, ErrorCallback: errf, ReceiveBufferSize: buf, ReceiveBufferForceSize: force})
	}
	if err == nil && w.o.Owned.ExtIndex > 0 {
		err = w.seedExtAddrs()
	}
	if err != nil {
		s.stop()
		if force {
			// Past rmem_max needs CAP_NET_ADMIN; without it, what
			// rmem_max allows (an overflow is caught as EventsLost).
			w.noForce = true
			return w.subscribe()
		}
		return nil, fmt.Errorf("subscribing to kernel events: %w", err)
	}
	return s, nil
}

// seedExtAddrs reads the external interface's addresses, so that only a
// new one counts as a change (an IPv6 address refreshed by a router
// advertisement is announced again).
func (w *Watcher) seedExtAddrs() error {
	var h *netlink.Handle
	var err error
	if w.o.Netns != nil {
		h, err = netlink.NewHandleAt(*w.o.Netns, unix.NETLINK_ROUTE)
	} else {
		h, err = netlink.NewHandle(unix.NETLINK_ROUTE)
	}
	if err != nil {
		return err
	}
	defer h.Close()
	addrs, err := h.AddrList(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: w.o.Owned.ExtIndex}}, netlink.FAMILY_ALL)
	if err != nil {
		return fmt.Errorf("listing the addresses of the external interface: %w", err)
	}
	clear(w.f.extAddrs)
	for _, a := range addrs {
		if p, ok := addrKey(a.IPNet); ok {
			w.f.extAddrs[p] = struct{}{}
		}
	}
	return nil
}

// stop ends the subscriptions and drains their channels in the background
// until the library's goroutines close them.
func (s *subs) stop() {
	close(s.done)
	go func() {
		for range s.links {
		}
	}()
	go func() {
		for range s.addrs {
		}
	}()
	go func() {
		for range s.routes {
		}
	}()
	go func() {
		for range s.neighs {
		}
	}()
}

// Start subscribes, so that every change from now on is seen; Run then
// follows the events. Calling it is optional (Run subscribes if needed).
func (w *Watcher) Start() error {
	if w.s != nil {
		return nil
	}
	s, err := w.subscribe()
	w.s = s
	return err
}

// Run passes on causes until ctx ends, then returns nil; it subscribes
// first unless Start did. It returns an error only when that first
// subscription fails; later failures (an overflow closes a subscription)
// are answered by subscribing again, with a back-off, and by EventsLost.
func (w *Watcher) Run(ctx context.Context) error {
	if err := w.Start(); err != nil {
		return err
	}
	s, err := w.s, error(nil)
	retry := 50 * time.Millisecond
	for {
		lost := w.follow(ctx, s)
		s.stop()
		if !lost {
			return nil
		}
		w.signal(EventsLost)
		for {
			if s, err = w.subscribe(); err == nil {
				w.s = s
				retry = 50 * time.Millisecond
				break
			}
			w.o.Logger.Error(err, "Kernel events lost; subscribing again", "in", retry)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(retry):
			}
			retry = min(2*retry, 5*time.Second)
		}
		w.o.Logger.V(1).Info("Kernel events were lost; subscribed again")
	}
}

// follow reads s until ctx ends (false) or a subscription ends (true).
func (w *Watcher) follow(ctx context.Context, s *subs) (lost bool) {
	for {
		var c Cause
		select {
		case <-ctx.Done():
			return false
		case u, ok := <-s.links:
			if !ok {
				return true
			}
			c = w.f.link(u)
		case u, ok := <-s.addrs:
			if !ok {
				return true
			}
			c = w.f.addr(u)
		case u, ok := <-s.routes:
			if !ok {
				return true
			}
			c = w.f.route(u)
		case u, ok := <-s.neighs:
			if !ok {
				return true
			}
			c = w.f.neigh(u)
		}
		if (c == RouteChanged || c == NeighChanged) && w.echo() {
			c = ""
		}
		if c != "" && w.signal(c) {
			w.o.Logger.V(2).Info("Kernel event calls for a reconcile", "cause", c)
		}
	}
}

// filter decides which events call for a reconcile. It remembers the
// owned devices' indexes and attributes and the external interface's
// state and addresses, as the events tell them.
type filter struct {
	names    map[string]bool
	ext      int
	prefixes []netip.Prefix

	devs     map[int]devState // owned devices by index
	extFlags uint32           // IFF_UP|IFF_LOWER_UP of the external interface
	extSeen  bool
	extAddrs map[netip.Prefix]struct{}
}

type devState struct {
	name string
	mac  string
	mtu  int
}

func newFilter(o backend.Owned) filter {
	f := filter{names: map[string]bool{}, ext: o.ExtIndex, devs: map[int]devState{}, extAddrs: map[netip.Prefix]struct{}{}}
	for _, d := range o.Devices {
		f.names[d] = true
	}
	for _, p := range o.Prefixes {
		if p.IsValid() {
			f.prefixes = append(f.prefixes, p.Masked())
		}
	}
	return f
}

const linkFlags = unix.IFF_UP | unix.IFF_LOWER_UP

// link decides about a link event. A dump answer (the initial listing)
// only records state.
func (f *filter) link(u netlink.LinkUpdate) Cause {
	listing := u.Header.Flags&unix.NLM_F_MULTI != 0
	idx := int(u.Index)
	deleted := u.Header.Type == unix.RTM_DELLINK
	if idx == f.ext && f.ext > 0 {
		flags := u.Flags & linkFlags
		changed := deleted || (f.extSeen && flags != f.extFlags)
		f.extFlags, f.extSeen = flags, true
		if changed && !listing {
			return ExtChanged
		}
		return ""
	}
	if u.Link == nil {
		return ""
	}
	a := u.Attrs()
	if !f.names[a.Name] {
		// A device renamed away from an owned name is gone for us.
		if _, ok := f.devs[idx]; ok {
			delete(f.devs, idx)
			if !listing {
				return LinkChanged
			}
		}
		return ""
	}
	if deleted {
		delete(f.devs, idx)
		return LinkChanged
	}
	now := devState{name: a.Name, mac: a.HardwareAddr.String(), mtu: a.MTU}
	old, seen := f.devs[idx]
	for i, d := range f.devs {
		if d.name == a.Name && i != idx {
			delete(f.devs, i) // re-created under a new index
			seen = false
		}
	}
	f.devs[idx] = now
	switch {
	case listing:
		return ""
	case u.Flags&unix.IFF_UP == 0:
		return LinkChanged
	case !seen:
		return LinkChanged
	case old != now:
		return LinkChanged
	}
	return ""
}

// addr decides about an address event.
func (f *filter) addr(u netlink.AddrUpdate) Cause {
	if f.ext > 0 && u.LinkIndex == f.ext {
		p, ok := addrKey(&u.LinkAddress)
		if !ok || p.Addr().IsLinkLocalUnicast() {
			return "" // no route of a backend depends on a link-local address
		}
		_, known := f.extAddrs[p]
		if u.NewAddr {
			f.extAddrs[p] = struct{}{}
			if known {
				return ""
			}
		} else {
			delete(f.extAddrs, p)
		}
		return ExtChanged
	}
	if _, ok := f.devs[u.LinkIndex]; ok && !u.NewAddr {
		return AddrDeleted
	}
	return ""
}

// route decides about a route event: a main-table route into an owned
// prefix deleted, added or replaced.
func (f *filter) route(u netlink.RouteUpdate) Cause {
	if (u.Type != unix.RTM_DELROUTE && u.Type != unix.RTM_NEWROUTE) || u.Dst == nil {
		return ""
	}
	if u.Table != 0 && u.Table != unix.RT_TABLE_MAIN {
		return ""
	}
	p, ok := ip.PrefixFromIPNet(u.Dst)
	if !ok || !slices.ContainsFunc(f.prefixes, func(o netip.Prefix) bool {
		return o.Addr().Is4() == p.Addr().Is4() && o.Bits() <= p.Bits() && o.Contains(p.Addr())
	}) {
		return ""
	}
	if u.Type == unix.RTM_NEWROUTE {
		return RouteChanged
	}
	return RouteDeleted
}

// neigh decides about a neighbour event: an entry of an owned device
// deleted, or a permanent one (the daemon's kind) added or replaced.
func (f *filter) neigh(u netlink.NeighUpdate) Cause {
	if _, ok := f.devs[u.LinkIndex]; !ok {
		return ""
	}
	switch {
	case u.Type == unix.RTM_DELNEIGH:
		return NeighDeleted
	case u.Type == unix.RTM_NEWNEIGH && u.State&unix.NUD_PERMANENT != 0:
		return NeighChanged
	}
	return ""
}

// addrKey is an interface address with its prefix length, unmasked.
func addrKey(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := ip.AddrFromIP(n.IP)
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a, ones), ok
}
