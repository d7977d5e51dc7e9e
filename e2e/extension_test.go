package e2e

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/flanneld-go/flanneld/e2e/lab"
)

// extensionConfig is an overlay made only of commands: each node publishes
// its eth0 MAC (PreStartupCommand), routes each peer's subnet via the
// peer's PUBLIC_IP on the shared LAN (SubnetAddCommand) and deletes that
// route when the peer's lease goes (SubnetRemoveCommand).
const extensionConfig = `{"Network":"10.5.0.0/16","Backend":{"Type":"extension",
	"PreStartupCommand":"cat /sys/class/net/eth0/address",
	"SubnetAddCommand":"ip route replace $SUBNET via ${PUBLIC_IP}",
	"SubnetRemoveCommand":"ip route del $SUBNET via $PUBLIC_IP"}}`

// TestExtension: three hosts on the extension backend publish their
// PreStartupCommand's output as BackendData, the commands route every pair
// (6/6 pings), and a removed lease takes its route away on the others.
func TestExtension(t *testing.T) {
	t.Parallel()
	l := newLab(t, 3, extensionConfig)
	ctx := testCtx(t, 2*time.Minute)
	hosts := l.Hosts()
	envs := startAll(t, l)
	for i, h := range hosts {
		raw, err := l.KeysAPI().Get(ctx, leaseKey(l, envs[i].Subnet.Masked()), nil)
		if err != nil {
			t.Fatal(err)
		}
		mac, err := h.Exec(ctx, "cat", "/sys/class/net/eth0/address")
		if err != nil {
			t.Fatal(err)
		}
		data, _ := json.Marshal(strings.TrimSpace(mac))
		want := fmt.Sprintf(`{"PublicIP":"%s","BackendType":"extension","BackendData":%s}`, h.Addr, data)
		if raw.Node.Value != want {
			t.Errorf("%s lease = %s, want %s", h.Name, raw.Node.Value, want)
		}
		mtu, err := linkMTU(h, lab.ExternalIface)
		if err != nil {
			t.Fatal(err)
		}
		if envs[i].MTU != mtu {
			t.Errorf("%s FLANNEL_MTU = %d, want eth0's MTU %d", h.Name, envs[i].MTU, mtu)
		}
	}
	waitRoutes(t, hosts, envs)
	for i, h := range hosts {
		if err := h.SetBridgeAddr(envs[i].Subnet); err != nil {
			t.Fatal(err)
		}
	}
	pingAll(t, hosts, envs)
	if t.Failed() {
		t.FailNow()
	}

	// host3 leaves: its daemon stops (its route stays where it was put) and
	// its lease is deleted; hosts 1 and 2 run SubnetRemoveCommand.
	stop(t, l.Host(3).Daemon())
	if _, err := l.KeysAPI().Delete(ctx, leaseKey(l, envs[2].Subnet.Masked()), nil); err != nil {
		t.Fatal(err)
	}
	for i, h := range hosts[:2] {
		want := wantRoutes(hosts[:2], envs[:2], i)
		eventually(t, "host3's route removed on "+h.Name, func() error { return routesAre(h, want) })
	}
}

// TestAlloc: a node on the alloc backend holds a lease like flannel's alloc
// node (PublicIP only: no BackendType, no BackendData, byte for byte what a
// flannel udp node writes), writes subnet.env with eth0's MTU, programs no
// route or device, and acquires its lease again when it is deleted. Nodes
// of another backend (here vxlan, after the config changed) skip its lease
// as one of type none (udp); a udp node admits it as a udp peer, as
// flannel's udp backend does (agent's TestAdmission: the udp row).
func TestAlloc(t *testing.T) {
	t.Parallel()
	l := newLab(t, 3, `{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}`)
	ctx := testCtx(t, 2*time.Minute)
	h1 := l.Host(1)
	startDaemon(t, h1)
	env := waitEnv(t, h1)
	key := leaseKey(l, env.Subnet.Masked())
	raw, err := l.KeysAPI().Get(ctx, key, nil)
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf(`{"PublicIP":"%s"}`, h1.Addr); raw.Node.Value != want {
		t.Errorf("alloc lease = %s, want %s", raw.Node.Value, want)
	}
	if raw.Node.TTL <= 0 {
		t.Errorf("alloc lease has TTL %d, want the lease TTL", raw.Node.TTL)
	}
	mtu, err := linkMTU(h1, lab.ExternalIface)
	if err != nil {
		t.Fatal(err)
	}
	if env.MTU != mtu {
		t.Errorf("FLANNEL_MTU = %d, want eth0's MTU %d", env.MTU, mtu)
	}
	noOverlay := func() error {
		if rs, err := overlayRoutes(h1); err != nil || len(rs) != 0 {
			return fmt.Errorf("alloc node has overlay routes %v (%v), want none", rs, err)
		}
		out, err := h1.Exec(ctx, "ip", "-o", "link")
		if err != nil {
			return err
		}
		if strings.Contains(out, "flannel") {
			return fmt.Errorf("alloc node has a flannel device:\n%s", out)
		}
		return nil
	}
	if err := noOverlay(); err != nil {
		t.Error(err)
	}

	// Its lease deleted, it acquires one again (the same subnet: the one
	// its subnet.env names is free).
	if _, err := l.KeysAPI().Delete(ctx, key, nil); err != nil {
		t.Fatal(err)
	}
	eventually(t, "alloc lease acquired again", func() error {
		leases, err := readLeases(ctx, l)
		if err != nil {
			return err
		}
		if mine := leasesOf(leases, h1); len(mine) != 1 || mine[0].BackendType != "" {
			return fmt.Errorf("host1 holds %v", mine)
		}
		return nil
	})

	// vxlan nodes (the config changed under the running alloc node) route
	// each other and skip the alloc node's lease.
	if err := l.SetConfig(ctx, vxlanConfig); err != nil {
		t.Fatal(err)
	}
	h2, h3 := l.Host(2), l.Host(3)
	startDaemon(t, h2)
	startDaemon(t, h3)
	e2, e3 := waitEnv(t, h2), waitEnv(t, h3)
	for _, h := range []*lab.Host{h2, h3} {
		eventually(t, h.Name+" skips the alloc lease", func() error {
			if log := h.Daemon().Log(); !strings.Contains(log, "backend type is none (udp)") {
				return fmt.Errorf("no skip line for the alloc lease in %s's log", h.Name)
			}
			return nil
		})
		rs, err := overlayRoutes(h)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rs {
			if r.Dst.Overlaps(env.Subnet.Masked()) {
				t.Errorf("%s routes the alloc node's subnet: %v", h.Name, r)
			}
		}
	}
	for _, h := range []*lab.Host{h2, h3} {
		if err := h.SetBridgeAddr(map[*lab.Host]netip.Prefix{h2: e2.Subnet, h3: e3.Subnet}[h]); err != nil {
			t.Fatal(err)
		}
	}
	pingAll(t, []*lab.Host{h2, h3}, []lab.SubnetEnv{e2, e3})
	if err := noOverlay(); err != nil {
		t.Error(err)
	}
}
