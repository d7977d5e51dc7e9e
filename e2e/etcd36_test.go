package e2e

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flanneld-go/flanneld/e2e/lab"
	"github.com/flanneld-go/flanneld/internal/etcdbin"
	"github.com/flanneld-go/flanneld/subnet"
)

// TestVXLANOnEtcd36 runs three vxlan daemons with default flags against a
// real etcd 3.6 process (no v2 API at all): --etcd-api auto must pick v3,
// each node must hold one lease key attached to an etcd lease, and every
// pair of hosts must reach each other over the overlay.
func TestVXLANOnEtcd36(t *testing.T) {
	t.Parallel()
	needRoot(t)
	etcd, err := etcdbin.Path(etcdbin.Version)
	if err != nil {
		t.Fatal(err)
	}
	bin := lab.BuildDaemon(t)
	var l *lab.Lab
	t.Cleanup(func() {
		if l == nil {
			return
		}
		for _, ns := range l.Namespaces() {
			if _, err := os.Stat(filepath.Join("/run/netns", ns)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("namespace %s left behind after the test (stat: %v)", ns, err)
			}
		}
	})
	l = lab.Start(t, lab.Options{Hosts: 3, DaemonPath: bin, EtcdBinary: etcd})
	t.Cleanup(func() { stopAll(t, l) })
	ctx := testCtx(t, converge)
	if err := l.SetConfig(ctx, vxlanConfig); err != nil {
		t.Fatal(err)
	}
	hosts := l.Hosts()
	envs := startAll(t, l)
	setBridges(t, hosts, envs)
	pingAll(t, hosts, envs)

	c, err := l.V3Client()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	resp, err := c.Get(ctx, l.EtcdPrefix()+"/subnets/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	byIP := map[string]int{}
	for _, kv := range resp.Kvs {
		a, err := subnet.ParseLeaseAttrs(kv.Value)
		if err != nil {
			t.Errorf("lease %s = %s: %v", kv.Key, kv.Value, err)
			continue
		}
		if kv.Lease == 0 {
			t.Errorf("lease %s has no etcd lease", kv.Key)
		}
		if a.BackendType != "vxlan" || !strings.Contains(string(a.BackendData), "VtepMAC") {
			t.Errorf("lease %s = %s, want a vxlan lease with its VtepMAC", kv.Key, kv.Value)
		}
		byIP[a.PublicIP.String()]++
	}
	for _, h := range hosts {
		if byIP[h.Addr.String()] != 1 {
			t.Errorf("%s holds %d leases in etcd, want 1", h.Name, byIP[h.Addr.String()])
		}
		if log := h.Daemon().Log(); !strings.Contains(log, "Using the etcd v3 API") {
			t.Errorf("%s did not log its choice of the v3 API:\n%s", h.Name, log)
		}
	}
}

// TestEtcdV3Wipe runs two host-gw daemons on --etcd-api v3, then replaces
// the store with an empty one on the same endpoint (as a restore from an
// old backup or a lost data directory would): each daemon must notice that
// its lease vanished and take one again, and traffic must keep flowing.
func TestEtcdV3Wipe(t *testing.T) {
	t.Parallel()
	l := newLab(t, 2, "")
	c, err := l.V3Client()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := testCtx(t, 2*converge)
	if _, err := c.Put(ctx, l.EtcdPrefix()+"/config", hostGWConfig); err != nil {
		t.Fatal(err)
	}
	hosts := l.Hosts()
	envs := startAll(t, l, "--etcd-api", "v3")
	waitRoutes(t, hosts, envs)
	setBridges(t, hosts, envs)
	pingAll(t, hosts, envs)

	if err := l.Etcd().Wipe(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Put(ctx, l.EtcdPrefix()+"/config", hostGWConfig); err != nil {
		t.Fatal(err)
	}
	// Both leases come back, each on its old subnet (the daemon asks for
	// the subnet it had), attached to an etcd lease.
	want := map[string]string{}
	for i, h := range hosts {
		want[h.Addr.String()] = envs[i].Subnet.Masked().String()
	}
	for {
		resp, err := c.Get(ctx, l.EtcdPrefix()+"/subnets/", clientv3.WithPrefix())
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]string{}
		for _, kv := range resp.Kvs {
			a, err := subnet.ParseLeaseAttrs(kv.Value)
			if err == nil && kv.Lease != 0 {
				k := strings.TrimPrefix(string(kv.Key), l.EtcdPrefix()+"/subnets/")
				got[a.PublicIP.String()] = strings.Replace(k, "-", "/", 1)
			}
		}
		if len(got) == len(want) {
			for ip, sn := range want {
				if got[ip] != sn {
					t.Errorf("after the wipe %s holds %s, want its old subnet %s", ip, got[ip], sn)
				}
			}
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("after the wipe etcd holds leases %v, want %v", got, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, h := range hosts {
		if !strings.Contains(h.Daemon().Log(), "The etcd store went back") {
			t.Errorf("%s did not log that the store went back", h.Name)
		}
	}
	waitRoutes(t, hosts, envs)
	pingAll(t, hosts, envs)
}

// TestEtcdV3Outage stops etcd under three host-gw daemons on --etcd-api v3
// (8 s; 60 s with FLANNEL_E2E_LONG=1): nothing may change in the kernel,
// traffic keeps flowing, the daemons stay idle, and once etcd is back a new
// lease reaches every host (the watches resume).
func TestEtcdV3Outage(t *testing.T) {
	t.Parallel()
	outage := shortOutage
	if os.Getenv(envLong) == "1" {
		outage = longOutage
	}
	l := newLab(t, 3, "")
	c, err := l.V3Client()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := testCtx(t, 5*time.Minute)
	if _, err := c.Put(ctx, l.EtcdPrefix()+"/config", hostGWConfig); err != nil {
		t.Fatal(err)
	}
	hosts := l.Hosts()
	envs := startAll(t, l, "--etcd-api", "v3")
	waitRoutes(t, hosts, envs)
	setBridges(t, hosts, envs)
	pingAll(t, hosts, envs)
	before := make([][]string, len(hosts))
	cpu0 := make([]time.Duration, len(hosts))
	for i, h := range hosts {
		if before[i], err = kernelSnapshot(ctx, h); err != nil {
			t.Fatal(err)
		}
		if cpu0[i], err = cpuTime(h.Daemon().Pid()); err != nil {
			t.Fatal(err)
		}
	}
	p := startPinger(hosts, envs)
	defer p.stop()

	down := time.Now()
	l.Etcd().Stop()
	time.Sleep(outage)
	downFor := time.Since(down)
	for i, h := range hosts {
		cpu, err := cpuTime(h.Daemon().Pid())
		if err != nil {
			t.Fatal(err)
		}
		share := (cpu - cpu0[i]).Seconds() / downFor.Seconds()
		t.Logf("%s: %v CPU in %v of outage (%.2f%% of a core)", h.Name, cpu-cpu0[i], downFor.Round(time.Millisecond), 100*share)
		if share > maxOutageCPU {
			t.Errorf("%s: flanneld used %.0f%% of a core while etcd was down, want under %.0f%%", h.Name, 100*share, 100*maxOutageCPU)
		}
		if h.Daemon().Exited() {
			t.Fatalf("flanneld on %s exited during the outage; log:\n%s", h.Name, h.Daemon().Log())
		}
		now, err := kernelSnapshot(ctx, h)
		if err != nil {
			t.Fatal(err)
		}
		if gone, added := diffSnapshots(before[i], now); len(gone)+len(added) > 0 {
			t.Errorf("%s: kernel state changed during the outage: gone %q, added %q", h.Name, gone, added)
		}
	}
	if err := l.Etcd().Restart(); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	sn := faultSubnet(250)
	key, value := fakeLeaseOf(l, "host-gw", sn, fakeHost)
	g, err := c.Grant(ctx, 86400)
	if err == nil {
		_, err = c.Put(ctx, key, value, clientv3.WithLease(g.ID))
	}
	if err != nil {
		t.Fatalf("writing a new lease after the restart: %v", err)
	}
	t.Logf("new lease written %v after etcd was back", time.Since(back).Round(time.Millisecond))
	took := waitRouteEverywhere(t, hosts, sn, back, converge)
	for i, h := range hosts {
		t.Logf("%s: route to the new lease %v after etcd was back", h.Name, took[i].Round(time.Millisecond))
	}
	ok, failures := p.stop()
	if len(failures) > 0 || ok == 0 {
		t.Errorf("overlay pings during the outage: %d replies, failures:\n%s", ok, strings.Join(failures, "\n"))
	}
}
