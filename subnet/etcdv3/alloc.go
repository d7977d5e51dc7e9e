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
	subnet netip.Prefix
	attrs  subnet.LeaseAttrs
	kv     *mvccpb.KeyValue
}

// leaseKeyPrefix parses the name of a key under subnets/ strictly: the
// IPv4 subnet of "10.5.34.0-24", or of a dual-stack name
// "10.5.34.0-24&fc00:0:0:22::-64" (the IPv6 part is not ours to use).
func leaseKeyPrefix(name string) (netip.Prefix, bool) {
	v4, _, _ := strings.Cut(name, "&")
	p, err := ip.ParseKey(v4)
	return p, err == nil
}

// parseKV reads a key under the subnets prefix dir ("<prefix>/subnets/").
// It fails, saying why, for a name that is not a lease key or a value that
// does not parse.
func parseKV(dir string, kv *mvccpb.KeyValue) (entry, error) {
	name, ok := strings.CutPrefix(string(kv.Key), dir)
	if !ok || strings.Contains(name, "/") {
		return entry{}, errors.New("not a lease key: it is below the subnets prefix")
	}
	p, ok := leaseKeyPrefix(name)
	if !ok {
		return entry{}, errors.New("not a lease key: the name is not <A.B.C.D>-<prefix length>, like 10.5.34.0-24")
	}
	attrs, err := subnet.ParseLeaseAttrs(kv.Value)
	if err != nil {
		return entry{}, err
	}
	return entry{subnet: p, attrs: attrs, kv: kv}, nil
}

// allocation is the subnets prefix as AcquireLease sees it.
type allocation struct {
	dir   string
	kvs   []*mvccpb.KeyValue // parsed only when own looks for a lease
	taken *subnet.Taken
}

// newAllocation reads a listing of dir. Every key whose last path element
// names a subnet claims it, whatever its value (flannel's parser finds a
// subnet anywhere in the key).
func newAllocation(cfg *subnet.Config, dir string, kvs []*mvccpb.KeyValue) *allocation {
	a := &allocation{dir: dir, kvs: kvs, taken: subnet.NewTaken(cfg.SubnetLen)}
	for _, kv := range kvs {
		name := string(kv.Key)
		if p, ok := subnet.ClaimedPrefix(name[strings.LastIndexByte(name, '/')+1:]); ok {
			a.taken.Add(p)
		}
	}
	return a
}

// own returns the lease of publicIP that fits cfg, under the plain IPv4 key
// name (the one RenewLease renews). Only values that can hold publicIP are
// parsed: those with its text, or with a JSON escape.
func (a *allocation) own(cfg *subnet.Config, publicIP netip.Addr) (entry, bool) {
	ipText := []byte(publicIP.String())
	for _, kv := range a.kvs {
		if !bytes.Contains(kv.Value, ipText) && !bytes.Contains(kv.Value, []byte(`\`)) {
			continue
		}
		e, err := parseKV(a.dir, kv)
		if err == nil && e.attrs.PublicIP == publicIP && cfg.InRange(e.subnet) && string(kv.Key) == a.dir+ip.Key(e.subnet) {
			return e, true
		}
	}
	return entry{}, false
}
