package etcdv2

import (
	"errors"
	"net/netip"
	"path"
	"sort"
	"strings"
	"time"

	client "go.etcd.io/etcd/client/v2"

	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/subnet"
)

// entry is one lease key whose name and value both parse.
type entry struct {
	subnet  netip.Prefix // invalid for an IPv6-only key
	subnet6 netip.Prefix // invalid without IPv6
	attrs   subnet.LeaseAttrs
	node    *client.Node
}

// lease is the lease of the key.
func (e entry) lease() subnet.Lease {
	return subnet.Lease{Subnet: e.subnet, IPv6Subnet: e.subnet6, Attrs: e.attrs, Expiration: e.expiration()}
}

// expiration is the lease expiry of the key; zero for a key without TTL.
func (e entry) expiration() time.Time {
	if e.node == nil || e.node.Expiration == nil {
		return time.Time{}
	}
	return *e.node.Expiration
}

// leaseKeyPrefix parses the name of a key under subnets/ strictly and
// returns what identifies its lease (subnet.Lease.Key): the IPv4 subnet,
// or the IPv6 one of an IPv6-only key.
func leaseKeyPrefix(name string) (netip.Prefix, bool) {
	v4, v6, err := ip.ParseLeaseKey(name)
	if err != nil {
		return netip.Prefix{}, false
	}
	l := subnet.Lease{Subnet: v4, IPv6Subnet: v6}
	return l.Key(), true
}

// flatten returns the value keys below dir (a recursive listing), sorted by
// key.
func flatten(dir *client.Node) []*client.Node {
	var out []*client.Node
	var walk func(n *client.Node)
	walk = func(n *client.Node) {
		for _, c := range n.Nodes {
			if c.Dir {
				walk(c)
				continue
			}
			out = append(out, c)
		}
	}
	if dir != nil {
		walk(dir)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out
}

// parseNode reads a key directly under the subnets directory dir. It fails,
// saying why, for a key elsewhere, a name that is not a lease key, or a
// value that does not parse.
func parseNode(dir string, n *client.Node) (entry, error) {
	if path.Dir(n.Key) != dir {
		return entry{}, errors.New("not a lease key: it is in a subdirectory")
	}
	v4, v6, err := ip.ParseLeaseKey(path.Base(n.Key))
	if err != nil {
		return entry{}, errors.New("not a lease key: the name is not <A.B.C.D>-<prefix length>, like 10.5.34.0-24 (or 10.5.34.0-24&fc00:0:0:22::-64)")
	}
	attrs, err := subnet.ParseLeaseAttrs([]byte(n.Value))
	if err != nil {
		return entry{}, err
	}
	return entry{subnet: v4, subnet6: v6, attrs: attrs, node: n}, nil
}

// allocation is the subnets directory as AcquireLease sees it.
type allocation struct {
	dir   string
	nodes []*client.Node // the keys, parsed only when own looks for a lease
	taken *subnet.Taken  // IPv4 subnets claimed
	// taken6 holds the IPv6 subnets claimed (nil without IPv6).
	taken6 *subnet.Taken
	// dual is true when a key has a dual-stack name.
	dual bool
}

// newAllocation reads a recursive listing of dir (nil for a missing
// directory). Every key that names a subnet claims it, whatever its value.
func newAllocation(cfg *subnet.Config, dir string, root *client.Node) *allocation {
	a := &allocation{dir: dir, taken: subnet.NewTaken(cfg.SubnetLen)}
	if cfg.EnableIPv6 {
		a.taken6 = subnet.NewTaken(cfg.IPv6SubnetLen)
	}
	a.nodes = flatten(root)
	for _, n := range a.nodes {
		v4, v6 := subnet.ClaimedPrefixes(path.Base(n.Key))
		a.dual = a.dual || strings.Contains(n.Key, "&")
		if v4.IsValid() {
			a.taken.Add(v4)
		}
		if v6.IsValid() && a.taken6 != nil {
			a.taken6.Add(v6)
		}
	}
	return a
}

// own returns the lease of attrs' node that fits cfg: found by PublicIP
// (PublicIPv6 for IPv6 only), with a subnet in range for each family cfg
// enables. Only values that can hold the address are parsed: those with
// its text, or with a JSON escape (which could spell it); with thousands of
// leases in etcd, that is most of the cost of acquiring one.
func (a *allocation) own(cfg *subnet.Config, attrs subnet.LeaseAttrs) (entry, bool) {
	ipText := attrs.PublicIP.String()
	if !cfg.EnableIPv4 {
		ipText = attrs.PublicIPv6.String()
	}
	for _, n := range a.nodes {
		if !strings.Contains(n.Value, ipText) && !strings.Contains(n.Value, `\`) {
			continue
		}
		e, err := parseNode(a.dir, n)
		if err == nil && subnet.OwnLease(cfg, attrs, e.lease()) {
			return e, true
		}
	}
	return entry{}, false
}

// choose is subnet.ChooseLease on the listing.
func (a *allocation) choose(cfg *subnet.Config, prev subnet.Lease, intn func(int) int) (subnet.Lease, bool) {
	return subnet.ChooseLease(cfg, a.taken, a.taken6, prev, intn)
}
