package backend

import "fmt"

// Changes counts what one reconcile did, for logs and metrics.
type Changes struct {
	// Added is the number of entries installed for a key that had none.
	Added int
	// Updated is the number of entries replaced because their value
	// differed.
	Updated int
	// Removed is the number of stale entries deleted.
	Removed int
	// Failed is the number of changes whose kernel call returned an error.
	Failed int
}

// Any reports whether anything was changed or attempted.
func (c Changes) Any() bool { return c.Added+c.Updated+c.Removed+c.Failed > 0 }

// Diff brings an applied set in line with a desired one, both keyed by K
// (a route's destination, a neighbour's IP, an fdb entry's MAC). It calls set
// for each desired value whose key is missing from applied or whose applied
// value differs, with the desired value (set must add-or-replace, like
// RouteReplace or NeighSet); then, once every set has been tried, it calls del
// with the applied value of each key that is no longer desired (del should treat "not found" as
// success). Adding before deleting keeps traffic flowing while a value moves.
//
// A failing call does not stop the others: Diff counts it in Failed and
// returns the first error, noting how many more failed. It reads the maps
// only, so the caller may clear and reuse them between calls; the work is
// O(len(desired)+len(applied)) and allocates nothing itself.
func Diff[K, V comparable](desired, applied map[K]V, set, del func(K, V) error) (Changes, error) {
	c, first := diff(desired, applied, set, del)
	return c, failedErr(first, c.Failed)
}

// diff is Diff returning the first error as is.
func diff[K, V comparable](desired, applied map[K]V, set, del func(K, V) error) (Changes, error) {
	var c Changes
	var first error
	fail := func(err error) {
		c.Failed++
		if first == nil {
			first = err
		}
	}
	for k, want := range desired {
		have, ok := applied[k]
		if ok && have == want {
			continue
		}
		if err := set(k, want); err != nil {
			fail(err)
			continue
		}
		if ok {
			c.Updated++
		} else {
			c.Added++
		}
	}
	for k, have := range applied {
		if _, ok := desired[k]; ok {
			continue
		}
		if err := del(k, have); err != nil {
			fail(err)
			continue
		}
		c.Removed++
	}
	return c, first
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
