package subnet

import (
	"hash/fnv"
	"net/netip"
	"sort"
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

// DiffLeases returns the events that turn before into current (leases of
// distinct keys): Added for a new or changed lease, Removed (with the
// PublicIP it had) for a lease no longer in current; adds first, each kind
// in subnet order. It also returns the summaries of current, the next
// before.
func DiffLeases(before map[PrefixKey]LeaseSummary, current []Lease) ([]Event, map[PrefixKey]LeaseSummary) {
	after := make(map[PrefixKey]LeaseSummary, len(current))
	var added, removed []Event
	for _, l := range current {
		k, sum := KeyOf(l.Key()), SummarizeLease(l)
		after[k] = sum
		if old, ok := before[k]; !ok || old != sum {
			added = append(added, Event{Type: EventAdded, Lease: l})
		}
	}
	for k, sum := range before {
		if _, ok := after[k]; !ok {
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
