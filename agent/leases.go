package agent

import (
	"net/netip"
	"slices"

	"github.com/flanneld-go/flanneld/subnet"
)

// leaseSet is the cluster's leases by subnet, kept as a slice (handed to
// the backend's Apply as is, without a copy per Apply) and an index into
// it. With 10,000 leases that is about 2 MB of leases and 0.4 MB of index,
// where a map of leases plus a slice built for each Apply took 5.
type leaseSet struct {
	at   map[subnet.PrefixKey]int32
	list []subnet.Lease
}

func newLeaseSet() *leaseSet { return &leaseSet{at: map[subnet.PrefixKey]int32{}} }

func (s *leaseSet) len() int { return len(s.list) }

// reserve makes room for n more leases at once, so that a big first batch
// does not leave the slice up to twice as large as it needs.
func (s *leaseSet) reserve(n int) { s.list = slices.Grow(s.list, n) }

// put adds or replaces the lease of l.Key().
func (s *leaseSet) put(l subnet.Lease) {
	k := subnet.KeyOf(l.Key())
	if i, ok := s.at[k]; ok {
		s.list[i] = l
		return
	}
	s.at[k] = int32(len(s.list))
	s.list = append(s.list, l)
}

// has reports whether the set holds a lease of p.
func (s *leaseSet) has(p netip.Prefix) bool {
	_, ok := s.at[subnet.KeyOf(p)]
	return ok
}

// get returns the lease of p, if any.
func (s *leaseSet) get(p netip.Prefix) (subnet.Lease, bool) {
	i, ok := s.at[subnet.KeyOf(p)]
	if !ok {
		return subnet.Lease{}, false
	}
	return s.list[i], true
}

// remove drops the lease of p, if any.
func (s *leaseSet) remove(p netip.Prefix) {
	k := subnet.KeyOf(p)
	i, ok := s.at[k]
	if !ok {
		return
	}
	last := len(s.list) - 1
	s.swap(int(i), last)
	s.list[last] = subnet.Lease{} // drop its BackendData
	s.list = s.list[:last]
	delete(s.at, k)
}

// except returns every lease but the one of p. The result is a view of the
// set, valid until its next change; its order is arbitrary.
func (s *leaseSet) except(p netip.Prefix) []subnet.Lease {
	i, ok := s.at[subnet.KeyOf(p)]
	if !ok {
		return s.list
	}
	last := len(s.list) - 1
	s.swap(int(i), last)
	return s.list[:last]
}

func (s *leaseSet) swap(i, j int) {
	if i == j {
		return
	}
	s.list[i], s.list[j] = s.list[j], s.list[i]
	s.at[subnet.KeyOf(s.list[i].Key())], s.at[subnet.KeyOf(s.list[j].Key())] = int32(i), int32(j)
}
