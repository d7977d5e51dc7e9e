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

// Summarize returns the summary of a lease value.
func Summarize(a LeaseAttrs) LeaseSummary {
	h := fnv.New64a()
	h.Write([]byte(a.BackendType))
	h.Write([]byte{0})
	h.Write(a.BackendData)
	return LeaseSummary{publicIP: a.PublicIP.As4(), sum: h.Sum64()}
}

// Removed is the event for the removal of the lease of p: its subnet and
// the PublicIP it had.
func (k LeaseSummary) Removed(p netip.Prefix) Event {
	return Event{Type: EventRemoved, Lease: Lease{Subnet: p, Attrs: LeaseAttrs{PublicIP: netip.AddrFrom4(k.publicIP)}}}
}

// DiffLeases returns the events that turn before into current: Added for a
// new or changed lease, Removed (with the PublicIP it had) for a lease no
// longer in current; adds first, each kind in subnet order.
func DiffLeases(before map[netip.Prefix]LeaseSummary, current map[netip.Prefix]Lease) []Event {
	var added, removed []Event
	for p, l := range current {
		if old, ok := before[p]; !ok || old != Summarize(l.Attrs) {
			added = append(added, Event{Type: EventAdded, Lease: l})
		}
	}
	for p, k := range before {
		if _, ok := current[p]; !ok {
			removed = append(removed, k.Removed(p))
		}
	}
	bySubnet := func(evs []Event) {
		sort.Slice(evs, func(i, j int) bool { return evs[i].Lease.Subnet.Addr().Less(evs[j].Lease.Subnet.Addr()) })
	}
	bySubnet(added)
	bySubnet(removed)
	return append(added, removed...)
}
