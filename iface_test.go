package main

import (
	"errors"
	"strings"
	"testing"

	"github.com/flanneld-go/flanneld/internal/nstest"
	"github.com/flanneld-go/flanneld/pkg/ip"
)

// TestChooseInterfaceCanReach: --iface and --iface-regex first, then
// --iface-can-reach (the route's interface, not the default route's); an
// error names what each found.
func TestChooseInterfaceCanReach(t *testing.T) {
	n := nstest.New(t, "flt-main")
	n.Veth(t, "ext0", 0, nil, "ext0p", "10.250.1.5/24")
	n.Veth(t, "ext1", 0, nil, "ext1p", "10.250.2.5/24")
	h := n.NL.Handle
	for _, tc := range []struct {
		f    flags
		want string
	}{
		{flags{ifaceCanReach: "10.250.2.9"}, "ext1"},
		{flags{iface: []string{"nope"}, ifaceCanReach: "10.250.2.9"}, "ext1"},
		{flags{ifaceRegex: []string{"^nomatch$"}, ifaceCanReach: "10.250.1.9"}, "ext0"},
		{flags{iface: []string{"ext0"}, ifaceCanReach: "10.250.2.9"}, "ext0"},
	} {
		got, err := chooseInterface(h, &tc.f)
		if err != nil || got.Iface.Name != tc.want {
			t.Errorf("iface %q regex %q can-reach %s: %v, %v; want %s", tc.f.iface, tc.f.ifaceRegex, tc.f.ifaceCanReach, got.Iface, err, tc.want)
		}
	}
	_, err := chooseInterface(h, &flags{iface: []string{"nope"}, ifaceCanReach: "192.0.2.1"})
	if !errors.Is(err, ip.ErrNoInterface) || !strings.Contains(err.Error(), "--iface nope") || !strings.Contains(err.Error(), "--iface-can-reach 192.0.2.1") {
		t.Errorf("nothing found: %v, want one error naming --iface nope and --iface-can-reach 192.0.2.1", err)
	}
}
