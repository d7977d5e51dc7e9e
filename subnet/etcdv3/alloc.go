package etcdv3

import (
	"bytes"
	"errors"
	"net/netip"
	"strings"

	"go.etcd.io/etcd/api/v3/mvccpb"

	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/subnet"
)

// entry is one lease key whose name and value both parse.
type entry struct {
	subnet  netip.Prefix // invalid for an IPv6-only key
	subnet6 netip.Prefix // invalid without IPv6
	attrs   subnet.LeaseAttrs
	kv      *mvccpb.KeyValue
}

// lease is the lease of the key (without its expiry).
func (e entry) lease() subnet.Lease {
	return subnet.Lease{Subnet: e.subnet, IPv6Subnet: e.subnet6, Attrs: e.attrs}
}

// leaseKeyPrefix parses the name of a key under subnets/ strictly
// ("10.5.34.0-24", "10.5.34.0-24&fc00:0:0:22::-64") and returns what
// identifies its lease (subnet.Lease.Key).
func leaseKeyPrefix(name string) (netip.Prefix, bool) {
	v4, v6, err := ip.ParseLeaseKey(name)
	if err != nil {
		return netip.Prefix{}, false
	}
	l := subnet.Lease{Subnet: v4, IPv6Subnet: v6}
	return l.Key(), true
}

// parseKV reads a key under the subnets prefix dir ("<prefix>/subnets/").
// It fails, saying why, for a name that is not a lease key or a value that
// does not parse.
func parseKV(dir string, kv *mvccpb.KeyValue) (entry, error) {
	name, ok := strings.CutPrefix(string(kv.Key), dir)
	if !ok || strings.Contains(name, "/") {
		return entry{}, errors.New("not a lease key: it is below the subnets prefix")
	}
	v4, v6, err := ip.ParseLeaseKey(name)
	if err != nil {
		return entry{}, errors.New("not a lease key: the name is not <A.B.C.D>-<prefix length>, like 10.5.34.0-24 (or 10.5.34.0-24&fc00:0:0:22::-64)")
	}
	attrs, err := subnet.ParseLeaseAttrs(kv.Value)
	if err != nil {
		return entry{}, err
	}
	return entry{subnet: v4, subnet6: v6, attrs: attrs, kv: kv}, nil
}

// allocation is the subnets prefix as AcquireLease sees it.
type allocation struct {
	dir    string
	kvs    []*mvccpb.KeyValue // parsed only when own looks for a lease
	taken  *subnet.Taken      // IPv4 subnets claimed
	taken6 *subnet.Taken      // IPv6 subnets claimed; nil without IPv6
	dual   bool               // a key has a dual-stack name
}

// newAllocation reads a listing of dir. Every key whose last path element
// names a subnet claims it, whatever its value (flannel's parser finds a
// subnet anywhere in the key).
func newAllocation(cfg *subnet.Config, dir string, kvs []*mvccpb.KeyValue) *allocation {
	a := &allocation{dir: dir, kvs: kvs, taken: subnet.NewTaken(cfg.SubnetLen)}
	if cfg.EnableIPv6 {
		a.taken6 = subnet.NewTaken(cfg.IPv6SubnetLen)
	}
	for _, kv := range kvs {
		name := string(kv.Key)
		name = name[strings.LastIndexByte(name, '/')+1:]
		v4, v6 := subnet.ClaimedPrefixes(name)
		a.dual = a.dual || strings.Contains(name, "&")
		if v4.IsValid() {
			a.taken.Add(v4)
		}
		if v6.IsValid() && a.taken6 != nil {
			a.taken6.Add(v6)
		}
	}
	return a
}

// own returns the lease of attrs' node that fits cfg (subnet.OwnLease),
// under the key name of its subnets (the one RenewLease renews). Only
// values that can hold the address are parsed: those with its text, or
// with a JSON escape.
func (a *allocation) own(cfg *subnet.Config, attrs subnet.LeaseAttrs) (entry, bool) {
	ipText := []byte(attrs.PublicIP.String())
	if !cfg.EnableIPv4 {
		ipText = []byte(attrs.PublicIPv6.String())
	}
	for _, kv := range a.kvs {
		if !bytes.Contains(kv.Value, ipText) && !bytes.Contains(kv.Value, []byte(`\`)) {
			continue
		}
		e, err := parseKV(a.dir, kv)
		if err == nil && subnet.OwnLease(cfg, attrs, e.lease()) && string(kv.Key) == a.dir+ip.LeaseKey(e.subnet, e.subnet6) {
			return e, true
		}
	}
	return entry{}, false
}

// choose is subnet.ChooseLease on the listing.
func (a *allocation) choose(cfg *subnet.Config, prev subnet.Lease, intn func(int) int) (subnet.Lease, bool) {
	return subnet.ChooseLease(cfg, a.taken, a.taken6, prev, intn)
}
