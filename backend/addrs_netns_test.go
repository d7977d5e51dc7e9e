package backend

import (
	"net"
	"net/netip"
	"slices"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/flanneld-go/flanneld/internal/nstest"
	"github.com/flanneld-go/flanneld/pkg/nlbatch"
)

// addrsOf lists the IPv4 addresses of link as "a/len".
func addrsOf(t *testing.T, h *nlbatch.Handle, link netlink.Link) []string {
	t.Helper()
	as, err := h.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, a := range as {
		out = append(out, a.IPNet.String())
	}
	slices.Sort(out)
	return out
}

// TestReconcileAddrsInNetns moves a device's address to another lease's in
// the same subnet, the new one added before the old one goes: with
// promote_secondaries the new one stays; without it, deleting the old
// primary takes the new secondary along (the kernel's rule the udp backend
// turns off).
func TestReconcileAddrsInNetns(t *testing.T) {
	ns := nstest.New(t, "flbe")
	h := ns.NL
	for _, promote := range []bool{true, false} {
		name := "promote"
		if !promote {
			name = "nopromote"
		}
		link := ns.Veth(t, name, 0, nil, name+"p", "10.5.9.0/16")
		if promote {
			if err := h.PromoteSecondaries(link.Attrs().Index); err != nil {
				t.Fatal(err)
			}
		}
		c, err := ReconcileAddrs(h, link, netip.MustParsePrefix("10.5.1.0/16"), 0)
		if err != nil || c != (Changes{Added: 1, Removed: 1}) {
			t.Fatalf("%s: ReconcileAddrs = %+v, %v; want one added, one removed", name, c, err)
		}
		got := addrsOf(t, ns.NL, link)
		want := []string{"10.5.1.0/16"}
		if !promote {
			want = nil
		}
		if !slices.Equal(got, want) {
			t.Errorf("%s: addresses %q, want %q", name, got, want)
		}
		if !promote {
			continue
		}
		// Again: nothing to do. A hand-added address goes; IPv6 link-local
		// addresses are the kernel's.
		if err := ns.NL.AddrAdd(link, &netlink.Addr{IPNet: mustIPNet("10.7.0.1/24")}); err != nil {
			t.Fatal(err)
		}
		c, err = ReconcileAddrs(h, link, netip.MustParsePrefix("10.5.1.0/16"), 0)
		if err != nil || c != (Changes{Removed: 1}) {
			t.Fatalf("again: ReconcileAddrs = %+v, %v; want one removed", c, err)
		}
		if got := addrsOf(t, ns.NL, link); !slices.Equal(got, want) {
			t.Errorf("again: addresses %q, want %q", got, want)
		}
	}
}

func mustIPNet(s string) *net.IPNet {
	a, err := netlink.ParseIPNet(s)
	if err != nil {
		panic(err)
	}
	return a
}
