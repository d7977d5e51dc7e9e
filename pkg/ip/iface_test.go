package ip

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// newNS makes a network namespace for the test and returns a handle in it;
// the namespace is deleted when the test ends.
func newNS(t *testing.T) *netlink.Handle {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	name := fmt.Sprintf("flt-ip-%d", os.Getpid())
	ns, err := netns.NewNamed(name)
	if err != nil {
		t.Fatal(err)
	}
	if err := netns.Set(orig); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ns.Close()
		netns.DeleteNamed(name)
	})
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}

func addDummy(t *testing.T, h *netlink.Handle, name string, mtu int, addrs ...string) {
	t.Helper()
	// No dummy driver on every kernel: a veth pair with both ends here.
	l := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: mtu}, PeerName: name + "p"}
	if err := h.LinkAdd(l); err != nil {
		t.Fatal(err)
	}
	peer, err := h.LinkByName(name + "p")
	if err != nil {
		t.Fatal(err)
	}
	if err := h.LinkSetUp(peer); err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		addr, err := netlink.ParseAddr(a)
		if err != nil {
			t.Fatal(err)
		}
		if err := h.AddrAdd(l, addr); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.LinkSetUp(l); err != nil {
		t.Fatal(err)
	}
}

func TestChooseInterface(t *testing.T) {
	h := newNS(t)
	addDummy(t, h, "ext0", 1400, "10.250.1.5/24", "10.250.1.6/24")
	addDummy(t, h, "ext1", 1500, "10.250.2.5/24")
	addDummy(t, h, "bare0", 1500)

	got, err := ChooseInterface(h, nil, nil)
	if !errors.Is(err, ErrNoInterface) || !strings.Contains(err.Error(), "no IPv4 default route") {
		t.Fatalf("no default route: %v, %v", got, err)
	}
	ext1, _ := h.LinkByName("ext1")
	gw, _ := ParseAddr("10.250.2.1")
	if err := h.RouteAdd(&netlink.Route{LinkIndex: ext1.Attrs().Index, Gw: IP(gw)}); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		names, regexes []string
		want, addr     string
		err            string
	}{
		{nil, nil, "ext1", "10.250.2.5", ""},
		{[]string{"ext0"}, nil, "ext0", "10.250.1.5", ""},
		{[]string{"10.250.1.6"}, nil, "ext0", "10.250.1.6", ""},
		{[]string{"nope", "ext1"}, nil, "ext1", "10.250.2.5", ""},
		{nil, []string{`^10\.250\.1\.6$`}, "ext0", "10.250.1.6", ""},
		{nil, []string{`^ext1$`}, "ext1", "10.250.2.5", ""},
		{[]string{"nope"}, []string{"ext0"}, "ext0", "10.250.1.5", ""},
		{[]string{"nope"}, nil, "", "", "--iface nope: no such interface"},
		{[]string{"bare0"}, nil, "", "", "--iface bare0 has no IPv4 address"},
		{[]string{"10.9.9.9"}, nil, "", "", "--iface 10.9.9.9: no interface has this address"},
		{[]string{"fd00::1"}, nil, "", "", "not an IPv4 address"},
		{nil, []string{"("}, "", "", "not a valid regular expression"},
		{nil, []string{"^bare"}, "", "", "matches no interface with an IPv4 address"},
	}
	for _, tt := range tests {
		got, err := ChooseInterface(h, tt.names, tt.regexes)
		if tt.err != "" {
			if !errors.Is(err, ErrNoInterface) || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("ChooseInterface(%v, %v) = %v, want error containing %q", tt.names, tt.regexes, err, tt.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("ChooseInterface(%v, %v): %v", tt.names, tt.regexes, err)
			continue
		}
		if got.Iface.Name != tt.want || got.Addr.String() != tt.addr {
			t.Errorf("ChooseInterface(%v, %v) = %s %s, want %s %s", tt.names, tt.regexes, got.Iface.Name, got.Addr, tt.want, tt.addr)
		}
		if tt.want == "ext0" && got.Iface.MTU != 1400 {
			t.Errorf("MTU = %d", got.Iface.MTU)
		}
	}
}
