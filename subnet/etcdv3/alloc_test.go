package etcdv3

import (
	"net/netip"
	"testing"

	"go.etcd.io/etcd/api/v3/mvccpb"

	"github.com/flanneld-go/flanneld/subnet"
)

func TestAllocationOwn(t *testing.T) {
	cfg := mustConfig(t, `{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.10.0"}`)
	var kvs []*mvccpb.KeyValue
	for name, v := range map[string]string{
		"10.5.20.0-24":                `{"PublicIP":"192.168.0.1"}`, // ours but out of range
		"10.5.3.0-24":                 `{"PublicIP":"192.168.0.1","BackendType":"vxlan"}`,
		"10.5.4.0-24":                 `{"PublicIP":"192.168.0.2"}`,
		"10.5.5.0-24":                 `{"PublicIP":"192.168.0.3"`,  // broken JSON
		"sub/10.5.6.0-24":             `{"PublicIP":"192.168.0.3"}`, // deeper: not a lease, but it claims
		"10.5.7.0-24extra":            `{"PublicIP":"192.168.0.3"}`,
		"10.5.8.0-24&fc00:0:0:8::-64": `{"PublicIP":"192.168.0.4","PublicIPv6":"fc00::4"}`, // dual stack: reused by its node, IPv6 part kept
		"10.5.9.0-24":                 `{"PublicIP":"192.168.0.\u0039"}`,
	} {
		kvs = append(kvs, &mvccpb.KeyValue{Key: []byte(testDir + name), Value: []byte(v)})
	}
	a := newAllocation(cfg, testDir, kvs)
	if e, ok := a.own(cfg, subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("192.168.0.1")}); !ok || e.subnet != pfx("10.5.3.0/24") || e.attrs.BackendType != "vxlan" {
		t.Errorf("own(192.168.0.1) = %+v, %v; want 10.5.3.0/24", e, ok)
	}
	if e, ok := a.own(cfg, subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("192.168.0.3")}); ok {
		t.Errorf("own(192.168.0.3) = %v; want none", e.subnet)
	}
	if e, ok := a.own(cfg, subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("192.168.0.4")}); !ok || e.subnet != pfx("10.5.8.0/24") || e.subnet6 != pfx("fc00:0:0:8::/64") {
		t.Errorf("own(192.168.0.4) = %+v, %v; want the dual-stack key", e, ok)
	}
	if e, ok := a.own(cfg, subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("192.168.0.9")}); !ok || e.subnet != pfx("10.5.9.0/24") {
		t.Errorf("own(192.168.0.9) = %+v, %v; want 10.5.9.0/24 (its value escapes a digit)", e, ok)
	}
	for _, s := range []string{"10.5.3.0/24", "10.5.4.0/24", "10.5.5.0/24", "10.5.6.0/24", "10.5.7.0/24", "10.5.8.0/24", "10.5.9.0/24"} {
		if a.taken.Free(pfx(s)) {
			t.Errorf("%s is free, want taken", s)
		}
	}
	for _, s := range []string{"10.5.1.0/24", "10.5.10.0/24"} {
		if !a.taken.Free(pfx(s)) {
			t.Errorf("%s is taken, want free", s)
		}
	}
}
