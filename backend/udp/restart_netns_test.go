package udp

import (
	"context"
	"strings"
	"testing"

	"github.com/flanneld-go/flanneld/subnet"
)

// flannel0State is what a restart must keep of A's flannel0: its index,
// its addresses and the routes through it, as ip prints them.
type flannel0State struct {
	index         int
	addrs, routes string
}

func (x *labHost) flannel0(t *testing.T) flannel0State {
	t.Helper()
	l, err := x.NL.LinkByName(DeviceName)
	if err != nil {
		t.Fatalf("%s in %s: %v", DeviceName, x.Name, err)
	}
	ctx := context.Background()
	addrs, err := x.run(ctx, "ip", "-4", "-o", "addr", "show", "dev", DeviceName)
	if err != nil {
		t.Fatalf("listing addresses of %s in %s: %v\n%s", DeviceName, x.Name, err, addrs)
	}
	routes, err := x.run(ctx, "ip", "-4", "route", "show", "dev", DeviceName)
	if err != nil {
		t.Fatalf("listing routes through %s in %s: %v\n%s", DeviceName, x.Name, err, routes)
	}
	// The carrier is off while no process holds the TUN; that is not
	// what a restart must keep.
	routes = strings.ReplaceAll(routes, " linkdown", "")
	return flannel0State{index: l.Attrs().Index, addrs: strings.TrimSpace(addrs), routes: strings.TrimSpace(routes)}
}

// TestNetnsRestartKeepsDevice closes A's backend and starts a new one, as
// a daemon restart does: flannel0 stays in between with its address, the
// Network route and a route someone else added through it; the new
// backend attaches to the same device (same index) and passes traffic,
// also when the restart switches the TUN offloads on or off.
func TestNetnsRestartKeepsDevice(t *testing.T) {
	needRoot(t)
	needPing(t)
	on, off := `{"Type":"udp"}`, `{"Type":"udp","TUNOffload":false}`
	for _, tc := range []struct{ name, before, after string }{
		{"same", on, on},
		{"offloads-off", on, off},
		{"offloads-on", off, on},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b, ba, bb := labPair(t, tc.before)
			ctx := context.Background()
			if out, err := a.run(ctx, "ip", "route", "add", "10.99.0.0/24", "dev", DeviceName); err != nil {
				t.Fatalf("adding a route through %s: %v\n%s", DeviceName, err, out)
			}
			if ok, out := a.ping(t, "10.5.1.0", "10.5.2.0"); !ok {
				t.Fatalf("ping A->B before the restart failed:\n%s", out)
			}
			want := a.flannel0(t)
			if !strings.Contains(want.addrs, "inet 10.5.1.0/16") || !strings.Contains(want.routes, "10.5.0.0/16") || !strings.Contains(want.routes, "10.99.0.0/24") {
				t.Fatalf("flannel0 before the restart: %+v", want)
			}

			for i := 0; i < 2; i++ { // Close is idempotent
				if err := ba.Close(); err != nil {
					t.Fatalf("Close in A: %v", err)
				}
			}
			if got := a.flannel0(t); got != want {
				t.Fatalf("flannel0 after Close:\n%+v\nwant\n%+v", got, want)
			}
			if ok, _ := a.ping(t, "10.5.1.0", "10.5.2.0"); ok {
				t.Fatal("ping A->B answered while no backend held flannel0")
			}

			ba2 := a.startBackend(t, labConfig(t, tc.after))
			if got := a.flannel0(t); got != want {
				t.Fatalf("flannel0 after the new Init:\n%+v\nwant\n%+v", got, want)
			}
			la, lb := a.lease("10.5.1.0/24"), b.lease("10.5.2.0/24")
			if err := ba2.Apply(ctx, la, []subnet.Lease{lb}); err != nil {
				t.Fatalf("Apply in A after the restart: %v", err)
			}
			if got := a.flannel0(t); got != want {
				t.Fatalf("flannel0 after Apply:\n%+v\nwant\n%+v", got, want)
			}
			if ok, out := a.ping(t, "10.5.1.0", "10.5.2.0"); !ok {
				t.Fatalf("ping A->B after the restart failed:\n%s\nstats A %+v\nstats B %+v", out, ba2.Stats(), bb.Stats())
			}
			// A's TCP segments go out whole (split to the MTU) whatever
			// offloads the earlier run left on the device.
			if _, err := tcpStream(t, a, b, "10.5.2.0", 4<<20, 0, true); err != nil {
				t.Fatalf("TCP A->B after the restart: %v\nstats A %+v\nstats B %+v", err, ba2.Stats(), bb.Stats())
			}
			if s := bb.Stats(); s.Malformed != 0 {
				t.Fatalf("B got malformed datagrams: %+v", s)
			}
		})
	}
}

// TestNetnsTUNInUse: a second backend in the same namespace cannot take
// flannel0 from a running one, and says why.
func TestNetnsTUNInUse(t *testing.T) {
	needRoot(t)
	a, _ := newLab(t)
	cfg := labConfig(t, "")
	a.startBackend(t, cfg)
	_, _, err := createTUNIn(t, a, DeviceName)
	if err == nil || strings.Count(err.Error(), "another process has it open") != 1 {
		t.Fatalf("attaching to a TUN in use: %v, want one error saying another process has it open", err)
	}
	if out, err := a.run(context.Background(), "ip", "link", "add", "flannelX", "type", "bridge"); err != nil {
		t.Fatalf("adding a bridge: %v\n%s", err, out)
	}
	_, _, err = createTUNIn(t, a, "flannelX")
	if err == nil || !strings.Contains(err.Error(), "ip link del flannelX") {
		t.Fatalf("creating a TUN over a bridge: %v, want an error saying to delete it", err)
	}
}

// createTUNIn runs createTUN in x's namespace, closing what it opened.
func createTUNIn(t *testing.T, x *labHost, name string) (ok, vnet bool, err error) {
	t.Helper()
	inNS(t, x.Handle, func() {
		dev, v, e := createTUN(name, 1400, true)
		if e == nil {
			dev.Close()
		}
		ok, vnet, err = e == nil, v, e
	})
	return ok, vnet, err
}

// TestNetnsDeviceDeleted deletes A's flannel0 (ip link del) under the
// running backend: the next Apply creates it again, with its address, the
// Network route and the packet loop on the new TUN, and traffic flows both
// ways; setting it down or removing its address is likewise undone.
func TestNetnsDeviceDeleted(t *testing.T) {
	needRoot(t)
	needPing(t)
	a, b, ba, _ := labPair(t, `{"Type":"udp"}`)
	ctx := context.Background()
	la, lb := a.lease("10.5.1.0/24"), b.lease("10.5.2.0/24")
	// ip -o prefixes the addresses with the index, which a new device changes.
	addrs := func(s flannel0State) string { _, a, _ := strings.Cut(s.addrs, ": "); return a }
	before := a.flannel0(t)
	for _, edit := range [][]string{
		{"ip", "link", "del", DeviceName},
		{"ip", "link", "set", DeviceName, "down"},
		{"ip", "addr", "flush", "dev", DeviceName},
	} {
		what := strings.Join(edit, " ")
		if out, err := a.run(ctx, edit...); err != nil {
			t.Fatalf("%s: %v\n%s", what, err, out)
		}
		if ok, _ := a.ping(t, "10.5.1.0", "10.5.2.0"); ok {
			t.Fatalf("after %s: ping A->B still answered", what)
		}
		// Apply runs in the daemon's thread, in its namespace.
		var err error
		inNS(t, a.Handle, func() { err = ba.Apply(ctx, la, []subnet.Lease{lb}) })
		if err != nil {
			t.Fatalf("Apply after %s: %v", what, err)
		}
		after := a.flannel0(t)
		if addrs(after) != addrs(before) || after.routes != before.routes {
			t.Errorf("after %s and Apply: flannel0 has addresses %q and routes %q, want %q and %q",
				what, addrs(after), after.routes, addrs(before), before.routes)
		}
		if ok, out := a.ping(t, "10.5.1.0", "10.5.2.0"); !ok {
			t.Errorf("after %s and Apply: ping A->B failed:\n%s", what, out)
		}
		if ok, out := b.ping(t, "10.5.2.0", "10.5.1.0"); !ok {
			t.Errorf("after %s and Apply: ping B->A failed:\n%s", what, out)
		}
	}
}
