package wireguard

import (
	"encoding/json"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/subnet"
)

func options(cfg *subnet.Config, v4, v6 string, mtu int) backend.Options {
	o := backend.Options{Config: cfg, Logger: klog.Background(),
		Ext: backend.ExternalInterface{Iface: &net.Interface{Name: "eth0", Index: 2, MTU: mtu}, NoIPv6: "interface eth0 has no global IPv6 address"}}
	if v4 != "" {
		o.Ext.IfaceAddr = netip.MustParseAddr(v4)
		o.Ext.PublicIP = o.Ext.IfaceAddr
	}
	if v6 != "" {
		o.Ext.IfaceAddrV6 = netip.MustParseAddr(v6)
		o.Ext.PublicIPv6 = o.Ext.IfaceAddrV6
	}
	return o
}

// The devices per Mode and family, the published lease data and MTU.
func TestSpecsAndPublish(t *testing.T) {
	for _, c := range []struct {
		name    string
		cfg     subnet.Config
		backend string
		devs    string
		data    string
		data6   string
	}{
		{"ipv4", subnet.Config{EnableIPv4: true}, `{"Type":"wireguard"}`, "flannel-wg:v4:51820", `"Port":51820}`, ""},
		{"dual separate", subnet.Config{EnableIPv4: true, EnableIPv6: true}, `{"ListenPort":1000,"ListenPortV6":1001}`, "flannel-wg:v4:1000 flannel-wg-v6:v6:1001", `"Port":1000}`, `"Port":1001}`},
		{"ipv6 only", subnet.Config{EnableIPv6: true}, ``, "flannel-wg-v6:v6:51821", "", `"Port":51821}`},
		{"dual auto", subnet.Config{EnableIPv4: true, EnableIPv6: true}, `{"Mode":"auto"}`, "flannel-wg:v4v6:51820", `"Port":51820}`, `"Port":51820}`},
	} {
		cfg := c.cfg
		cfg.Backend = json.RawMessage(c.backend)
		b, err := New(options(&cfg, "192.168.1.1", "2001:db8::1", 1500))
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		var got []string
		for _, s := range b.specs() {
			f := ""
			if s.v4 {
				f += "v4"
			}
			if s.v6 {
				f += "v6"
			}
			got = append(got, s.name+":"+f+":"+strconv.Itoa(s.port))
		}
		if strings.Join(got, " ") != c.devs {
			t.Errorf("%s: devices %v, want %s", c.name, got, c.devs)
		}
		p := b.publish()
		if p.MTU != 1420 {
			t.Errorf("%s: MTU %d, want 1500 - 80", c.name, p.MTU)
		}
		if !strings.HasSuffix(string(p.BackendData), c.data) || (c.data == "") != (p.BackendData == nil) {
			t.Errorf("%s: BackendData %s, want ...%s", c.name, p.BackendData, c.data)
		}
		if !strings.HasSuffix(string(p.BackendV6Data), c.data6) || (c.data6 == "") != (p.BackendV6Data == nil) {
			t.Errorf("%s: BackendV6Data %s, want ...%s", c.name, p.BackendV6Data, c.data6)
		}
		b.Close()
	}
}

// The MTU key overrides the interface's; a too small one, or IPv6 with a
// device MTU under 1280, is one line; a missing address is one line from
// Init before anything is created.
func TestNewAndInitErrors(t *testing.T) {
	cfg := &subnet.Config{EnableIPv4: true, Backend: json.RawMessage(`{"MTU":9000}`)}
	b, err := New(options(cfg, "192.168.1.1", "", 1500))
	if err != nil || b.mtu != 8920 {
		t.Errorf("MTU key: %v, device MTU %d, want 8920", err, b.mtu)
	}
	b.Close()
	for _, c := range []struct {
		name string
		cfg  subnet.Config
		mtu  int
		want string
	}{
		{"small interface MTU", subnet.Config{EnableIPv4: true}, 600, "the underlay MTU 600 (of eth0, or the MTU key) leaves 520"},
		{"IPv6 needs 1280", subnet.Config{EnableIPv4: true, EnableIPv6: true, Backend: json.RawMessage(`{"MTU":1300}`)}, 1500, "EnableIPv6 needs a device MTU of at least 1280"},
	} {
		cfg := c.cfg
		if _, err := New(options(&cfg, "192.168.1.1", "2001:db8::1", c.mtu)); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
	}
	for _, c := range []struct {
		name     string
		cfg      subnet.Config
		v4, v6   string
		wantLine string
	}{
		{"no IPv4", subnet.Config{EnableIPv4: true}, "", "", "interface eth0 has no IPv4 address"},
		{"no IPv6", subnet.Config{EnableIPv4: true, EnableIPv6: true}, "192.168.1.1", "", "IPv6 peers reach this node at its IPv6 address but interface eth0 has no global IPv6 address"},
		{"ipv6 mode without IPv6", subnet.Config{EnableIPv4: true, Backend: json.RawMessage(`{"Mode":"ipv6"}`)}, "192.168.1.1", "", "no global IPv6 address"},
	} {
		cfg := c.cfg
		b, err := New(options(&cfg, c.v4, c.v6, 1500))
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		b.getenv = func(string) string { return t.TempDir() + "/never-written" }
		_, err = b.Init(t.Context())
		if err == nil || !strings.Contains(err.Error(), c.wantLine) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: Init error %v, want one line with %q", c.name, err, c.wantLine)
		}
		b.Close()
	}
}
