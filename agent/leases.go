package agent

import (
	"net/netip"
	"slices"

	"github.com/flanneld-go/flanneld/internal/slotindex"
	"github.com/flanneld-go/flanneld/subnet"
)

// leaseSet is the cluster's leases by subnet, kept as a slice (handed to
// the backend's Apply as is, without a copy per Apply) and an index into
// it. With 10,000 leases that is about 2 MB of leases and 64 KB of index,
// where a map of leases plus a slice built for each Apply took 5.
type leaseSet struct {
	at   *slotindex.Index[subnet.PrefixKey]
	list []subnet.Lease
}

func newLeaseSet() *leaseSet {
	s := &leaseSet{}
	s.at = slotindex.New(func(i int32) subnet.PrefixKey { return subnet.KeyOf(s.list[i].Key()) })
	return s
}

func (s *leaseSet) len() int { return len(s.list) }

// reserve makes room for n more leases at once, so that a big first batch
// does not leave the slice up to twice as large as it needs.
func (s *leaseSet) reserve(n int) { s.list = slices.Grow(s.list, n) }

// put adds or replaces the lease of l.Key().
func (s *leaseSet) put(l subnet.Lease) {
	k := subnet.KeyOf(l.Key())
	if i := s.at.Lookup(k); i >= 0 {
		s.list[i] = l
		return
	}
	s.list = append(s.list, l)
	s.at.Insert(k, int32(len(s.list)-1))
}

// has reports whether the set holds a lease of p.
func (s *leaseSet) has(p netip.Prefix) bool {
	return s.at.Lookup(subnet.KeyOf(p)) >= 0
}

// get returns the lease of p, if any.
func (s *leaseSet) get(p netip.Prefix) (subnet.Lease, bool) {
	i := s.at.Lookup(subnet.KeyOf(p))
	if i < 0 {
		return subnet.Lease{}, false
	}
	return s.list[i], true
}

// remove drops the lease of p, if any.
func (s *leaseSet) remove(p netip.Prefix) {
	k := subnet.KeyOf(p)
	i := s.at.Lookup(k)
	if i < 0 {
		return
	}
	s.list = slotindex.Remove(s.at, s.list, k, i) // the zero Lease drops its BackendData
}

// except returns every lease but the one of p. The result is a view of the
// set, valid until its next change; its order is arbitrary.
func (s *leaseSet) except(p netip.Prefix) []subnet.Lease {
	k := subnet.KeyOf(p)
	i := s.at.Lookup(k)
	if i < 0 {
		return s.list
	}
	last := int32(len(s.list) - 1)
	if i != last {
		// Swap it with the last lease.
		s.at.Swap(k, i, subnet.KeyOf(s.list[last].Key()), last)
		s.list[i], s.list[last] = s.list[last], s.list[i]
	}
	return s.list[:last]
}
