package backend

import (
	"errors"
	"fmt"
	"math/bits"
	"slices"
	"sort"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Table is a keyed table a Reconciler keeps: Dump reads it, Set and Delete
// write many entries per call (a netlink batch, one wgctrl call); keys[i]
// and vals[i] are one entry and errs[i] receives its result (nil for
// success), an error that names the entry.
type Table[K, V any] interface {
	// Dump calls add for each entry the caller owns. It may return
	// netlink.ErrDumpInterrupted after delivering everything; the
	// Reconciler then reads again (up to three times, then uses the last
	// view: a set replaces, and the next call fixes what was missed).
	Dump(add func(K, V)) error
	// Set adds each entry or replaces the one with its key.
	Set(keys []K, vals []V, errs []error)
	// Delete removes each entry, given as Dump reported it.
	Delete(keys []K, vals []V, errs []error)
}

// Changes counts what one reconcile did, for logs and metrics.
type Changes struct {
	// Added is the number of entries installed for a key that had none.
	Added int
	// Updated is the number of entries replaced because their value
	// differed.
	Updated int
	// Removed is the number of stale entries deleted.
	Removed int
	// Failed is the number of changes whose write returned an error.
	Failed int
}

// Any reports whether anything was changed or attempted.
func (c Changes) Any() bool { return c.Added+c.Updated+c.Removed+c.Failed > 0 }

// Same is the Equal of a comparable value type.
func Same[V comparable](want, have V) bool { return want == have }

// Entry is one entry of a desired set: a key and its value.
type Entry[K, V any] struct {
	Key K
	Val V
}

// ErrUnsorted is returned (wrapped) by Plan for a desired set that is not
// sorted by key, or has a key twice.
var ErrUnsorted = errors.New("desired set not sorted by key with each key once")

// SortEntries sorts d by key (stably) and keeps, of the entries with one
// key, the last in d's order, as a map built from d would: it returns d
// shortened, a desired set Plan takes. An already sorted d is only read.
func SortEntries[K, V any](d []Entry[K, V], cmp func(a, b K) int) []Entry[K, V] {
	sorted := true
	for i := 1; i < len(d); i++ {
		if cmp(d[i-1].Key, d[i].Key) >= 0 {
			sorted = false
			break
		}
	}
	if sorted {
		return d
	}
	slices.SortStableFunc(d, func(a, b Entry[K, V]) int { return cmp(a.Key, b.Key) })
	n := 0
	for i := range d {
		if n > 0 && cmp(d[n-1].Key, d[i].Key) == 0 {
			d[n-1] = d[i]
			continue
		}
		d[n] = d[i]
		n++
	}
	clear(d[n:])
	return d[:n]
}

// SortedEntries returns the entries of m as a desired set: the form of a
// small table's set kept as a map.
func SortedEntries[K comparable, V any](m map[K]V, cmp func(a, b K) int) []Entry[K, V] {
	d := make([]Entry[K, V], 0, len(m))
	for k, v := range m {
		d = append(d, Entry[K, V]{k, v})
	}
	slices.SortFunc(d, func(a, b Entry[K, V]) int { return cmp(a.Key, b.Key) })
	return d
}

// Desired is a desired set as a Reconciler reads it: Len entries sorted by
// key with each key once, the i-th with key Key(i) and value Val(i). A
// view may compute them on demand from the caller's own records (the
// leases of an Apply, say), so that no copy of the set is built: the
// Reconciler reads it only during Plan, by index, a few times an entry.
type Desired[K, V any] interface {
	Len() int
	Key(i int) K
	Val(i int) V
}

// Searcher is a Desired that finds a key itself, from an index of its own
// or with a cheaper comparison than by Key: Search returns the index of
// the entry with key k, or -1. The Reconciler then uses it for each dumped
// entry.
type Searcher[K any] interface {
	Search(k K) int
}

// Entries is a desired set held as a slice: the form of small tables.
type Entries[K, V any] []Entry[K, V]

func (d Entries[K, V]) Len() int    { return len(d) }
func (d Entries[K, V]) Key(i int) K { return d[i].Key }
func (d Entries[K, V]) Val(i int) V { return d[i].Val }

// Find returns the index of the entry of d (sorted by key with cmp) with
// key k, or -1.
func Find[K, V any](d []Entry[K, V], k K, cmp func(a, b K) int) int {
	i, ok := slices.BinarySearchFunc(d, k, func(e Entry[K, V], k K) int { return cmp(e.Key, k) })
	if !ok {
		return -1
	}
	return i
}

// Search returns the index of the entry of d (sorted by key with cmp) with
// key k, or -1.
func Search[K, V any](d Desired[K, V], k K, cmp func(a, b K) int) int {
	switch d := d.(type) {
	case Entries[K, V]:
		return Find(d, k, cmp)
	case Searcher[K]:
		return d.Search(k)
	}
	return searchKeys(d, k, cmp)
}

// searchKeys is Search by d.Key.
func searchKeys[K, V any](d Desired[K, V], k K, cmp func(a, b K) int) int {
	i, ok := sort.Find(d.Len(), func(m int) int { return cmp(k, d.Key(m)) })
	if !ok {
		return -1
	}
	return i
}

// Reconciler is the one reconcile primitive: every table a backend owns —
// routes (IPv4, IPv6, plain or through nexthop objects), neighbours, fdb
// entries, device addresses, the udp peer table, WireGuard peers (key: the
// public key; value: endpoint, allowed IPs, PSK, keepalive, with an equal
// function as the value holds slices) — is a Table, and a Reconciler makes
// it hold exactly a desired set:
//
//	Desired ─────────┐  (sorted by key: a slice, or a view)
//	                 ├─ Plan: one Dump (re-read if interrupted), diff ─→ sets, deletes
//	Table.Dump ──────┘
//	Add:    Table.Set(sets)        missing or different entries, one batch
//	Remove: Table.Delete(deletes)  entries no longer desired, one batch
//
// Adding goes before deleting, so traffic keeps flowing while an entry
// moves; Reconcile does both, a backend that orders several tables (vxlan:
// neighbours, fdb entries and routes set, then deleted in reverse) calls
// Plan, Add and Remove itself. Nothing is remembered between calls but
// small buffers: each Plan reads the table afresh, finding each dumped
// entry's key in the desired set as it arrives, by binary search or the
// set's own Search (the dump is not kept; a dump in key order costs one
// comparison an entry), so an entry deleted by hand comes back and the
// leftovers of a previous run go.
// Besides the changes, a Plan holds a bit per desired entry (and 4 bytes
// per entry while it replaces some).
//
// The kernel can hold several entries under one key (ip route append,
// bridge fdb append, a route with another metric when the key has none):
// the Dump reports each; the one equal to the desired value (else the
// first) is the key's entry and the others are deleted.
//
// A failing entry does not stop the others: it counts in Changes.Failed,
// its key is in FailedSets (for a set), and the first error is returned
// with how many more failed. A delete of an entry already gone (ENOENT,
// ESRCH, ENODEV, EADDRNOTAVAIL) counts as done.
//
// Use it from one goroutine at a time; its buffers are reused between
// calls.
type Reconciler[K, V any] struct {
	table Table[K, V]
	cmp   func(a, b K) int
	equal func(want, have V) bool

	// desired is the caller's set during Plan. Bit i of seen is set once
	// the dump found an entry for desired entry i: the desired one, or,
	// if rep[i] is j+1, one to replace by the set at index j (rep is
	// made by the first replace of a Plan). last is the index found
	// last, where a dump in key order finds the next.
	desired  Desired[K, V]
	slice    []Entry[K, V] // desired, if Entries: read directly
	searcher Searcher[K]   // desired, if it is one
	seen     []uint64
	rep      []int32
	last     int

	// The sets: the first nrep replace a dumped entry, the others add
	// one. For a replace, at is its index in desired and old the entry
	// as dumped.
	setK   []K
	setV   []V
	nrep   int
	at     []int32
	old    []V
	delK   []K
	delV   []V
	errs   []error
	failed []K
	c      Changes
	first  error
}

// dumpAttempts bounds the reads of a table the kernel reports changed
// during the dump.
const dumpAttempts = 3

// keepChanges is the largest change list (and desired set, for seen) a
// Reconciler keeps buffers for between calls; after a burst the buffers go
// to the garbage collector.
const keepChanges = 1024

// NewReconciler returns a Reconciler of t; cmp orders keys (desired sets
// are sorted by it) and equal reports whether an entry as dumped (have) is
// the desired one (want), e.g. Same.
func NewReconciler[K, V any](t Table[K, V], cmp func(a, b K) int, equal func(want, have V) bool) *Reconciler[K, V] {
	return &Reconciler[K, V]{table: t, cmp: cmp, equal: equal}
}

// Reconcile makes the table hold exactly desired: Plan, Add, Remove. The
// error is the dump's, or the first failed entry's.
func (r *Reconciler[K, V]) Reconcile(desired []Entry[K, V]) (Changes, error) {
	if err := r.Plan(desired); err != nil {
		return Changes{}, err
	}
	r.Add()
	r.Remove()
	return r.Result()
}

// Plan is PlanSet of a desired set held as a slice.
func (r *Reconciler[K, V]) Plan(desired []Entry[K, V]) error {
	return r.PlanSet(Entries[K, V](desired))
}

// PlanSet reads the table and works out the changes that make it desired,
// entries sorted by key with each key once (SortEntries makes a slice so;
// otherwise PlanSet returns ErrUnsorted). It reads desired only until it
// returns, and does not modify it: Add and Remove write the changes it
// found.
func (r *Reconciler[K, V]) PlanSet(desired Desired[K, V]) error {
	r.c, r.first, r.nrep = Changes{}, nil, 0
	r.failed = r.failed[:0]
	n := desired.Len()
	if n > 1 {
		prev := desired.Key(0)
		for i := 1; i < n; i++ {
			k := desired.Key(i)
			if r.cmp(prev, k) >= 0 {
				return fmt.Errorf("planning %d entries: %w (at %d)", n, ErrUnsorted, i)
			}
			prev = k
		}
	}
	r.desired, r.last = desired, -1
	r.slice, _ = desired.(Entries[K, V])
	r.searcher, _ = desired.(Searcher[K])
	words := (n + 63) / 64
	if cap(r.seen) < words {
		r.seen = make([]uint64, words)
	}
	r.seen = r.seen[:words]
	defer func() {
		r.desired, r.slice, r.searcher = nil, nil, nil
		if cap(r.seen) > keepChanges {
			r.seen = nil
		}
		r.rep = nil
	}()
	var err error
	for range dumpAttempts {
		clear(r.seen)
		clear(r.rep)
		clear(r.setK)
		clear(r.setV)
		clear(r.old)
		clear(r.delV)
		r.setK, r.setV, r.at, r.old = r.setK[:0], r.setV[:0], r.at[:0], r.old[:0]
		r.delK, r.delV = r.delK[:0], r.delV[:0]
		err = r.table.Dump(r.collect)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
		err = nil
	}
	if err != nil {
		r.trim()
		return err
	}
	// Drop the replaces a later, desired entry of the same key cancelled.
	m := 0
	for j, i := range r.at {
		if r.rep[i] != int32(j+1) {
			continue
		}
		r.setK[m], r.setV[m], r.at[m], r.old[m] = r.setK[j], r.setV[j], i, r.old[j]
		m++
	}
	clear(r.setK[m:])
	clear(r.setV[m:])
	clear(r.old[m:])
	r.setK, r.setV, r.at, r.old, r.nrep = r.setK[:m], r.setV[:m], r.at[:m], r.old[:m], m
	adds := n
	for _, w := range r.seen {
		adds -= bits.OnesCount64(w)
	}
	if adds > 0 {
		r.setK, r.setV = slices.Grow(r.setK, adds), slices.Grow(r.setV, adds)
		for i := range n {
			if r.seen[i>>6]&(1<<(i&63)) == 0 {
				r.setK, r.setV = append(r.setK, desired.Key(i)), append(r.setV, desired.Val(i))
			}
		}
	}
	return nil
}

// find returns the index in desired of key k, or -1: first where the last
// key found is (the same key again) or its successor (a dump in key
// order), then by binary search; or by the Searcher.
func (r *Reconciler[K, V]) find(k K) int {
	if r.searcher != nil {
		return r.searcher.Search(k)
	}
	var i int
	if d := r.slice; d != nil {
		for i := max(r.last, 0); i < len(d) && i <= r.last+1; i++ {
			if r.cmp(d[i].Key, k) == 0 {
				r.last = i
				return i
			}
		}
		i = Find(d, k, r.cmp)
	} else {
		d := r.desired
		for i := max(r.last, 0); i < d.Len() && i <= r.last+1; i++ {
			if r.cmp(d.Key(i), k) == 0 {
				r.last = i
				return i
			}
		}
		i = searchKeys(d, k, r.cmp)
	}
	if i >= 0 {
		r.last = i
	}
	return i
}

// val is the value of desired entry i.
func (r *Reconciler[K, V]) val(i int) V {
	if r.slice != nil {
		return r.slice[i].Val
	}
	return r.desired.Val(i)
}

// collect is the dump callback. An entry of a key not desired is to
// delete. The first entry of a desired key stays (replaced if it differs),
// unless a later one is the desired entry: then that one stays; the others
// are to delete.
func (r *Reconciler[K, V]) collect(k K, v V) {
	i := r.find(k)
	if i < 0 {
		r.delK, r.delV = append(r.delK, k), append(r.delV, v)
		return
	}
	w, bit := i>>6, uint64(1)<<(i&63)
	var s int32 // 0: nothing found yet, -1: the desired entry, j+1: a replace by set j
	if r.seen[w]&bit != 0 {
		s = -1
		if r.rep != nil && r.rep[i] != 0 {
			s = r.rep[i]
		}
	}
	if s == -1 {
		r.delK, r.delV = append(r.delK, k), append(r.delV, v)
		return
	}
	want := r.val(i)
	switch {
	case s == 0 && r.equal(want, v):
		r.seen[w] |= bit
	case s == 0:
		if r.rep == nil {
			r.rep = make([]int32, r.desired.Len())
		}
		r.seen[w] |= bit
		r.rep[i] = int32(len(r.setK) + 1)
		r.setK, r.setV, r.at, r.old = append(r.setK, r.desired.Key(i)), append(r.setV, want), append(r.at, int32(i)), append(r.old, v)
	case r.equal(want, v):
		// The entry kept so far was to be replaced; this one is desired.
		r.rep[i] = 0
		r.delK, r.delV = append(r.delK, k), append(r.delV, r.old[s-1])
	default:
		r.delK, r.delV = append(r.delK, k), append(r.delV, v)
	}
}

// Replacing calls fn for each set Plan found that replaces a dumped entry:
// its key, the desired value and the entry as dumped. It is valid from
// Plan until Remove returns (a Table's Set may use it).
func (r *Reconciler[K, V]) Replacing(fn func(k K, want, have V)) {
	for i := range r.nrep {
		fn(r.setK[i], r.setV[i], r.old[i])
	}
}

// Add writes the sets Plan found: one Table.Set.
func (r *Reconciler[K, V]) Add() {
	if len(r.setV) == 0 {
		return
	}
	errs := Results(&r.errs, len(r.setV))
	r.table.Set(r.setK, r.setV, errs)
	for i, err := range errs {
		switch {
		case err != nil:
			r.fail(err)
			r.failed = append(r.failed, r.setK[i])
		case i < r.nrep:
			r.c.Updated++
		default:
			r.c.Added++
		}
	}
}

// Remove writes the deletes Plan found: one Table.Delete.
func (r *Reconciler[K, V]) Remove() {
	defer r.trim()
	if len(r.delV) == 0 {
		return
	}
	errs := Results(&r.errs, len(r.delV))
	r.table.Delete(r.delK, r.delV, errs)
	for _, err := range errs {
		if err != nil && !isNotFound(err) {
			r.fail(err)
			continue
		}
		r.c.Removed++
	}
}

// trim drops what the call no longer needs: references to the caller's
// entries and, after a burst, the big buffers.
func (r *Reconciler[K, V]) trim() {
	clear(r.setK) // references to desired and dumped entries
	clear(r.setV)
	clear(r.old)
	clear(r.delK)
	clear(r.delV)
	if cap(r.setV)+cap(r.delV) > keepChanges {
		r.setK, r.setV, r.at, r.old, r.delK, r.delV, r.errs = nil, nil, nil, nil, nil, nil, nil
	}
}

func (r *Reconciler[K, V]) fail(err error) {
	r.c.Failed++
	if r.first == nil {
		r.first = err
	}
}

// Result returns what the writes since Plan did and the first failure,
// noting how many more failed.
func (r *Reconciler[K, V]) Result() (Changes, error) { return r.c, failedErr(r.first, r.c.Failed) }

// FailedSets returns the keys whose set failed since the last Plan. The
// slice is the Reconciler's; read it only.
func (r *Reconciler[K, V]) FailedSets() []K { return r.failed }

// isNotFound reports whether a delete failed only because the entry (or
// its device) is already gone.
func isNotFound(err error) bool {
	return errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) ||
		errors.Is(err, unix.ENODEV) || errors.Is(err, unix.EADDRNOTAVAIL)
}

// Results returns *buf resized to n and cleared, grown if it is too short:
// the per-entry answers of one batched write, reused between writes.
func Results(buf *[]error, n int) []error {
	if cap(*buf) < n {
		*buf = make([]error, n)
	}
	*buf = (*buf)[:n]
	clear(*buf)
	return *buf
}

// failedErr returns first, noting how many other changes failed too.
func failedErr(first error, failed int) error {
	if failed <= 1 {
		return first
	}
	return fmt.Errorf("%w (and %d more failed)", first, failed-1)
}
