package ip

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/internal/nstest"
)

// addV6 gives link name the IPv6 address cidr, without duplicate address
// detection; deprecated makes it deprecated (preferred lifetime 0).
func addV6(t *testing.T, n *nstest.NS, name, cidr string, deprecated bool) {
	t.Helper()
	l, err := n.NL.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	a, err := netlink.ParseAddr(cidr)
	if err != nil {
		t.Fatal(err)
	}
	a.Flags = unix.IFA_F_NODAD
	if deprecated {
		a.ValidLft, a.PreferedLft = 3600, 0
	}
	if err := n.NL.AddrAdd(l, a); err != nil {
		t.Fatalf("adding %s to %s: %v", cidr, name, err)
	}
}

func TestChooseInterface(t *testing.T) {
	// Links with carrier: veth pairs with both ends here (no dummy driver
	// on every kernel).
	n := nstest.New(t, "flt-ip")
	h := n.NL
	n.Veth(t, "ext0", 1400, nil, "ext0p", "10.250.1.5/24", "10.250.1.6/24")
	n.Veth(t, "ext1", 1500, nil, "ext1p", "10.250.2.5/24")
	n.Veth(t, "bare0", 1500, nil, "bare0p")
	n.Veth(t, "six0", 1500, nil, "six0p")
	// The kernel lists IPv6 addresses newest first: fd5e:1::6 is ext0's first.
	addV6(t, n, "ext0", "fd5e:1::5/64", false)
	addV6(t, n, "ext0", "fd5e:1::6/64", false)
	// Deprecated (and temporary) addresses are never chosen.
	addV6(t, n, "six0", "fd5e:6::5/64", false)
	addV6(t, n, "six0", "fd5e:6::99/64", true)

	got, err := ChooseInterface(h.Handle, nil, nil)
	if !errors.Is(err, ErrNoInterface) || !strings.Contains(err.Error(), "no IPv4 or IPv6 default route") {
		t.Fatalf("no default route: %v, %v", got, err)
	}
	ext1, _ := h.LinkByName("ext1")
	gw, _ := ParseAddr("10.250.2.1")
	if err := h.RouteAdd(&netlink.Route{LinkIndex: ext1.Attrs().Index, Gw: IP(gw)}); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		names, regexes    []string
		want, addr, addr6 string
		err               string
	}{
		{nil, nil, "ext1", "10.250.2.5", "", ""},
		{[]string{"ext0"}, nil, "ext0", "10.250.1.5", "fd5e:1::6", ""},
		{[]string{"10.250.1.6"}, nil, "ext0", "10.250.1.6", "fd5e:1::6", ""},
		{[]string{"fd5e:1::5"}, nil, "ext0", "10.250.1.5", "fd5e:1::5", ""},
		{[]string{"six0"}, nil, "six0", "", "fd5e:6::5", ""},
		{[]string{"nope", "ext1"}, nil, "ext1", "10.250.2.5", "", ""},
		{nil, []string{`^10\.250\.1\.6$`}, "ext0", "10.250.1.6", "fd5e:1::6", ""},
		{nil, []string{`^fd5e:6:`}, "six0", "", "fd5e:6::5", ""},
		{nil, []string{`^ext1$`}, "ext1", "10.250.2.5", "", ""},
		{[]string{"nope"}, []string{"ext0"}, "ext0", "10.250.1.5", "fd5e:1::6", ""},
		{[]string{"nope"}, nil, "", "", "", "--iface nope: no such interface"},
		{[]string{"bare0"}, nil, "", "", "", "--iface bare0 has no IPv4 or global IPv6 address"},
		{[]string{"10.9.9.9"}, nil, "", "", "", "--iface 10.9.9.9: no interface has this address"},
		{[]string{"fd00::1"}, nil, "", "", "", "--iface fd00::1: no interface has this address"},
		{[]string{"fd5e:6::99"}, nil, "", "", "", "--iface fd5e:6::99: no interface has this address"},
		{nil, []string{"("}, "", "", "", "not a valid regular expression"},
		{nil, []string{"^bare"}, "", "", "", "matches no interface with an IPv4 or global IPv6 address"},
	}
	for _, tt := range tests {
		got, err := ChooseInterface(h.Handle, tt.names, tt.regexes)
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
		if got.Iface.Name != tt.want || addrString(got.Addr) != tt.addr || addrString(got.Addr6) != tt.addr6 {
			t.Errorf("ChooseInterface(%v, %v) = %s %s %s, want %s %s %s", tt.names, tt.regexes,
				got.Iface.Name, got.Addr, got.Addr6, tt.want, tt.addr, tt.addr6)
		}
		if (got.NoAddr6 == "") != got.Addr6.IsValid() {
			t.Errorf("ChooseInterface(%v, %v): Addr6 %s with NoAddr6 %q", tt.names, tt.regexes, got.Addr6, got.NoAddr6)
		}
		if tt.want == "ext0" && got.Iface.MTU != 1400 {
			t.Errorf("MTU = %d", got.Iface.MTU)
		}
	}

	// The IPv6 default route on another interface than the IPv4 one is
	// named in NoAddr6.
	six0, _ := h.LinkByName("six0")
	if err := h.RouteAdd(&netlink.Route{LinkIndex: six0.Attrs().Index, Gw: IP(netip.MustParseAddr("fd5e:6::1"))}); err != nil {
		t.Fatal(err)
	}
	got, err = ChooseInterface(h.Handle, nil, nil)
	if err != nil || got.Iface.Name != "ext1" || got.Addr6.IsValid() ||
		got.NoAddr6 != "interface ext1 has no global IPv6 address; the IPv6 default route is on six0: choose one interface for both families with --iface" {
		t.Errorf("IPv4 and IPv6 default routes on two interfaces: %s %s %q, %v", got.Iface.Name, got.Addr6, got.NoAddr6, err)
	}
}

// TestChooseInterfaceIPv6Only: with only an IPv6 default route, its
// interface is chosen.
func TestChooseInterfaceIPv6Only(t *testing.T) {
	n := nstest.New(t, "flt-ip6")
	h := n.NL
	n.Veth(t, "eth0", 1500, nil, "eth0p")
	addV6(t, n, "eth0", "fd5e::7/64", false)
	eth0, _ := h.LinkByName("eth0")
	if err := h.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Gw: IP(netip.MustParseAddr("fd5e::1"))}); err != nil {
		t.Fatal(err)
	}
	got, err := ChooseInterface(h.Handle, nil, nil)
	if err != nil || got.Iface.Name != "eth0" || got.Addr.IsValid() || got.Addr6 != netip.MustParseAddr("fd5e::7") {
		t.Errorf("ChooseInterface = %s %s %s, %v; want eth0 with fd5e::7 only", got.Iface.Name, got.Addr, got.Addr6, err)
	}
}

func addrString(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}
