package ip

import (
	"errors"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/flanneld-go/flanneld/internal/nstest"
)

func TestChooseInterface(t *testing.T) {
	// Links with carrier: veth pairs with both ends here (no dummy driver
	// on every kernel).
	n := nstest.New(t, "flt-ip")
	h := n.NL
	n.Veth(t, "ext0", 1400, nil, "ext0p", "10.250.1.5/24", "10.250.1.6/24")
	n.Veth(t, "ext1", 1500, nil, "ext1p", "10.250.2.5/24")
	n.Veth(t, "bare0", 1500, nil, "bare0p")

	got, err := ChooseInterface(h.Handle, nil, nil)
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
		if got.Iface.Name != tt.want || got.Addr.String() != tt.addr {
			t.Errorf("ChooseInterface(%v, %v) = %s %s, want %s %s", tt.names, tt.regexes, got.Iface.Name, got.Addr, tt.want, tt.addr)
		}
		if tt.want == "ext0" && got.Iface.MTU != 1400 {
			t.Errorf("MTU = %d", got.Iface.MTU)
		}
	}
}
