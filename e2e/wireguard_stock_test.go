package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/flanneld-go/flanneld/e2e/lab"
	"github.com/flanneld-go/flanneld/internal/wgtest"
)

// stockWG is a stock wireguard-go process running device flannel-wg on a
// lab host, in a mount namespace of its own (its own /run/wireguard).
type stockWG struct {
	h   *lab.Host
	cmd *exec.Cmd
	log string
}

// startStockWG runs the stock wireguard-go binary (built from the module
// proxy, see internal/wgtest) in the foreground on h, and waits until wg(8)
// reaches its UAPI socket. The test's cleanup stops it.
func startStockWG(t testing.TB, h *lab.Host, dir string) *stockWG {
	t.Helper()
	bin, err := wgtest.Path(wgtest.Version)
	if err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(dir, h.Name+"-wireguard-go.log")
	f, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd, err := h.ExecPrivate(f, bin, "-f", "flannel-wg")
	if err != nil {
		t.Fatal(err)
	}
	w := &stockWG{h: h, cmd: cmd, log: logPath}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	ctx := testCtx(t, converge)
	waitFor(t, "wireguard-go's UAPI socket on "+h.Name, converge, func() error {
		_, err := h.WG(ctx, cmd.Process.Pid, "show", "flannel-wg")
		return err
	})
	return w
}

// wg runs wg(8) against the stock device.
func (w *stockWG) wg(t testing.TB, args ...string) {
	t.Helper()
	if _, err := w.h.WG(testCtx(t, converge), w.cmd.Process.Pid, args...); err != nil {
		log, _ := os.ReadFile(w.log)
		t.Fatalf("%v\nwireguard-go log:\n%s", err, log)
	}
}

// ip runs ip(8) in the host's namespace.
func hostIP(t testing.TB, h *lab.Host, args ...string) {
	t.Helper()
	if _, err := h.Exec(testCtx(t, converge), append([]string{"ip"}, args...)...); err != nil {
		t.Fatal(err)
	}
}

// TestWireGuardStockPeer: wire compatibility with a WireGuard we did not
// write. host3 runs no flanneld but the stock wireguard-go, configured with
// wg(8) exactly as flannel's kernel backend configures itself from the
// store: its private key and listen port, its lease written by hand in
// flannel v0.28's form, the device's address, MTU and Network route, and one
// peer per other lease. host1 and host2 run our daemon. Every pair pings.
func TestWireGuardStockPeer(t *testing.T) {
	needWG(t)
	l := newLab(t, 3, wgConfig)
	hosts := l.Hosts()
	h3 := hosts[2]
	var envs []lab.SubnetEnv
	for _, h := range hosts[:2] {
		startDaemon(t, h, "--route-resync", "1")
	}
	for _, h := range hosts[:2] {
		envs = append(envs, waitEnv(t, h))
	}
	ctx := testCtx(t, 2*converge)

	// host3's key and lease, as flannel would write them.
	priv, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(h3.KeyFile, []byte(priv.String()), 0o400); err != nil {
		t.Fatal(err)
	}
	sub3 := netip.MustParsePrefix("10.5.250.0/24")
	for _, e := range envs {
		if e.Subnet.Masked() == sub3 {
			t.Skip("a daemon took 10.5.250.0/24 by chance")
		}
	}
	value := fmt.Sprintf(`{"PublicIP":%q,"PublicIPv6":null,"BackendType":"wireguard","BackendData":{"PublicKey":%q,"Port":51820}}`, h3.Addr, priv.PublicKey())
	if _, err := l.KeysAPI().Set(ctx, leaseKey(l, sub3), value, nil); err != nil {
		t.Fatal(err)
	}

	w := startStockWG(t, h3, l.Dir())
	w.wg(t, "set", "flannel-wg", "private-key", h3.KeyFile, "listen-port", "51820")
	mtu, err := linkMTU(h3, "eth0")
	if err != nil {
		t.Fatal(err)
	}
	hostIP(t, h3, "link", "set", "flannel-wg", "mtu", fmt.Sprint(mtu-80))
	hostIP(t, h3, "addr", "add", "10.5.250.0/32", "dev", "flannel-wg")
	hostIP(t, h3, "link", "set", "flannel-wg", "up")
	hostIP(t, h3, "route", "add", "10.5.0.0/16", "dev", "flannel-wg", "scope", "link")
	for i, h := range hosts[:2] {
		v, raw, err := rawLease(ctx, l, envs[i].Subnet.Masked())
		if err != nil {
			t.Fatal(err)
		}
		if v.BackendData.PublicKey == "" || v.BackendData.Port == 0 {
			t.Fatalf("%s lease %s lacks PublicKey or Port", h.Name, raw)
		}
		w.wg(t, "set", "flannel-wg", "peer", v.BackendData.PublicKey,
			"endpoint", fmt.Sprintf("%s:%d", v.PublicIP, v.BackendData.Port),
			"allowed-ips", envs[i].Subnet.Masked().String())
	}

	// Our daemons took host3's hand-written lease as a peer.
	for _, h := range hosts[:2] {
		eventually(t, h.Name+" peer for the stock host", func() error {
			_, _, peers, err := wgDump(ctx, h, h.Daemon().Pid(), "flannel-wg")
			if err != nil {
				return err
			}
			want := wgPeer{Key: priv.PublicKey().String(), PSK: "(none)", Endpoint: h3.Addr.String() + ":51820", AllowedIPs: sub3.String(), Keepalive: "off"}
			if got := peers[want.Key]; got != want {
				return fmt.Errorf("peer %+v, want %+v", got, want)
			}
			return nil
		})
	}

	envs = append(envs, lab.SubnetEnv{Subnet: netip.PrefixFrom(sub3.Addr().Next(), 24)})
	setBridges(t, hosts, envs)
	pingAll(t, hosts, envs)
	out, _ := h3.WG(context.Background(), w.cmd.Process.Pid, "show", "flannel-wg", "latest-handshakes")
	t.Logf("stock wireguard-go on host3, latest handshakes:\n%s", out)
}
