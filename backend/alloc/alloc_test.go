package alloc

import (
	"context"
	"encoding/json"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/subnet"
)

func TestAlloc(t *testing.T) {
	if got := subnet.WireBackendType(Type); got != "" {
		t.Errorf("an alloc lease carries BackendType %q, want none (as flannel's)", got)
	}
	ext := backend.ExternalInterface{Iface: &net.Interface{Name: "eth0", MTU: 1400}, IfaceAddr: netip.MustParseAddr("192.168.9.1"), PublicIP: netip.MustParseAddr("192.168.9.1")}
	cfg := &subnet.Config{Network: netip.MustParsePrefix("10.5.0.0/16"), BackendType: Type, Backend: json.RawMessage(`{"Type":"alloc","Other":1}`)}
	b, err := backend.New(Type, backend.Options{Ext: ext, Config: cfg})
	if err != nil {
		t.Fatal(err)
	}
	pub, err := b.Init(context.Background())
	if err != nil || pub.MTU != 1400 || pub.BackendData != nil || pub.BackendV6Data != nil {
		t.Errorf("Init = %+v, %v; want the interface MTU 1400 and no BackendData", pub, err)
	}
	own := subnet.Lease{Subnet: netip.MustParsePrefix("10.5.1.0/24")}
	if err := b.Apply(context.Background(), own, []subnet.Lease{{Subnet: netip.MustParsePrefix("10.5.2.0/24")}}); err != nil {
		t.Errorf("Apply = %v", err)
	}
	if err := b.Close(); err != nil {
		t.Error(err)
	}

	cfg.Backend = json.RawMessage(`["alloc"]`)
	b, _ = backend.New(Type, backend.Options{Ext: ext, Config: cfg})
	if _, err := b.Init(context.Background()); err == nil || !strings.Contains(err.Error(), "not a JSON object") {
		t.Errorf("Init with a Backend that is not an object = %v", err)
	}
}
