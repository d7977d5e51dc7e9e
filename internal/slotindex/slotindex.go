// Package slotindex finds records in a slice by key: an open-addressing
// hash table (linear probing, kept between 3/8 and 3/4 full) of slot
// numbers, 4 bytes an entry without pointers. A table of 10,000 records
// takes 64 KB, where a Go map from the key to the slot takes 400 to 800 KB.
//
// The records stay in the caller's slice; the index asks the caller for
// the key of a slot (KeyAt) when it must compare or move one.
package slotindex

import "hash/maphash"

// Index maps keys to slot numbers of a caller's slice. The zero Index is
// not usable; make one with New. It is not safe for concurrent use.
type Index[K comparable] struct {
	slots []int32 // slot+1; 0 is empty; len is 0 or a power of two
	n     int     // keys held
	seed  maphash.Seed
	keyAt func(slot int32) K
}

// New returns an empty index; keyAt returns the key of the record in a
// slot the index holds.
func New[K comparable](keyAt func(slot int32) K) *Index[K] {
	return &Index[K]{seed: maphash.MakeSeed(), keyAt: keyAt}
}

// Len is the number of keys held.
func (x *Index[K]) Len() int { return x.n }

func (x *Index[K]) home(k K) int { return int(maphash.Comparable(x.seed, k)) & (len(x.slots) - 1) }

// Lookup returns the slot of k, or -1.
func (x *Index[K]) Lookup(k K) int32 {
	if x.n == 0 {
		return -1
	}
	mask := len(x.slots) - 1
	for j := x.home(k); ; j = (j + 1) & mask {
		e := x.slots[j]
		if e == 0 {
			return -1
		}
		if x.keyAt(e-1) == k {
			return e - 1
		}
	}
}

// Insert records that k, which the index does not hold, is in slot.
func (x *Index[K]) Insert(k K, slot int32) {
	if 4*(x.n+1) > 3*len(x.slots) {
		x.rehash(x.n + 1)
	}
	x.place(k, slot)
	x.n++
}

func (x *Index[K]) place(k K, slot int32) {
	mask := len(x.slots) - 1
	j := x.home(k)
	for x.slots[j] != 0 {
		j = (j + 1) & mask
	}
	x.slots[j] = slot + 1
}

// find returns the position in the table of k, held in slot.
func (x *Index[K]) find(k K, slot int32) int {
	mask := len(x.slots) - 1
	j := x.home(k)
	for x.slots[j] != slot+1 {
		j = (j + 1) & mask
	}
	return j
}

// Move records that k, held in slot from, is now in slot to.
func (x *Index[K]) Move(k K, from, to int32) { x.slots[x.find(k, from)] = to + 1 }

// Swap records that ki, held in slot i, and kj, held in slot j, swapped
// slots.
func (x *Index[K]) Swap(ki K, i int32, kj K, j int32) {
	pi, pj := x.find(ki, i), x.find(kj, j)
	x.slots[pi], x.slots[pj] = j+1, i+1
}

// Remove takes the record of k, held in slot i, out of recs and the
// index: the last record moves into slot i (the zero R takes its place)
// and the shorter slice is returned.
func Remove[K comparable, R any](x *Index[K], recs []R, k K, i int32) []R {
	last := int32(len(recs) - 1)
	x.Delete(k, i)
	if i != last {
		x.Move(x.keyAt(last), last, i)
		recs[i] = recs[last]
	}
	var zero R
	recs[last] = zero
	return recs[:last]
}

// Delete forgets k, held in slot; every other slot the index holds must
// still hold its key. An index less than 3/16 full shrinks.
func (x *Index[K]) Delete(k K, slot int32) {
	mask := len(x.slots) - 1
	j := x.find(k, slot)
	// Backward-shift deletion: move up each entry after the hole that
	// would no longer be found past it.
	x.slots[j] = 0
	for i := (j + 1) & mask; x.slots[i] != 0; i = (i + 1) & mask {
		h := x.home(x.keyAt(x.slots[i] - 1))
		if (i > j && (h <= j || h > i)) || (i < j && h <= j && h > i) {
			x.slots[j], x.slots[i] = x.slots[i], 0
			j = i
		}
	}
	x.n--
	if len(x.slots) > 16 && 16*x.n < 3*len(x.slots) {
		x.rehash(x.n)
	}
}

// Reset makes the index hold slots 0..n-1 of the caller's slice, whose
// keys are distinct.
func (x *Index[K]) Reset(n int) {
	x.slots, x.n = nil, 0
	if n == 0 {
		return
	}
	x.slots = make([]int32, sizeFor(n))
	for i := range int32(n) {
		x.place(x.keyAt(i), i)
	}
	x.n = n
}

// rehash moves the keys held to a table sized for n.
func (x *Index[K]) rehash(n int) {
	old := x.slots
	x.slots = make([]int32, sizeFor(n))
	for _, e := range old {
		if e != 0 {
			x.place(x.keyAt(e-1), e-1)
		}
	}
}

// sizeFor is the table size for n keys: a power of two, at least 8, at
// most 3/4 full.
func sizeFor(n int) int {
	size := 8
	for 3*size < 4*n {
		size *= 2
	}
	return size
}
