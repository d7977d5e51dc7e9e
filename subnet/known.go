package subnet

import (
	"hash/fnv"
	"iter"
	"net/netip"
	"slices"
	"sort"

	"github.com/flanneld-go/flanneld/internal/slotindex"
)

// LeaseSummary is what a watcher remembers of a lease it reported: enough to
// tell a renewal (same value) from a change and to report a removal, in 16
// bytes rather than a whole Lease (a tenth of the memory for 10,000 leases).
type LeaseSummary struct {
	publicIP [4]byte
	sum      uint64 // FNV-1a of BackendType and BackendData
}

// Summarize returns the summary of a lease value (and, dual stack, of its
// IPv6 subnet).
func Summarize(a LeaseAttrs) LeaseSummary {
	h := fnv.New64a()
	h.Write([]byte(a.BackendType))
	h.Write([]byte{0})
	h.Write(a.BackendData)
	if a.PublicIPv6.IsValid() || a.BackendV6Data != nil {
		h.Write([]byte{0})
		h.Write([]byte(a.PublicIPv6.String()))
		h.Write([]byte{0})
		h.Write(a.BackendV6Data)
	}
	var pub [4]byte
	if a.PublicIP.Is4() {
		pub = a.PublicIP.As4()
	}
	return LeaseSummary{publicIP: pub, sum: h.Sum64()}
}

// SummarizeLease is Summarize of a lease, its IPv6 subnet included (so a
// lease whose IPv6 part changes is reported again).
func SummarizeLease(l Lease) LeaseSummary {
	s := Summarize(l.Attrs)
	if l.IPv6Subnet.IsValid() && l.Subnet.IsValid() {
		h := fnv.New64a()
		h.Write([]byte(l.IPv6Subnet.String()))
		s.sum ^= h.Sum64()
	}
	return s
}

// Removed is the event for the removal of the lease whose key is p (its
// IPv4 subnet, or the IPv6 subnet of an IPv6-only lease) with the PublicIP
// it had.
func (k LeaseSummary) Removed(p netip.Prefix) Event {
	l := Lease{Attrs: LeaseAttrs{PublicIP: netip.AddrFrom4(k.publicIP)}}
	if p.Addr().Is4() {
		l.Subnet = p
	} else {
		l.IPv6Subnet = p
	}
	return Event{Type: EventRemoved, Lease: l}
}

// Summaries is a set of lease summaries by subnet: 36 bytes a lease in one
// slice and 4 to 11 in its index, where a map took about 77.
type Summaries struct {
	entries []summaryEntry
	at      *slotindex.Index[PrefixKey]
}

type summaryEntry struct {
	key PrefixKey
	sum LeaseSummary
}

// NewSummaries returns an empty set with room for n.
func NewSummaries(n int) *Summaries {
	s := &Summaries{entries: make([]summaryEntry, 0, n)}
	s.at = slotindex.New(func(i int32) PrefixKey { return s.entries[i].key })
	return s
}

// Len is the number of summaries held.
func (s *Summaries) Len() int { return len(s.entries) }

// Get returns the summary of k's lease.
func (s *Summaries) Get(k PrefixKey) (LeaseSummary, bool) {
	if i := s.at.Lookup(k); i >= 0 {
		return s.entries[i].sum, true
	}
	return LeaseSummary{}, false
}

// Set adds or replaces the summary of k's lease.
func (s *Summaries) Set(k PrefixKey, sum LeaseSummary) {
	if i := s.at.Lookup(k); i >= 0 {
		s.entries[i].sum = sum
		return
	}
	s.entries = append(s.entries, summaryEntry{k, sum})
	s.at.Insert(k, int32(len(s.entries)-1))
}

// Delete drops the summary of k's lease, if any.
func (s *Summaries) Delete(k PrefixKey) {
	i := s.at.Lookup(k)
	if i < 0 {
		return
	}
	s.entries = slotindex.Remove(s.at, s.entries, k, i)
	if cap(s.entries) > 64 && cap(s.entries) > 4*len(s.entries) {
		s.entries = slices.Clip(slices.Clone(s.entries))
	}
}

// All yields each key and summary, in no particular order.
func (s *Summaries) All() iter.Seq2[PrefixKey, LeaseSummary] {
	return func(yield func(PrefixKey, LeaseSummary) bool) {
		for _, e := range s.entries {
			if !yield(e.key, e.sum) {
				return
			}
		}
	}
}

// DiffLeases returns the events that turn before into current (leases of
// distinct keys): Added for a new or changed lease, Removed (with the
// PublicIP it had) for a lease no longer in current; adds first, each kind
// in subnet order. It also returns the summaries of current, the next
// before.
func DiffLeases(before *Summaries, current []Lease) ([]Event, *Summaries) {
	after := NewSummaries(len(current))
	var added, removed []Event
	for _, l := range current {
		k, sum := KeyOf(l.Key()), SummarizeLease(l)
		after.Set(k, sum)
		if old, ok := before.Get(k); !ok || old != sum {
			added = append(added, Event{Type: EventAdded, Lease: l})
		}
	}
	for k, sum := range before.All() {
		if _, ok := after.Get(k); !ok {
			removed = append(removed, sum.Removed(k.Prefix()))
		}
	}
	bySubnet := func(evs []Event) {
		sort.Slice(evs, func(i, j int) bool { return evs[i].Lease.Key().Addr().Less(evs[j].Lease.Key().Addr()) })
	}
	bySubnet(added)
	bySubnet(removed)
	return append(added, removed...), after
}
