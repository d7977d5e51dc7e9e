package backend

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Table is a keyed table a Reconciler keeps: Dump reads it, Set and Delete
// write many entries per call (a netlink batch, one wgctrl call); keys[i]
// and vals[i] are one entry and errs[i] receives its result (nil for
// success), an error that names the entry.
type Table[K comparable, V any] interface {
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

// Reconciler is the one reconcile primitive: every table a backend owns —
// routes (IPv4, IPv6, plain or through nexthop objects), neighbours, fdb
// entries, device addresses, the udp peer table, WireGuard peers (key: the
// public key; value: endpoint, allowed IPs, PSK, keepalive, with an equal
// function as the value holds slices) — is a Table, and a Reconciler makes
// it hold exactly a desired set:
//
//	desired map[K]V ─┐
//	                 ├─ Plan: one Dump (re-read if interrupted), diff ─→ sets, deletes
//	Table.Dump ──────┘
//	Add:    Table.Set(sets)        missing or different entries, one batch
//	Remove: Table.Delete(deletes)  entries no longer desired, one batch
//
// Adding goes before deleting, so traffic keeps flowing while an entry
// moves; Reconcile does both, a backend that orders several tables (vxlan:
// neighbours, fdb entries and routes set, then deleted in reverse) calls
// Plan, Add and Remove itself. Nothing is remembered between calls but
// small buffers: each Plan reads the table afresh, comparing each dumped
// entry with the desired one as it arrives (the dump is not kept), so an
// entry deleted by hand comes back and the leftovers of a previous run go.
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
type Reconciler[K comparable, V any] struct {
	table Table[K, V]
	equal func(want, have V) bool

	// seen maps each desired key the dump reported to the index in setK
	// of its pending replace, or -1 when its entry is the desired one. It
	// lives from Plan to the end of Plan.
	seen    map[K]int32
	setK    []K
	setV    []V
	old     []V    // for a replace (upd), the entry as dumped
	upd     []bool // whether setV[i] replaces an entry
	delK    []K
	delV    []V
	errs    []error
	failed  []K
	c       Changes
	first   error
	desired map[K]V
}

// dumpAttempts bounds the reads of a table the kernel reports changed
// during the dump.
const dumpAttempts = 3

// keepChanges is the largest change list a Reconciler keeps between calls;
// after a burst the buffers go to the garbage collector.
const keepChanges = 1024

// NewReconciler returns a Reconciler of t; equal reports whether an
// entry as dumped (have) is the desired one (want), e.g. Same.
func NewReconciler[K comparable, V any](t Table[K, V], equal func(want, have V) bool) *Reconciler[K, V] {
	return &Reconciler[K, V]{table: t, equal: equal}
}

// Reconcile makes the table hold exactly desired: Plan, Add, Remove. The
// error is the dump's, or the first failed entry's.
func (r *Reconciler[K, V]) Reconcile(desired map[K]V) (Changes, error) {
	if err := r.Plan(desired); err != nil {
		return Changes{}, err
	}
	r.Add()
	r.Remove()
	return r.Result()
}

// Plan reads the table and works out the changes that make it desired. It
// reads desired until Remove returns; it does not modify it.
func (r *Reconciler[K, V]) Plan(desired map[K]V) error {
	r.desired = desired
	r.c, r.first = Changes{}, nil
	r.failed = r.failed[:0]
	r.seen = make(map[K]int32, len(desired))
	defer func() { r.seen = nil }()
	var err error
	for range dumpAttempts {
		clear(r.seen)
		clear(r.setV)
		clear(r.old)
		clear(r.delV)
		r.setK, r.setV, r.old, r.upd = r.setK[:0], r.setV[:0], r.old[:0], r.upd[:0]
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
	n := 0
	for i, k := range r.setK {
		if r.seen[k] != int32(i) {
			continue
		}
		r.setK[n], r.setV[n], r.old[n], r.upd[n] = k, r.setV[i], r.old[i], true
		n++
	}
	clear(r.setV[n:])
	clear(r.old[n:])
	r.setK, r.setV, r.old, r.upd = r.setK[:n], r.setV[:n], r.old[:n], r.upd[:n]
	if len(r.seen) < len(desired) {
		var zero V
		for k, want := range desired {
			if _, ok := r.seen[k]; !ok {
				r.setK, r.setV, r.old, r.upd = append(r.setK, k), append(r.setV, want), append(r.old, zero), append(r.upd, false)
			}
		}
	}
	return nil
}

// collect is the dump callback. An entry of a key not desired is to
// delete. The first entry of a desired key stays (replaced if it differs),
// unless a later one is the desired entry: then that one stays; the others
// are to delete.
func (r *Reconciler[K, V]) collect(k K, v V) {
	want, ok := r.desired[k]
	if !ok {
		r.delK, r.delV = append(r.delK, k), append(r.delV, v)
		return
	}
	i, dup := r.seen[k]
	switch {
	case !dup && r.equal(want, v):
		r.seen[k] = -1
	case !dup:
		r.seen[k] = int32(len(r.setK))
		r.setK, r.setV, r.old, r.upd = append(r.setK, k), append(r.setV, want), append(r.old, v), append(r.upd, true)
	case i >= 0 && r.equal(want, v):
		// The entry kept so far was to be replaced; this one is desired.
		r.seen[k] = -1
		r.delK, r.delV = append(r.delK, k), append(r.delV, r.old[i])
	default:
		r.delK, r.delV = append(r.delK, k), append(r.delV, v)
	}
}

// Replacing calls fn for each set Plan found that replaces a dumped entry:
// its key, the desired value and the entry as dumped. It is valid from
// Plan until Remove returns (a Table's Set may use it).
func (r *Reconciler[K, V]) Replacing(fn func(k K, want, have V)) {
	for i, u := range r.upd {
		if u {
			fn(r.setK[i], r.setV[i], r.old[i])
		}
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
		case r.upd[i]:
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

// trim drops what the call no longer needs: the caller's desired set and,
// after a burst, the big buffers.
func (r *Reconciler[K, V]) trim() {
	r.desired = nil
	clear(r.setV) // references to desired and dumped values
	clear(r.old)
	clear(r.delV)
	if cap(r.setV)+cap(r.delV) > keepChanges {
		r.setK, r.setV, r.old, r.upd, r.delK, r.delV, r.errs = nil, nil, nil, nil, nil, nil, nil
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
