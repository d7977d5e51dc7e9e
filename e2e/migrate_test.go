package e2e

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flanneld-go/flanneld/subnet"
)

// TestMigrateV2ToV3 follows the README's steps on a running cluster: three
// host-gw daemons with default flags on the v2 keyspace; flannel-migrate-v3
// copies it; the daemons are restarted one by one (still default flags) and
// move to v3, each keeping its subnet, with overlay traffic flowing
// throughout.
func TestMigrateV2ToV3(t *testing.T) {
	t.Parallel()
	l := newLab(t, 3, hostGWConfig)
	migrate := filepath.Join(t.TempDir(), "flannel-migrate-v3")
	if out, err := exec.Command("go", "build", "-o", migrate, "../cmd/flannel-migrate-v3").CombinedOutput(); err != nil {
		t.Fatalf("building flannel-migrate-v3: %v\n%s", err, out)
	}
	hosts := l.Hosts()
	envs := startAll(t, l)
	for _, h := range hosts {
		if !strings.Contains(h.Daemon().Log(), "Using the etcd v2 API") {
			t.Fatalf("%s did not choose v2 with the config only there", h.Name)
		}
	}
	waitRoutes(t, hosts, envs)
	setBridges(t, hosts, envs)
	pingAll(t, hosts, envs)
	p := startPinger(hosts, envs)
	defer p.stop()

	ctx := testCtx(t, 2*converge)
	out, err := hosts[0].Exec(ctx, migrate, "--etcd-endpoints", l.EtcdEndpoint())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("flannel-migrate-v3: %s", strings.TrimSpace(out))

	for i, h := range hosts {
		if code := stop(t, h.Daemon()); code != 0 {
			t.Fatalf("%s exited %d on SIGTERM", h.Name, code)
		}
		startDaemon(t, h)
		env := waitEnv(t, h)
		if env.Subnet != envs[i].Subnet {
			t.Errorf("%s came back on %s, want its subnet %s", h.Name, env.Subnet, envs[i].Subnet)
		}
		log := h.Daemon().Log()
		if !strings.Contains(log, "Using the etcd v3 API") || !strings.Contains(log, "both the etcd v3 and v2") {
			t.Errorf("%s did not choose v3 with a warning about both keyspaces:\n%s", h.Name, log)
		}
	}
	waitRoutes(t, hosts, envs)
	ok, failures := p.stop()
	t.Logf("overlay pings through the migration: %d replies, %d failures", ok, len(failures))
	if len(failures) > 0 {
		t.Errorf("overlay pings failed during the migration:\n%s", strings.Join(failures, "\n"))
	}

	c, err := l.V3Client()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	resp, err := c.Get(ctx, l.EtcdPrefix()+"/subnets/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != len(hosts) {
		t.Errorf("the v3 keyspace holds %d leases, want %d", len(resp.Kvs), len(hosts))
	}
	for _, kv := range resp.Kvs {
		a, err := subnet.ParseLeaseAttrs(kv.Value)
		if err != nil {
			t.Errorf("%s: %v", kv.Key, err)
			continue
		}
		ttl, err := c.TimeToLive(ctx, clientv3.LeaseID(kv.Lease))
		if err != nil || ttl.GrantedTTL != 86400 {
			t.Errorf("%s (%s): etcd lease %+v, %v; want one granted for a day", kv.Key, a.PublicIP, ttl, err)
		}
	}
}
