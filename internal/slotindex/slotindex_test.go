package slotindex

import (
	"math/rand/v2"
	"testing"
)

// recs is a slice of keys kept the way the index's users keep records:
// appended, removed by moving the last one into the hole.
type recs struct {
	keys []uint32
	x    *Index[uint32]
}

func newRecs() *recs {
	r := &recs{}
	r.x = New(func(i int32) uint32 { return r.keys[i] })
	return r
}

func (r *recs) add(k uint32) {
	r.keys = append(r.keys, k)
	r.x.Insert(k, int32(len(r.keys)-1))
}

func (r *recs) remove(k uint32) { r.keys = Remove(r.x, r.keys, k, r.x.Lookup(k)) }

// TestIndex applies random adds and removes, with keys that collide in
// the table, and checks every lookup against a map after each step.
func TestIndex(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	r := newRecs()
	want := map[uint32]bool{}
	check := func(step int) {
		t.Helper()
		if r.x.Len() != len(want) {
			t.Fatalf("step %d: Len %d, want %d", step, r.x.Len(), len(want))
		}
		for k := range uint32(600) {
			i := r.x.Lookup(k)
			switch {
			case want[k] && (i < 0 || r.keys[i] != k):
				t.Fatalf("step %d: Lookup(%d) = %d, not its slot", step, k, i)
			case !want[k] && i != -1:
				t.Fatalf("step %d: Lookup(%d) = %d for a key not held", step, k, i)
			}
		}
	}
	for step := range 20000 {
		k := uint32(rng.IntN(600))
		// Grow to 500 keys, shrink to a few, grow again.
		adding := (step/4000)%2 == 0
		switch {
		case want[k] && (!adding || rng.IntN(4) == 0):
			r.remove(k)
			delete(want, k)
		case !want[k] && (adding || rng.IntN(4) == 0):
			r.add(k)
			want[k] = true
		}
		if len(r.keys) > 1 && rng.IntN(8) == 0 { // swap two records
			i, j := int32(rng.IntN(len(r.keys))), int32(rng.IntN(len(r.keys)))
			if i != j {
				r.x.Swap(r.keys[i], i, r.keys[j], j)
				r.keys[i], r.keys[j] = r.keys[j], r.keys[i]
			}
		}
		if step%97 == 0 {
			check(step)
		}
	}
	check(-1)
	for k := range want {
		r.remove(k)
	}
	if r.x.Len() != 0 || len(r.x.slots) > 16 {
		t.Errorf("emptied index: Len %d, table of %d", r.x.Len(), len(r.x.slots))
	}
}

func TestReset(t *testing.T) {
	r := newRecs()
	for k := range uint32(1000) {
		r.keys = append(r.keys, k*7)
	}
	r.x.Reset(len(r.keys))
	for i, k := range r.keys {
		if got := r.x.Lookup(k); got != int32(i) {
			t.Fatalf("Lookup(%d) = %d, want %d", k, got, i)
		}
	}
	if got := r.x.Lookup(3); got != -1 {
		t.Errorf("Lookup of a key not held = %d", got)
	}
	if len(r.x.slots) != 2048 {
		t.Errorf("table of %d for 1,000 keys, want 2048", len(r.x.slots))
	}
	r.x.Reset(0)
	if r.x.Len() != 0 || r.x.Lookup(0) != -1 {
		t.Error("Reset(0) left keys")
	}
}
