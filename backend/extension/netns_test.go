package extension

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/flanneld-go/flanneld/internal/nstest"
	"github.com/flanneld-go/flanneld/subnet"
)

// TestAddRetriedUntilRouteInPlace: a SubnetAddCommand that fails twice and
// then succeeds (it runs `ip route replace` in a namespace of the test's)
// is run again at each Apply, and ends with the route in place; it is not
// run again once it succeeded; the removed lease's SubnetRemoveCommand
// deletes the route.
func TestAddRetriedUntilRouteInPlace(t *testing.T) {
	ns := nstest.New(t, "ext")
	ns.Veth(t, "eth0", 0, nil, "eth0p", "192.168.9.1/24")
	dir := t.TempDir()
	count := filepath.Join(dir, "count")
	add := script(t, dir, "add.sh", `n=$(cat `+count+` 2>/dev/null || echo 0); n=$((n+1)); echo $n > `+count+`
[ $n -le 2 ] && { echo "attempt $n: not yet"; exit 3; }
exec ip -n "$1" route replace "$SUBNET" via "$PUBLIC_IP"`)
	e, logs := newTest(t, commandJSON(
		"SubnetAddCommand", add+" "+ns.Name,
		"SubnetRemoveCommand", "ip -n "+ns.Name+" route del $SUBNET via $PUBLIC_IP"), DefaultTimeout)
	if _, err := e.Init(context.Background()); err != nil {
		t.Fatal(err)
	}
	own := lease("10.5.1.0/24", "192.168.9.1", "")
	peer := lease("10.5.2.0/24", "192.168.9.2", `"p"`)
	routeVia := func() string {
		rs, err := ns.NL.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Dst: ipNet(peer.Subnet)}, netlink.RT_FILTER_DST)
		if err != nil {
			t.Fatal(err)
		}
		if len(rs) == 0 {
			return ""
		}
		return rs[0].Gw.String()
	}
	for i := 1; i <= 4; i++ {
		if err := e.Apply(context.Background(), own, []subnet.Lease{peer}); err != nil {
			t.Fatalf("Apply %d = %v", i, err)
		}
		got, want := routeVia(), "192.168.9.2"
		if i <= 2 {
			want = ""
		}
		if got != want {
			t.Errorf("after Apply %d the route to %s goes via %q, want %q", i, peer.Subnet, got, want)
		}
	}
	if b, _ := os.ReadFile(count); strings.TrimSpace(string(b)) != "3" {
		t.Errorf("SubnetAddCommand ran %s times over 4 Applies, want 3 (until it succeeded)", b)
	}
	if l := logs.matching("SubnetAddCommand failed"); len(l) != 2 || !strings.Contains(l[0], "exit status 3") || !strings.Contains(l[0], "attempt 1: not yet") {
		t.Errorf("failure log lines = %q, want 2 with the exit status and the output", l)
	}
	if err := e.Apply(context.Background(), own, nil); err != nil {
		t.Fatal(err)
	}
	if got := routeVia(); got != "" {
		t.Errorf("after the lease was removed the route to %s still goes via %s", peer.Subnet, got)
	}
}
