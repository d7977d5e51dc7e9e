package probe

import (
	"net/netip"
	"slices"

	"github.com/flanneld-go/flanneld/internal/slotindex"
	"github.com/flanneld-go/flanneld/subnet"
)

// table is the prober's peers: their records in one slice, indexed by
// subnet with a slotindex (4 to 11 bytes a peer, where a map from
// netip.Prefix to *peer took about 60 plus an allocation per peer). A
// removed peer's slot is reused once nothing refers to it (the scheduler's
// priority queue, a probe out).
type table struct {
	peers []peer
	index *slotindex.Index[subnet.PrefixKey]
	free  []int32 // slots to reuse
	live  int     // peers not gone
	// overlay is the path's Overlay: peers are probed at their subnet's
	// first address, else at their public one.
	overlay bool
}

func newTable() *table {
	t := &table{}
	t.index = slotindex.New(func(i int32) subnet.PrefixKey { return t.peers[i].key })
	return t
}

// lookup returns the slot of k's peer, or -1.
func (t *table) lookup(k subnet.PrefixKey) int32 { return t.index.Lookup(k) }

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
	t.index.Insert(p.key, i)
	return i
}

// remove takes slot i's peer out of the index and marks it gone; its slot
// is reused once released.
func (t *table) remove(i int32) {
	p := &t.peers[i]
	if p.has(gone) {
		return
	}
	t.index.Delete(p.key, i)
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
// trailing free slots (the index shrinks itself).
func (t *table) shrink() {
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
func (t *table) subnet(i int32) netip.Prefix { return t.peers[i].key.Prefix() }

func (t *table) public(i int32) netip.Addr {
	return unpackAddr(t.peers[i].public, t.peers[i].pubFam)
}

func (t *table) target(i int32) netip.Addr { return t.targetAlong(i, t.overlay) }

// targetAlong is slot i's target along an overlay path or another one.
func (t *table) targetAlong(i int32, overlay bool) netip.Addr {
	if p := &t.peers[i]; overlay {
		return p.key.Prefix().Addr()
	}
	return t.public(i)
}

// setPublic sets slot i's public address.
func (t *table) setPublic(i int32, public netip.Addr) {
	p := &t.peers[i]
	p.public, p.pubFam = packAddr(public)
}
