package agent

import (
	"context"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"k8s.io/klog/v2/ktesting"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/flanneld-go/flanneld/backend"
	_ "github.com/flanneld-go/flanneld/backend/hostgw"
	"github.com/flanneld-go/flanneld/internal/metrics"
	"github.com/flanneld-go/flanneld/subnet"
	"github.com/flanneld-go/flanneld/subnet/etcdv2"
)

// startNode starts a daemon of the lab as host i (PublicIP 192.168.8.i,
// its own subnet file) and waits until it is ready.
func (l *lab) startNode(i int, o Options) *running {
	l.t.Helper()
	pub := netip.AddrFrom4([4]byte{192, 168, 8, byte(i)})
	o.Ext = backend.ExternalInterface{Iface: &net.Interface{Name: "eth0", Index: 2, MTU: 1500}, IfaceAddr: pub, PublicIP: pub}
	o.SubnetFile = filepath.Join(l.dir, pub.String()+".env")
	r := l.start(o)
	r.waitReady(l.t)
	return r
}

// ownLease is the subnet in host i's subnet file.
func (l *lab) ownLease(i int) netip.Prefix {
	l.t.Helper()
	env, err := subnet.ReadEnv(filepath.Join(l.dir, netip.AddrFrom4([4]byte{192, 168, 8, byte(i)}).String()+".env"))
	if err != nil {
		l.t.Fatal(err)
	}
	return env.Subnet.Masked()
}

// leaseHeld reports whether etcd holds p for host i.
func (l *lab) leaseHeld(i int, p netip.Prefix) bool {
	resp, err := l.keys.Get(context.Background(), "/coreos.com/network/subnets/"+strings.Replace(p.String(), "/", "-", 1), nil)
	return err == nil && strings.Contains(resp.Node.Value, `"PublicIP":"192.168.8.`+string(rune('0'+i))+`"`)
}

// follows reports whether the fake backend has p among its remote leases.
func follows(f *fakeBackend, p netip.Prefix) bool {
	_, remote, _ := f.state()
	return strings.Contains(" "+remote+" ", " "+p.String()+" ")
}

// TestRunSurvivesStoreWipe: etcd loses its data and starts empty on the
// same endpoint. Every node writes its lease again (the same subnet), runs
// on the config it has while the key is missing (and says so), and follows
// leases written afterwards.
func TestRunSurvivesStoreWipe(t *testing.T) {
	l := newLab(t)
	l.config("")
	l.startNode(1, Options{})
	l.startNode(2, Options{})
	a, b := l.ownLease(1), l.ownLease(2)
	fa, fb := fakeN(t, 0), fakeN(t, 1)
	eventually(t, "the nodes follow each other", func() bool { return follows(fa, b) && follows(fb, a) })

	if err := l.etcd.Wipe(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "both leases back in the wiped etcd", func() bool { return l.leaseHeld(1, a) && l.leaseHeld(2, b) })
	eventually(t, "the missing config reported", func() bool {
		return metrics.NetworkConfig.WithLabelValues("missing").Get() == 1
	})
	l.set("subnets/10.5.200.0-24", `{"PublicIP":"192.168.8.50","BackendType":"fake-test"}`, time.Hour)
	p := netip.MustParsePrefix("10.5.200.0/24")
	eventually(t, "a lease written after the wipe followed", func() bool { return follows(fa, p) && follows(fb, p) })
	if l.ownLease(1) != a || l.ownLease(2) != b {
		t.Errorf("subnets moved: %v %v, want %v %v", l.ownLease(1), l.ownLease(2), a, b)
	}
	l.config("")
	eventually(t, "the config back", func() bool {
		return metrics.NetworkConfig.WithLabelValues("current").Get() == 1
	})
}

// TestRunSurvivesRestoreOfOlderBackup: etcd is restored from a backup taken
// before a node joined and a lease was written: its index goes back. The
// node whose key the backup lacks writes it again (same subnet), a lease
// only in the lost history is removed everywhere, and a lease written
// afterwards is followed by every node.
func TestRunSurvivesRestoreOfOlderBackup(t *testing.T) {
	l := newLab(t)
	l.config("")
	l.startNode(1, Options{})
	l.startNode(2, Options{})
	backup := filepath.Join(t.TempDir(), "backup")
	if err := l.etcd.Backup(backup); err != nil {
		t.Fatal(err)
	}
	l.startNode(3, Options{})
	a, b, c := l.ownLease(1), l.ownLease(2), l.ownLease(3)
	fa, fb := fakeN(t, 0), fakeN(t, 1)
	fc := fakeN(t, 2)
	lost := netip.MustParsePrefix("10.5.201.0/24")
	l.set("subnets/10.5.201.0-24", `{"PublicIP":"192.168.8.51","BackendType":"fake-test"}`, time.Hour)
	// More writes after the backup than it holds, so the index is well
	// past it.
	for range 20 {
		l.set("subnets/10.5.202.0-24", `{"PublicIP":"192.168.8.52","BackendType":"fake-test"}`, time.Hour)
	}
	l.keys.Delete(context.Background(), "/coreos.com/network/subnets/10.5.202.0-24", nil)
	eventually(t, "everyone follows everyone", func() bool {
		return follows(fa, c) && follows(fb, c) && follows(fc, a) && follows(fa, lost) && follows(fc, lost)
	})

	resets := metrics.StoreResets.Get()
	if err := l.etcd.RestoreBackup(backup); err != nil {
		t.Fatal(err)
	}
	eventually(t, "every node's lease in the restored etcd", func() bool {
		return l.leaseHeld(1, a) && l.leaseHeld(2, b) && l.leaseHeld(3, c)
	})
	if metrics.StoreResets.Get() <= resets {
		t.Error("no store reset counted")
	}
	eventually(t, "the lease only in the lost history removed", func() bool {
		return !follows(fa, lost) && !follows(fb, lost) && !follows(fc, lost)
	})
	p := netip.MustParsePrefix("10.5.203.0/24")
	l.set("subnets/10.5.203.0-24", `{"PublicIP":"192.168.8.53","BackendType":"fake-test"}`, time.Hour)
	eventually(t, "a lease written after the restore followed", func() bool {
		return follows(fa, p) && follows(fb, p) && follows(fc, p) && follows(fa, c) && follows(fc, b)
	})
	if l.ownLease(3) != c {
		t.Errorf("host 3 moved from %v to %v", c, l.ownLease(3))
	}
}

// TestLoopRunsWhileStoreHangs: etcd stops answering without closing
// anything (a partition) just as the renewal is due. The renewal waits for
// its timeout in a goroutine of its own; the owner loop goes on: each route
// resync on the daemon's clock reaches the backend. When etcd answers
// again the renewal completes.
func TestLoopRunsWhileStoreHangs(t *testing.T) {
	l := newLab(t)
	l.config("")
	// Requests wait up to a minute for an answer: the old loop stalled that
	// long in RenewLease.
	mgr, err := etcdv2.New(etcdv2.Options{Endpoints: l.etcd.Endpoints(), RequestTimeout: time.Minute,
		Logger: ktesting.NewLogger(t, ktesting.NewConfig())})
	if err != nil {
		t.Fatal(err)
	}
	clk := clocktesting.NewFakeClock(time.Now())
	r := l.start(Options{Manager: mgr, Clock: clk, RouteResync: time.Second, RenewMargin: 24*time.Hour - 10*time.Second})
	r.waitReady(t)
	f := fakeFor(t)
	renewals := metrics.LeaseRenewals.WithLabelValues("ok").Get()

	l.etcd.Freeze()
	thawed := false
	defer func() {
		if !thawed {
			l.etcd.Thaw()
		}
	}()
	clk.Step(10 * time.Second) // the renewal is due, and hangs
	time.Sleep(100 * time.Millisecond)
	for i := range 5 {
		_, _, before := f.state()
		eventually(t, "a resync while the renewal hangs", func() bool {
			clk.Step(time.Second)
			_, _, n := f.state()
			return n > before
		})
		if i == 0 && metrics.LeaseRenewals.WithLabelValues("ok").Get() != renewals {
			t.Fatal("the renewal completed although etcd does not answer")
		}
	}
	l.etcd.Thaw()
	thawed = true
	eventually(t, "the renewal once etcd answers", func() bool {
		return metrics.LeaseRenewals.WithLabelValues("ok").Get() > renewals
	})
}

// TestRouteRepairWhileStoreHangs: the real host-gw backend in a network
// namespace. etcd stops answering (a partition) as the renewal falls due,
// and a route is deleted by hand: the next route resync on the daemon's
// clock puts it back while the renewal still waits for etcd.
func TestRouteRepairWhileStoreHangs(t *testing.T) {
	n := newHostGWNode(t, "fldmn")
	ns, l, a, dst, routed := n.ns, n.l, n.eth0.Attrs(), n.dst, n.routed
	mgr, err := etcdv2.New(etcdv2.Options{Endpoints: l.etcd.Endpoints(), RequestTimeout: time.Minute,
		Logger: ktesting.NewLogger(t, ktesting.NewConfig())})
	if err != nil {
		t.Fatal(err)
	}
	clk := clocktesting.NewFakeClock(time.Now())
	r := l.start(Options{Manager: mgr, Clock: clk, Netlink: ns.NL, RouteResync: 10 * time.Second,
		RenewMargin: 24*time.Hour - 30*time.Second, Ext: n.ext()})
	r.waitReady(t)
	eventually(t, "the route to the remote lease", routed)
	renewals := metrics.LeaseRenewals.WithLabelValues("ok").Get()

	l.etcd.Freeze()
	defer l.etcd.Thaw()
	clk.Step(30 * time.Second) // the renewal is due, and hangs
	time.Sleep(100 * time.Millisecond)
	if err := ns.NL.RouteDel(&netlink.Route{Dst: dst, LinkIndex: a.Index}); err != nil {
		t.Fatal(err)
	}
	if routed() {
		t.Fatal("the route is still there after its deletion")
	}
	clk.Step(10 * time.Second) // one route resync
	eventually(t, "the route back after one resync", routed)
	if metrics.LeaseRenewals.WithLabelValues("ok").Get() != renewals {
		t.Error("the renewal completed although etcd does not answer")
	}
}
