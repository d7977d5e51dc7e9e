package etcdv2

import (
	"errors"
	"net/netip"
	"path"
	"sort"
	"strconv"
	"strings"
	"time"

	client "go.etcd.io/etcd/client/v2"

	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/subnet"
)

// freeCandidates is how many free subnets, from SubnetMin up, a new lease is
// chosen among at random.
const freeCandidates = 100

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

// takenSet holds the subnets some key claims, valid or not.
type takenSet struct {
	bits  int
	exact map[netip.Prefix]bool
	// other holds claims of another length (stray or hand-written keys);
	// a candidate overlapping one of them is not free.
	other []netip.Prefix
}

func newTakenSet(bits int) *takenSet {
	return &takenSet{bits: bits, exact: map[netip.Prefix]bool{}}
}

func (t *takenSet) add(p netip.Prefix) {
	if p.Bits() == t.bits {
		t.exact[p] = true
		return
	}
	t.other = append(t.other, p)
}

func (t *takenSet) free(p netip.Prefix) bool {
	if t.exact[p] {
		return false
	}
	for _, o := range t.other {
		if o.Overlaps(p) {
			return false
		}
	}
	return true
}

// leaseKeyPrefix parses the name of a key under subnets/ strictly.
func leaseKeyPrefix(name string) (netip.Prefix, bool) {
	p, err := ip.ParseKey(name)
	return p, err == nil
}

// claimedPrefix is the subnet a key name claims, read leniently so that a
// malformed name such as "10.5.3.1-24" or "10.5.3.0-24x" still keeps
// 10.5.3.0/24 from being handed out. ok is false when no subnet can be read from the name at all.
func claimedPrefix(name string) (netip.Prefix, bool) {
	if p, ok := leaseKeyPrefix(name); ok {
		return p, true
	}
	a, b, found := strings.Cut(name, "-")
	if !found {
		return netip.Prefix{}, false
	}
	addr, err := netip.ParseAddr(a)
	if err != nil || !addr.Is4() {
		return netip.Prefix{}, false
	}
	// Leading digits only, as a flannel node's unanchored match reads it.
	digits := len(b) - len(strings.TrimLeft(b, "0123456789"))
	n, err := strconv.Atoi(b[:digits])
	if err != nil || n < 0 || n > 32 {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(addr, n).Masked(), true
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
	taken *takenSet
}

// newAllocation reads a recursive listing of dir (nil for a missing
// directory). Every key that names a subnet claims it, whatever its value.
func newAllocation(cfg *subnet.Config, dir string, root *client.Node) *allocation {
	a := &allocation{dir: dir, taken: newTakenSet(cfg.SubnetLen)}
	a.nodes = flatten(root)
	for _, n := range a.nodes {
		if p, ok := claimedPrefix(path.Base(n.Key)); ok {
			a.taken.add(p)
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

// choose returns prev when it fits cfg and no key claims it, else a subnet
// picked with intn among the first freeCandidates free ones. ok is false
// when the range is full.
func (a *allocation) choose(cfg *subnet.Config, prev netip.Prefix, intn func(int) int) (netip.Prefix, bool) {
	if prev.IsValid() && cfg.InRange(prev) && a.taken.free(prev) {
		return prev, true
	}
	cands := make([]netip.Prefix, 0, freeCandidates)
	cfg.Subnets(func(p netip.Prefix) bool {
		if a.taken.free(p) {
			cands = append(cands, p)
		}
		return len(cands) < freeCandidates
	})
	if len(cands) == 0 {
		return netip.Prefix{}, false
	}
	return cands[intn(len(cands))], true
}
