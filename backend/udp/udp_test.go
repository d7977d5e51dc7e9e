package udp

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/subnet"
)

func TestNewRejectsBadOptions(t *testing.T) {
	cfg, err := subnet.ParseConfig([]byte(`{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}`))
	if err != nil {
		t.Fatal(err)
	}
	badPort, err := subnet.ParseConfig([]byte(`{"Network":"10.5.0.0/16","Backend":{"Type":"udp","Port":0}}`))
	if err != nil {
		t.Fatal(err)
	}
	eth := &net.Interface{Name: "eth0", MTU: 1500}
	addr := netip.MustParseAddr("192.0.2.1")
	ok := backend.Options{Ext: backend.ExternalInterface{Iface: eth, IfaceAddr: addr, PublicIP: addr}, Config: cfg, Logger: klog.Background()}
	if _, err := New(ok); err != nil {
		t.Fatalf("New with good options: %v", err)
	}
	for _, tc := range []struct {
		name    string
		mutate  func(*backend.Options)
		mention string
	}{
		{"no config", func(o *backend.Options) { o.Config = nil }, "no network config"},
		{"bad port", func(o *backend.Options) { o.Config = badPort }, "Backend.Port 0 is out of range"},
		{"no address", func(o *backend.Options) { o.Ext.IfaceAddr = netip.Addr{} }, "IPv4 address of the external interface"},
		{"ipv6 address", func(o *backend.Options) { o.Ext.IfaceAddr = netip.MustParseAddr("2001:db8::1") }, "IPv4 address of the external interface"},
		{"no interface", func(o *backend.Options) { o.Ext.Iface = nil }, "needs the external interface"},
		{"tiny mtu", func(o *backend.Options) { o.Ext.Iface = &net.Interface{Name: "eth0", MTU: 500} }, "has MTU 500"},
	} {
		o := ok
		tc.mutate(&o)
		_, err := New(o)
		if err == nil || !strings.Contains(err.Error(), tc.mention) {
			t.Errorf("%s: New = %v, want an error mentioning %q", tc.name, err, tc.mention)
		}
	}
	// Through the registry, as main builds it.
	if _, err := backend.New(TypeName, ok); err != nil {
		t.Fatalf("backend.New(udp): %v", err)
	}
	o := ok
	o.Config = badPort
	if _, err := backend.New(TypeName, o); !errors.Is(err, ErrInvalidConfig) {
		t.Fatalf("backend.New(udp) with Port 0 = %v, want ErrInvalidConfig", err)
	}
}

func TestApplyBeforeInitAndAfterClose(t *testing.T) {
	cfg, _ := subnet.ParseConfig([]byte(`{"Network":"10.5.0.0/16"}`))
	addr := netip.MustParseAddr("192.0.2.1")
	b, err := New(backend.Options{Ext: backend.ExternalInterface{Iface: &net.Interface{MTU: 1500}, IfaceAddr: addr, PublicIP: addr}, Config: cfg, Logger: klog.Background()})
	if err != nil {
		t.Fatal(err)
	}
	own := subnet.Lease{Subnet: netip.MustParsePrefix("10.5.1.0/24")}
	if err := b.Apply(context.Background(), own, nil); !errors.Is(err, ErrNotInitialized) {
		t.Fatalf("Apply before Init = %v, want ErrNotInitialized", err)
	}
	for i := 0; i < 2; i++ {
		if err := b.Close(); err != nil {
			t.Fatalf("Close #%d: %v", i+1, err)
		}
	}
	if _, err := b.Init(context.Background()); !errors.Is(err, ErrClosed) {
		t.Fatalf("Init after Close = %v, want ErrClosed", err)
	}
	if err := b.Apply(context.Background(), own, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("Apply after Close = %v, want ErrClosed", err)
	}
}

// TestNetnsCloseEndsGoroutines checks that Close stops the packet loops and
// the TUN's own goroutines, and leaves flannel0 in place (the TUN is
// persistent; TestNetnsRestartKeepsDevice checks what it keeps).
func TestNetnsCloseEndsGoroutines(t *testing.T) {
	needRoot(t)
	a, _ := newLab(t)
	cfg := labConfig(t, "")
	be := a.startBackend(t, cfg)
	if err := be.Apply(context.Background(), a.lease("10.5.1.0/24"), nil); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the packet loops to run", func() bool {
		return stacksContain("udp.(*path).tunLoop") && stacksContain("udp.(*path).udpLoop")
	})
	if err := be.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := be.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	eventually(t, "the backend's goroutines to end", func() bool {
		return !stacksContain("udp.(*path)") && !stacksContain("wireguard/tun.(*NativeTun)") && !stacksContain("udp.openTUN")
	})
	if _, err := a.NL.LinkByName(DeviceName); err != nil {
		t.Fatalf("flannel0 after Close: %v", err)
	}
}

func stacksContain(s string) bool {
	buf := make([]byte, 1<<20)
	n := runtime.Stack(buf, true)
	return strings.Contains(string(buf[:n]), s)
}

// fakeNetlink is a link with a set of IPv4 addresses.
type fakeNetlink struct {
	addrs []netlink.Addr
	up    bool
	calls []string
}

func (f *fakeNetlink) LinkByName(name string) (netlink.Link, error) {
	if name != DeviceName {
		return nil, errors.New("no such link")
	}
	return &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: name, Index: 7}}, nil
}
func (f *fakeNetlink) LinkSetUp(netlink.Link) error {
	f.up = true
	f.calls = append(f.calls, "up")
	return nil
}
func (f *fakeNetlink) AddrList(netlink.Link, int) ([]netlink.Addr, error) {
	return append([]netlink.Addr(nil), f.addrs...), nil
}
func (f *fakeNetlink) ReplaceAddr(_ int, p netip.Prefix, metric uint32) error {
	f.calls = append(f.calls, fmt.Sprintf("replace %s metric %d", p, metric))
	f.addrs = append(f.addrs, netlink.Addr{IPNet: ip.HostNet(p.Addr(), p.Bits())})
	return nil
}

// RouteListFiltered: the prefix route of each address, with RouteMetric,
// while the link is up.
func (f *fakeNetlink) RouteListFiltered(int, *netlink.Route, uint64) ([]netlink.Route, error) {
	var rs []netlink.Route
	for _, a := range f.addrs {
		if f.up {
			rs = append(rs, netlink.Route{Dst: a.IPNet, Priority: RouteMetric})
		}
	}
	return rs, nil
}
func (f *fakeNetlink) AddrDel(_ netlink.Link, a *netlink.Addr) error {
	f.calls = append(f.calls, "del "+a.IPNet.String())
	for i, x := range f.addrs {
		if x.IPNet.String() == a.IPNet.String() {
			f.addrs = append(f.addrs[:i], f.addrs[i+1:]...)
			return nil
		}
	}
	return unix.EADDRNOTAVAIL
}

func TestConfigureDeviceReconcilesAddresses(t *testing.T) {
	cfg, _ := subnet.ParseConfig([]byte(`{"Network":"10.5.0.0/16"}`))
	addr := netip.MustParseAddr("192.0.2.1")
	b, err := New(backend.Options{Ext: backend.ExternalInterface{Iface: &net.Interface{MTU: 1500}, IfaceAddr: addr, PublicIP: addr}, Config: cfg, Logger: klog.Background()})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	nl := &fakeNetlink{addrs: []netlink.Addr{
		{IPNet: ip.HostNet(netip.MustParseAddr("10.5.9.0"), 16)}, // a previous lease
		{IPNet: ip.HostNet(netip.MustParseAddr("10.5.1.0"), 24)}, // the right address, wrong length
	}}
	b.nl = nl
	own := netip.MustParsePrefix("10.5.1.0/24")
	if err := b.configureDevice(own); err != nil {
		t.Fatalf("configureDevice: %v", err)
	}
	if len(nl.addrs) != 1 || nl.addrs[0].IPNet.String() != "10.5.1.0/16" || !nl.up {
		t.Fatalf("addresses %v up %v; want exactly 10.5.1.0/16, up", nl.addrs, nl.up)
	}
	// Again: nothing to change but setting the link up.
	nl.calls = nil
	if err := b.configureDevice(own); err != nil {
		t.Fatalf("configureDevice again: %v", err)
	}
	if len(nl.calls) != 1 || nl.calls[0] != "up" {
		t.Fatalf("second call made %v, want only [up]", nl.calls)
	}
}
