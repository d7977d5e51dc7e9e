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
	subnet netip.Prefix
	attrs  subnet.LeaseAttrs
	node   *client.Node
}

// expiration is the lease expiry of the key; zero for a key without TTL.
func (e entry) expiration() time.Time {
	if e.node == nil || e.node.Expiration == nil {
		return time.Time{}
	}
	return *e.node.Expiration
}

// leaseKeyPrefix parses the name of a key under subnets/ strictly.
func leaseKeyPrefix(name string) (netip.Prefix, bool) {
	p, err := ip.ParseKey(name)
	return p, err == nil
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
	p, ok := leaseKeyPrefix(path.Base(n.Key))
	if !ok {
		return entry{}, errors.New("not a lease key: the name is not <A.B.C.D>-<prefix length>, like 10.5.34.0-24")
	}
	attrs, err := subnet.ParseLeaseAttrs([]byte(n.Value))
	if err != nil {
		return entry{}, err
	}
	return entry{subnet: p, attrs: attrs, node: n}, nil
}

// allocation is the subnets directory as AcquireLease sees it.
type allocation struct {
	dir   string
	nodes []*client.Node // the keys, parsed only when own looks for a lease
	taken *subnet.Taken
}

// newAllocation reads a recursive listing of dir (nil for a missing
// directory). Every key that names a subnet claims it, whatever its value.
func newAllocation(cfg *subnet.Config, dir string, root *client.Node) *allocation {
	a := &allocation{dir: dir, taken: subnet.NewTaken(cfg.SubnetLen)}
	a.nodes = flatten(root)
	for _, n := range a.nodes {
		if p, ok := subnet.ClaimedPrefix(path.Base(n.Key)); ok {
			a.taken.Add(p)
		}
	}
	return a
}

// own returns the lease of publicIP that fits cfg. Only values that can
// hold publicIP are parsed: those with its text, or with a JSON escape
// (which could spell it); with thousands of leases in etcd, that is most
// of the cost of acquiring one.
func (a *allocation) own(cfg *subnet.Config, publicIP netip.Addr) (entry, bool) {
	ipText := publicIP.String()
	for _, n := range a.nodes {
		if !strings.Contains(n.Value, ipText) && !strings.Contains(n.Value, `\`) {
			continue
		}
		e, err := parseNode(a.dir, n)
		if err == nil && e.attrs.PublicIP == publicIP && cfg.InRange(e.subnet) {
			return e, true
		}
	}
	return entry{}, false
}

// choose is subnet.ChooseSubnet on the listing.
func (a *allocation) choose(cfg *subnet.Config, prev netip.Prefix, intn func(int) int) (netip.Prefix, bool) {
	return subnet.ChooseSubnet(cfg, a.taken, prev, intn)
}
