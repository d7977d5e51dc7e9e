package probe

import (
	"hash/maphash"
	"net/netip"
	"slices"
)

// table is the prober's peers: their records in one slice, indexed by
// subnet with an open-addressing hash table of slot numbers (linear
// probing, 3/8 to 3/4 full), which takes 5 to 11 bytes a peer where a map
// from netip.Prefix to *peer took about 60 plus an allocation per peer.
// A removed peer's slot is reused once nothing refers to it (the
// scheduler's priority queue, a probe out).
type table struct {
	peers []peer
	index []int32 // slot+1; 0 is empty; len is 0 or a power of two
	free  []int32 // slots to reuse
	live  int     // peers not gone
	seed  maphash.Seed
	// overlay is the path's Overlay: peers are probed at their subnet's
	// first address, else at their public one.
	overlay bool
}

func newTable() *table { return &table{seed: maphash.MakeSeed()} }

func (t *table) hash(k key) int { return int(maphash.Comparable(t.seed, k)) & (len(t.index) - 1) }

// lookup returns the slot of k's peer, or -1.
func (t *table) lookup(k key) int32 {
	if len(t.index) == 0 {
		return -1
	}
	mask := len(t.index) - 1
	for j := t.hash(k); ; j = (j + 1) & mask {
		e := t.index[j]
		if e == 0 {
			return -1
		}
		if t.peers[e-1].key == k {
			return e - 1
		}
	}
}

// add stores a new peer (whose key the table does not hold) and returns
// its slot.
func (t *table) add(p peer) int32 {
	var i int32
	if n := len(t.free); n > 0 {
		i = t.free[n-1]
		t.free = t.free[:n-1]
		if len(t.free) == 0 {
			t.free = nil
		}
		t.peers[i] = p
	} else {
		i = int32(len(t.peers))
		t.peers = append(t.peers, p)
	}
	t.live++
	if 4*t.live > 3*len(t.index) {
		t.rehash(t.live)
	} else {
		t.place(i)
	}
	return i
}

// place puts slot i in the index.
func (t *table) place(i int32) {
	mask := len(t.index) - 1
	j := t.hash(t.peers[i].key)
	for t.index[j] != 0 {
		j = (j + 1) & mask
	}
	t.index[j] = i + 1
}

// rehash rebuilds the index for n peers.
func (t *table) rehash(n int) {
	size := 8
	for 3*size < 4*n {
		size *= 2
	}
	if size != len(t.index) {
		t.index = make([]int32, size)
	} else {
		clear(t.index)
	}
	for i := range t.peers {
		if !t.peers[i].has(gone) {
			t.place(int32(i))
		}
	}
}

// remove takes slot i's peer out of the index and marks it gone; its slot
// is reused once released.
func (t *table) remove(i int32) {
	p := &t.peers[i]
	if p.has(gone) {
		return
	}
	mask := len(t.index) - 1
	j := t.hash(p.key)
	for t.index[j] != i+1 {
		j = (j + 1) & mask
	}
	// Backward-shift deletion: move up every entry after the hole that
	// would no longer be found past it.
	t.index[j] = 0
	for k := (j + 1) & mask; t.index[k] != 0; k = (k + 1) & mask {
		home := t.hash(t.peers[t.index[k]-1].key)
		if (k > j && (home <= j || home > k)) || (k < j && home <= j && home > k) {
			t.index[j], t.index[k] = t.index[k], 0
			j = k
		}
	}
	p.set(gone, true)
	t.live--
	t.release(i)
}

// release frees slot i if its peer is gone and nothing refers to it.
func (t *table) release(i int32) {
	if p := &t.peers[i]; p.has(gone) && !p.has(queued) && !p.has(inflight) && !p.free {
		p.free = true
		t.free = append(t.free, i)
	}
}

// shrink gives back the memory of a table that lost most of its peers:
// an index four times larger than it needs; trailing free slots.
func (t *table) shrink() {
	if len(t.index) > 16 && 3*len(t.index) > 16*t.live {
		t.rehash(t.live)
	}
	n := len(t.peers)
	for n > 0 && t.peers[n-1].free {
		n--
	}
	if n == len(t.peers) {
		return
	}
	t.peers = t.peers[:n]
	t.free = slices.DeleteFunc(t.free, func(i int32) bool { return int(i) >= n })
	if len(t.free) == 0 {
		t.free = nil
	}
	if cap(t.peers) > 4*n {
		t.peers = slices.Clone(t.peers)
	}
}

// subnet, public and target are slot i's addresses.
func (t *table) subnet(i int32) netip.Prefix { return t.peers[i].key.prefix() }

func (t *table) public(i int32) netip.Addr {
	return unpackAddr(t.peers[i].public, t.peers[i].pubFam)
}

func (t *table) target(i int32) netip.Addr { return t.targetAlong(i, t.overlay) }

// targetAlong is slot i's target along an overlay path or another one.
func (t *table) targetAlong(i int32, overlay bool) netip.Addr {
	if p := &t.peers[i]; overlay {
		return unpackAddr(p.key.addr, p.key.fam)
	}
	return t.public(i)
}

// setPublic sets slot i's public address.
func (t *table) setPublic(i int32, public netip.Addr) {
	p := &t.peers[i]
	p.public, p.pubFam = packAddr(public)
}
