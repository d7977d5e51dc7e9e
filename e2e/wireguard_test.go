package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/flanneld-go/flanneld/e2e/lab"
)

const wgConfig = `{"Network":"10.5.0.0/16","Backend":{"Type":"wireguard"}}`

// needWG skips a test that configures or reads WireGuard with wg(8) when
// wireguard-tools is missing (CI installs it).
func needWG(tb testing.TB) {
	tb.Helper()
	if _, err := exec.LookPath("wg"); err != nil {
		tb.Skip("wg (wireguard-tools) is not installed: apt-get install -y wireguard-tools")
	}
}

// wgLease is a wireguard lease as another node reads it from etcd.
type wgLease struct {
	PublicIP    string
	PublicIPv6  string
	BackendType string
	BackendData struct {
		PublicKey string
		Port      int
	}
	BackendV6Data *struct {
		PublicKey string
		Port      int
	}
}

// rawLease reads and parses the lease value of subnet p.
func rawLease(ctx context.Context, l *lab.Lab, p netip.Prefix) (wgLease, string, error) {
	resp, err := l.KeysAPI().Get(ctx, leaseKey(l, p), nil)
	if err != nil {
		return wgLease{}, "", err
	}
	var v wgLease
	err = json.Unmarshal([]byte(resp.Node.Value), &v)
	return v, resp.Node.Value, err
}

// wgPeer is one peer line of `wg show <dev> dump`.
type wgPeer struct {
	Key, PSK, Endpoint, AllowedIPs, Keepalive string
}

// wgDump runs wg show dev dump in the daemon's (or wireguard-go's) mount
// namespace and returns the device's public key, listen port and peers.
func wgDump(ctx context.Context, h *lab.Host, pid int, dev string) (pub, port string, peers map[string]wgPeer, err error) {
	out, err := h.WG(ctx, pid, "show", dev, "dump")
	if err != nil {
		return "", "", nil, err
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	f := strings.Split(lines[0], "\t")
	if len(f) != 4 {
		return "", "", nil, fmt.Errorf("wg show %s dump: first line %q", dev, lines[0])
	}
	peers = map[string]wgPeer{}
	for _, ln := range lines[1:] {
		p := strings.Split(ln, "\t")
		if len(p) != 8 {
			return "", "", nil, fmt.Errorf("wg show %s dump: peer line %q", dev, ln)
		}
		peers[p[0]] = wgPeer{Key: p[0], PSK: p[1], Endpoint: p[2], AllowedIPs: p[3], Keepalive: p[7]}
	}
	return f[1], f[2], peers, nil
}

// checkWGDevice checks a device as flannel programs it: the MTU, the
// address (the subnet's first address, /32 or /128), up, and the route for
// the whole network via the device with scope link.
func checkWGDevice(h *lab.Host, dev string, mtu int, sub, network netip.Prefix) error {
	return withNetlink(h, func(nh *netlink.Handle) error {
		l, err := nh.LinkByName(dev)
		if err != nil {
			return fmt.Errorf("%s: %w", dev, err)
		}
		if l.Attrs().MTU != mtu {
			return fmt.Errorf("%s MTU %d, want %d", dev, l.Attrs().MTU, mtu)
		}
		if l.Attrs().Flags&(1<<0) == 0 { // net.FlagUp
			return fmt.Errorf("%s is down", dev)
		}
		fam, bits := netlink.FAMILY_V4, 32
		if sub.Addr().Is6() {
			fam, bits = netlink.FAMILY_V6, 128
		}
		addrs, err := nh.AddrList(l, fam)
		if err != nil {
			return err
		}
		var got []string
		for _, a := range addrs {
			if a.IP.IsLinkLocalUnicast() {
				continue
			}
			got = append(got, a.IPNet.String())
		}
		want := netip.PrefixFrom(sub.Masked().Addr(), bits).String()
		if len(got) != 1 || got[0] != want {
			return fmt.Errorf("%s addresses %v, want [%s]", dev, got, want)
		}
		routes, err := nh.RouteList(l, fam)
		if err != nil {
			return err
		}
		for _, r := range routes {
			// IPv6 routes have no scope (the kernel shows universe).
			if r.Dst != nil && r.Dst.String() == network.String() && (r.Scope == netlink.SCOPE_LINK || fam == netlink.FAMILY_V6) && r.Gw == nil {
				return nil
			}
		}
		return fmt.Errorf("%s has no route %s scope link (routes %v)", dev, network, routes)
	})
}

// TestWireGuard runs three hosts on the wireguard backend (userspace here:
// this kernel has no WireGuard): subnet.env (MTU = eth0 - 80), the leases
// in flannel's form, the device, its peers as wg(8) shows them, pings
// between every pair, no plaintext on the underlay, a peer removed by hand
// and a device deleted by hand put back, and the same public key after a
// restart.
func TestWireGuard(t *testing.T) {
	needWG(t)
	l := newLab(t, 3, wgConfig)
	hosts := l.Hosts()
	envs := startAll(t, l, "--route-resync", "1")
	ctx := testCtx(t, 2*converge)
	network := netip.MustParsePrefix("10.5.0.0/16")
	keys := map[string]string{}
	for i, h := range hosts {
		mtu, err := linkMTU(h, "eth0")
		if err != nil {
			t.Fatal(err)
		}
		if envs[i].MTU != mtu-80 {
			t.Errorf("%s: FLANNEL_MTU %d, want eth0 %d - 80", h.Name, envs[i].MTU, mtu)
		}
		v, raw, err := rawLease(ctx, l, envs[i].Subnet.Masked())
		if err != nil {
			t.Fatal(err)
		}
		if v.BackendType != "wireguard" || v.BackendData.Port != 51820 || v.PublicIP != h.Addr.String() || v.BackendV6Data != nil {
			t.Errorf("%s: lease %s", h.Name, raw)
		}
		// The published key is the key file's.
		data, err := os.ReadFile(h.KeyFile)
		if err != nil {
			t.Fatal(err)
		}
		priv, err := wgtypes.ParseKey(string(data))
		if err != nil || priv.PublicKey().String() != v.BackendData.PublicKey {
			t.Errorf("%s: lease PublicKey %s is not the key file's (%v)", h.Name, v.BackendData.PublicKey, err)
		}
		if fi, err := os.Stat(h.KeyFile); err != nil || fi.Mode().Perm() != 0o400 {
			t.Errorf("%s: key file mode %v (%v), want 0400", h.Name, fi.Mode().Perm(), err)
		}
		keys[h.Name] = v.BackendData.PublicKey
		if log := h.Daemon().Log(); !strings.Contains(log, "WireGuard data path chosen") || !strings.Contains(log, `path="userspace wireguard-go"`) {
			t.Errorf("%s: the log does not say which data path was chosen:\n%s", h.Name, log)
		}
	}
	for i, h := range hosts {
		eventually(t, h.Name+" device and peers", func() error {
			if err := checkWGDevice(h, "flannel-wg", envs[i].MTU, envs[i].Subnet, network); err != nil {
				return err
			}
			pub, port, peers, err := wgDump(ctx, h, h.Daemon().Pid(), "flannel-wg")
			if err != nil {
				return err
			}
			if pub != keys[h.Name] || port != "51820" {
				return fmt.Errorf("device key %s port %s, want %s 51820", pub, port, keys[h.Name])
			}
			if len(peers) != 2 {
				return fmt.Errorf("%d peers, want 2: %v", len(peers), peers)
			}
			for j, o := range hosts {
				if i == j {
					continue
				}
				want := wgPeer{Key: keys[o.Name], PSK: "(none)", Endpoint: o.Addr.String() + ":51820", AllowedIPs: envs[j].Subnet.Masked().String(), Keepalive: "off"}
				if got := peers[keys[o.Name]]; got != want {
					return fmt.Errorf("peer of %s %+v, want %+v", o.Name, got, want)
				}
			}
			return nil
		})
	}
	// wireguard-go's TUN carries the virtio header: segmentation offloads.
	if out, err := hosts[0].Exec(ctx, "ip", "-d", "link", "show", "flannel-wg"); err != nil || !strings.Contains(out, "vnet_hdr on") {
		t.Errorf("flannel-wg is not a TUN with vnet_hdr on (%v):\n%s", err, out)
	}
	setBridges(t, hosts, envs)
	pingAll(t, hosts, envs)

	// Encrypted: a marker sent between the hosts' bridges never shows on
	// the LAN, while the same marker sent in the clear does (so the
	// capture would see it).
	capt, err := startCapture(l.LANNamespace())
	if err != nil {
		t.Fatal(err)
	}
	marker := fmt.Sprintf("flannel-wg-marker-%d", time.Now().UnixNano())
	for range 5 {
		if _, err := hosts[0].Exec(ctx, "bash", "-c", fmt.Sprintf("echo %s > /dev/udp/%s/9999", marker, envs[1].Subnet.Addr())); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(300 * time.Millisecond)
	overlay := capt.stop()
	if bytes.Contains(overlay.data, []byte(marker)) {
		t.Errorf("the marker sent through the overlay shows in the clear on the LAN")
	}
	if overlay.wgFrames == 0 {
		t.Errorf("the capture saw no WireGuard datagram (UDP port 51820) on the LAN: %d frames", overlay.frames)
	}
	capt, err = startCapture(l.LANNamespace())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := hosts[0].Exec(ctx, "bash", "-c", fmt.Sprintf("echo %s > /dev/udp/%s/9999", marker, hosts[1].Addr)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	if clear := capt.stop(); !bytes.Contains(clear.data, []byte(marker)) {
		t.Errorf("control: the marker sent in the clear on the LAN was not captured (%d frames)", clear.frames)
	}
	t.Logf("capture: %d frames, %d WireGuard datagrams, marker in the clear only in the control", overlay.frames, overlay.wgFrames)

	// A peer removed by hand comes back at the next resync.
	h1 := hosts[0]
	if _, err := h1.WG(ctx, h1.Daemon().Pid(), "set", "flannel-wg", "peer", keys["host2"], "remove"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the peer removed by hand back", func() error {
		_, _, peers, err := wgDump(ctx, h1, h1.Daemon().Pid(), "flannel-wg")
		if err != nil {
			return err
		}
		if _, ok := peers[keys["host2"]]; !ok {
			return errors.New("host2's peer still missing")
		}
		return nil
	})
	if err := h1.WaitPing(ctx, envs[0].Subnet.Addr(), envs[1].Subnet.Addr()); err != nil {
		t.Error(err)
	}

	// A device deleted by hand is created again at the next resync, with
	// its peers; traffic flows again.
	h2 := hosts[1]
	if _, err := h2.Exec(ctx, "ip", "link", "del", "flannel-wg"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "host2's device back", func() error {
		return checkWGDevice(h2, "flannel-wg", envs[1].MTU, envs[1].Subnet, network)
	})
	if err := h1.WaitPing(ctx, envs[0].Subnet.Addr(), envs[1].Subnet.Addr()); err != nil {
		t.Error(err)
	}
	if log := h2.Daemon().Log(); !strings.Contains(log, "Created the WireGuard device again") {
		t.Errorf("host2's log does not say it created the device again:\n%s", log)
	}

	// A restart keeps the key: the same lease data, the same key file.
	before, _ := os.ReadFile(h1.KeyFile)
	if code := stop(t, h1.Daemon()); code != 0 {
		t.Fatalf("exit code %d", code)
	}
	startDaemon(t, h1, "--route-resync", "1", "-v", "4") // -v 4: wireguard-go's messages
	env := waitEnv(t, h1)
	after, _ := os.ReadFile(h1.KeyFile)
	if !bytes.Equal(before, after) {
		t.Error("the key file changed across the restart")
	}
	v, raw, err := rawLease(ctx, l, env.Subnet.Masked())
	if err != nil || v.BackendData.PublicKey != keys["host1"] {
		t.Errorf("after the restart: lease %s (%v), want PublicKey %s", raw, err, keys["host1"])
	}
	// The restarted host lost its sessions with the TUN: it starts a
	// handshake with every peer itself, before it has any traffic (else a
	// peer that only sends to it would keep using the old session until
	// WireGuard gives up on it).
	eventually(t, "handshakes started by the restarted host", func() error {
		log := h1.Daemon().Log()
		for _, o := range hosts[1:] {
			k := keys[o.Name]
			tag := "peer(" + k[:4] + "…" + k[39:43] + ") - Sending handshake initiation"
			if !strings.Contains(log, tag) {
				return fmt.Errorf("the log lacks %q", tag)
			}
		}
		out, err := h1.WG(ctx, h1.Daemon().Pid(), "show", "flannel-wg", "latest-handshakes")
		if err != nil {
			return err
		}
		n := 0
		for _, ln := range strings.Split(strings.TrimSpace(out), "\n") {
			if f := strings.Fields(ln); len(f) == 2 && f[1] != "0" {
				n++
			}
		}
		if n != 2 {
			return fmt.Errorf("%d of 2 peers have a handshake:\n%s", n, out)
		}
		return nil
	})
	if err := h1.SetBridgeAddr(env.Subnet); err != nil {
		t.Fatal(err)
	}
	pingAll(t, hosts, []lab.SubnetEnv{env, envs[1], envs[2]})
	checkPeersSettled(t, hosts)
}

// checkPeersSettled checks that the peers read back from the devices equal
// the ones set: with --route-resync 1 a difference in form (an address, a
// key, a keepalive read back otherwise than set) would update every peer at
// every resync.
func checkPeersSettled(t *testing.T, hosts []*lab.Host) {
	t.Helper()
	for _, h := range hosts {
		for _, ln := range strings.Split(h.Daemon().Log(), "\n") {
			if strings.Contains(ln, "Reconciled WireGuard peers") && !strings.Contains(ln, "updated=0") {
				t.Errorf("%s: a peer was updated although no lease changed: %s", h.Name, ln)
			}
		}
	}
}

// TestWireGuardDualStack runs three hosts with IPv4 and IPv6 (two devices,
// flannel-wg and flannel-wg-v6) and IPv6 only (flannel-wg-v6 alone): ping
// and ping -6 between every pair.
func TestWireGuardDualStack(t *testing.T) {
	needWG(t)
	for _, tc := range []struct {
		name string
		v4   bool
		mode string
	}{
		{"dual-stack", true, "separate"},
		{"ipv6-only", false, "separate"},
		{"dual-stack-one-device", true, "ipv4"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := fmt.Sprintf(`{"EnableIPv4":%t,"EnableIPv6":true,"IPv6Network":"fc00:5::/48","Backend":{"Type":"wireguard","Mode":%q}`, tc.v4, tc.mode)
			if tc.v4 {
				cfg += `,"Network":"10.5.0.0/16"`
			}
			cfg += "}"
			l := newLabWith(t, lab.Options{Hosts: 3, LAN6: netip.MustParsePrefix("fd5e::/64")}, cfg)
			hosts := l.Hosts()
			envs := startAll(t, l, "--route-resync", "1")
			ctx := testCtx(t, 2*converge)
			v6dev := "flannel-wg-v6"
			if tc.mode != "separate" {
				v6dev = "flannel-wg"
			}
			for i, h := range hosts {
				if tc.v4 {
					if err := h.SetBridgeAddr(envs[i].Subnet); err != nil {
						t.Fatal(err)
					}
				}
				if err := h.SetBridgeAddr(envs[i].IPv6Subnet); err != nil {
					t.Fatal(err)
				}
				eventually(t, h.Name+" "+v6dev, func() error {
					return checkWGDevice(h, v6dev, envs[i].MTU, envs[i].IPv6Subnet, netip.MustParsePrefix("fc00:5::/48"))
				})
				if !tc.v4 {
					if err := withNetlink(h, func(nh *netlink.Handle) error {
						if _, err := nh.LinkByName("flannel-wg"); err == nil {
							return errors.New("flannel-wg exists on an IPv6-only host")
						}
						return nil
					}); err != nil {
						t.Error(err)
					}
				}
			}
			pairs := 0
			for i, from := range hosts {
				for j := range hosts {
					if i == j {
						continue
					}
					if tc.v4 {
						if err := from.WaitPing(ctx, envs[i].Subnet.Addr(), envs[j].Subnet.Addr()); err != nil {
							t.Errorf("ping %s -> %s: %v", from.Name, hosts[j].Name, err)
							continue
						}
					}
					if err := from.WaitPing(ctx, envs[i].IPv6Subnet.Addr(), envs[j].IPv6Subnet.Addr()); err != nil {
						t.Errorf("ping -6 %s -> %s: %v", from.Name, hosts[j].Name, err)
						continue
					}
					pairs++
				}
			}
			t.Logf("%s: %d/6 pairs", tc.name, pairs)
			time.Sleep(1500 * time.Millisecond) // a resync or two more (--route-resync 1)
			checkPeersSettled(t, hosts)
			// The IPv6 peers are reached at [PublicIPv6]:ListenPortV6 (separate)
			// or PublicIP:ListenPort (ipv4 mode).
			h := hosts[0]
			_, _, peers, err := wgDump(ctx, h, h.Daemon().Pid(), v6dev)
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range peers {
				wantPort := "]:51821"
				if tc.mode != "separate" {
					wantPort = ":51820" // ipv4 mode: the peers' PublicIP and ListenPort
				}
				if !strings.HasSuffix(p.Endpoint, wantPort) {
					t.Errorf("peer %+v: endpoint does not end in %s", p, wantPort)
				}
			}
		})
	}
}

// TestWireGuardBadInput: a key file that holds no key and a bad Backend key
// each stop the start with one line naming the problem; the key file is
// left as it was.
func TestWireGuardBadInput(t *testing.T) {
	for _, tc := range []struct {
		name, cfg, key string
		want           []string
	}{
		{"key file", wgConfig, "not a key\n", []string{"private key file", "wgkey", "holds no WireGuard private key", "remove the file"}},
		{"Mode", `{"Network":"10.5.0.0/16","Backend":{"Type":"wireguard","Mode":"both"}}`, "", []string{`Mode "both" is not known`}},
		{"ListenPort", `{"Network":"10.5.0.0/16","Backend":{"Type":"wireguard","ListenPort":0}}`, "", []string{"ListenPort 0 is out of range"}},
		{"PSK", `{"Network":"10.5.0.0/16","Backend":{"Type":"wireguard","PSK":"nope"}}`, "", []string{"PSK is not a WireGuard key"}},
		{"PersistentKeepaliveInterval", `{"Network":"10.5.0.0/16","Backend":{"Type":"wireguard","PersistentKeepaliveInterval":-1}}`, "", []string{"PersistentKeepaliveInterval -1 is out of range"}},
		{"MTU", `{"Network":"10.5.0.0/16","Backend":{"Type":"wireguard","MTU":"big"}}`, "", []string{`MTU "big" is not a number`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newLab(t, 1, tc.cfg)
			h := l.Host(1)
			if tc.key != "" {
				if err := os.WriteFile(h.KeyFile, []byte(tc.key), 0o400); err != nil {
					t.Fatal(err)
				}
			}
			d := startDaemon(t, h)
			code := waitExit(t, d)
			checkFailedStart(testCtx(t, converge), t, l, h, code, d.Log(), tc.want)
			if tc.key != "" {
				if data, _ := os.ReadFile(h.KeyFile); string(data) != tc.key {
					t.Errorf("the bad key file was changed to %q", data)
				}
			}
		})
	}
}

// capture is what an AF_PACKET socket saw on every interface of a
// namespace.
type capture struct {
	data     []byte // every frame, concatenated
	frames   int
	wgFrames int // UDP datagrams to or from port 51820
}

type capturer struct {
	fd   int
	mu   sync.Mutex
	res  capture
	done chan struct{}
}

// startCapture opens an AF_PACKET socket in the named namespace and
// collects frames until stop.
func startCapture(ns string) (*capturer, error) {
	fd, err := inNamespace(ns, func() (int, error) {
		return unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
	})
	if err != nil {
		return nil, fmt.Errorf("opening a packet socket in %s: %w", ns, err)
	}
	tv := unix.Timeval{Usec: 100000}
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, err
	}
	c := &capturer{fd: fd, done: make(chan struct{})}
	go c.loop()
	return c, nil
}

func (c *capturer) loop() {
	buf := make([]byte, 65536)
	for {
		select {
		case <-c.done:
			return
		default:
		}
		n, _, err := unix.Recvfrom(c.fd, buf, 0)
		if err != nil || n <= 0 {
			continue
		}
		c.mu.Lock()
		c.res.frames++
		c.res.data = append(c.res.data, buf[:n]...)
		if isWGFrame(buf[:n]) {
			c.res.wgFrames++
		}
		c.mu.Unlock()
	}
}

// isWGFrame reports whether an Ethernet frame is an IPv4 or IPv6 UDP
// datagram with port 51820 at either end.
func isWGFrame(f []byte) bool {
	if len(f) < 14 {
		return false
	}
	et, p := uint16(f[12])<<8|uint16(f[13]), f[14:]
	var udp []byte
	switch {
	case et == 0x0800 && len(p) >= 20 && p[9] == unix.IPPROTO_UDP:
		udp = p[int(p[0]&0xf)*4:]
	case et == 0x86dd && len(p) >= 40 && p[6] == unix.IPPROTO_UDP:
		udp = p[40:]
	}
	if len(udp) < 4 {
		return false
	}
	sp, dp := uint16(udp[0])<<8|uint16(udp[1]), uint16(udp[2])<<8|uint16(udp[3])
	return sp == 51820 || dp == 51820
}

func (c *capturer) stop() capture {
	close(c.done)
	time.Sleep(150 * time.Millisecond) // the loop wakes within its timeout
	unix.Close(c.fd)
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.res
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// inNamespace runs fn on a thread switched into the named namespace, so
// that a socket it creates belongs to that namespace.
func inNamespace[T any](ns string, fn func() (T, error)) (T, error) {
	var zero T
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return zero, err
	}
	defer orig.Close()
	target, err := netns.GetFromPath("/run/netns/" + ns)
	if err != nil {
		runtime.UnlockOSThread()
		return zero, err
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		runtime.UnlockOSThread()
		return zero, err
	}
	v, ferr := fn()
	if err := netns.Set(orig); err != nil {
		// The thread stays in the wrong namespace: let it die with the
		// goroutine rather than serve others.
		return v, errors.Join(ferr, err)
	}
	runtime.UnlockOSThread()
	return v, ferr
}
