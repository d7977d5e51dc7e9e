package wireguard

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/flanneld-go/flanneld/subnet"
)

func genKey(t *testing.T) wgtypes.Key {
	t.Helper()
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k.PublicKey()
}

func lease(v4, v6, pub, pub6 string, data, data6 string) subnet.Lease {
	l := subnet.Lease{Attrs: subnet.LeaseAttrs{BackendType: "wireguard"}}
	if v4 != "" {
		l.Subnet = netip.MustParsePrefix(v4)
		l.Attrs.PublicIP = netip.MustParseAddr(pub)
		l.Attrs.BackendData = json.RawMessage(data)
	}
	if v6 != "" {
		l.IPv6Subnet = netip.MustParsePrefix(v6)
		l.Attrs.PublicIPv6 = netip.MustParseAddr(pub6)
		l.Attrs.BackendV6Data = json.RawMessage(data6)
	}
	return l
}

func wgData(k wgtypes.Key, port int) string {
	if port == 0 {
		return fmt.Sprintf(`{"PublicKey":%q}`, k)
	}
	return fmt.Sprintf(`{"PublicKey":%q,"Port":%d}`, k, port)
}

// The peers of each device, per mode, as flannel sets them: AllowedIPs the
// subnet(s), endpoint PublicIP (PublicIPv6) with the lease's Port or the
// local listen port, the PSK and keepalive.
func TestDesiredPeers(t *testing.T) {
	k1, k2 := genKey(t), genKey(t)
	psk := genKey(t)
	dual := lease("10.5.1.0/24", "fc00:0:0:1::/64", "192.168.1.1", "2001:db8::1", wgData(k1, 6000), wgData(k1, 6001))
	old := lease("10.5.2.0/24", "", "192.168.1.2", "", wgData(k2, 0), "")
	sep4 := devSpec{name: DeviceName, v4: true, port: 51820}
	sep6 := devSpec{name: DeviceNameV6, v6: true, port: 51821}
	one := devSpec{name: DeviceName, v4: true, v6: true, port: 51820}
	ap := netip.MustParseAddrPort
	pf := netip.MustParsePrefix
	for _, c := range []struct {
		name string
		mode Mode
		spec devSpec
		want map[wgtypes.Key]peer
	}{
		{"separate v4", ModeSeparate, sep4, map[wgtypes.Key]peer{
			k1: {endpoint: ap("192.168.1.1:6000"), allowed: [2]netip.Prefix{pf("10.5.1.0/24")}},
			k2: {endpoint: ap("192.168.1.2:51820"), allowed: [2]netip.Prefix{pf("10.5.2.0/24")}},
		}},
		{"separate v6", ModeSeparate, sep6, map[wgtypes.Key]peer{
			k1: {endpoint: ap("[2001:db8::1]:6001"), allowed: [2]netip.Prefix{pf("fc00:0:0:1::/64")}},
		}},
		{"ipv4", ModeIPv4, one, map[wgtypes.Key]peer{
			k1: {endpoint: ap("192.168.1.1:6000"), allowed: [2]netip.Prefix{pf("10.5.1.0/24"), pf("fc00:0:0:1::/64")}},
			k2: {endpoint: ap("192.168.1.2:51820"), allowed: [2]netip.Prefix{pf("10.5.2.0/24")}},
		}},
		{"ipv6", ModeIPv6, one, map[wgtypes.Key]peer{
			k1: {endpoint: ap("[2001:db8::1]:6001"), allowed: [2]netip.Prefix{pf("10.5.1.0/24"), pf("fc00:0:0:1::/64")}},
		}},
		{"auto: private IPv4, public IPv6 on both ends", ModeAuto, one, map[wgtypes.Key]peer{
			k1: {endpoint: ap("[2001:db8::1]:6001"), allowed: [2]netip.Prefix{pf("10.5.1.0/24"), pf("fc00:0:0:1::/64")}},
			k2: {endpoint: ap("192.168.1.2:51820"), allowed: [2]netip.Prefix{pf("10.5.2.0/24")}},
		}},
	} {
		tab := peerTable{mode: c.mode, psk: psk, ka: 25 * time.Second, ownV4: true, ownV6: true, ownV6Public: true}
		want, skipped := map[wgtypes.Key]peer{}, map[netip.Prefix]string{}
		tab.desired(c.spec, []subnet.Lease{dual, old}, want, skipped)
		for k, p := range c.want {
			p.psk, p.keepalive = psk, 25*time.Second
			c.want[k] = p
		}
		if fmt.Sprint(want) != fmt.Sprint(c.want) {
			t.Errorf("%s:\n got %v\nwant %v", c.name, want, c.want)
		}
		if c.name == "ipv6" {
			if why := skipped[pf("10.5.2.0/24")]; why != "it has no IPv6 PublicIPv6 to reach it at" {
				t.Errorf("ipv6 mode, IPv4-only lease: skipped because %q", why)
			}
		} else if len(skipped) != 0 {
			t.Errorf("%s: skipped %v", c.name, skipped)
		}
	}
}

// A lease whose data is not wireguard's is skipped with its reason; two
// leases with one key give one peer, the later lease's.
func TestDesiredPeersBadData(t *testing.T) {
	k := genKey(t)
	later := lease("10.5.3.0/24", "", "192.168.1.3", "", wgData(k, 0), "")
	later.Expiration = time.Now().Add(time.Hour)
	leases := []subnet.Lease{
		lease("10.5.1.0/24", "", "192.168.1.1", "", `{"VtepMAC":"aa:bb:cc:dd:ee:ff"}`, ""),
		lease("10.5.2.0/24", "", "192.168.1.2", "", `"x"`, ""),
		lease("10.5.4.0/24", "", "192.168.1.4", "", wgData(k, 0), ""),
		later,
	}
	tab := peerTable{mode: ModeSeparate}
	want, skipped := map[wgtypes.Key]peer{}, map[netip.Prefix]string{}
	tab.desired(devSpec{name: DeviceName, v4: true, port: 51820}, leases, want, skipped)
	if len(want) != 1 || want[k].allowed[0] != later.Subnet {
		t.Errorf("peers %v, want only %s for the duplicated key", want, later.Subnet)
	}
	for _, s := range []string{"10.5.1.0/24", "10.5.2.0/24", "10.5.4.0/24"} {
		if skipped[netip.MustParsePrefix(s)] == "" {
			t.Errorf("lease %s not reported as skipped (%v)", s, skipped)
		}
	}
}

// fakeWG is a WireGuard device's configuration as a map, as wgctrl would
// apply the changes.
type fakeWG struct {
	key   wgtypes.Key
	port  int
	peers map[wgtypes.Key]wgtypes.Peer
	calls int
	fail  map[wgtypes.Key]bool
}

func (f *fakeWG) Device(name string) (*wgtypes.Device, error) {
	d := &wgtypes.Device{Name: name, PrivateKey: f.key, ListenPort: f.port}
	for _, p := range f.peers {
		d.Peers = append(d.Peers, p)
	}
	return d, nil
}

func (f *fakeWG) ConfigureDevice(name string, c wgtypes.Config) error {
	f.calls++
	if c.PrivateKey != nil {
		f.key = *c.PrivateKey
	}
	if c.ListenPort != nil {
		f.port = *c.ListenPort
	}
	for _, pc := range c.Peers {
		if f.fail[pc.PublicKey] {
			return fmt.Errorf("refused")
		}
		if pc.Remove {
			delete(f.peers, pc.PublicKey)
			continue
		}
		p := f.peers[pc.PublicKey]
		p.PublicKey = pc.PublicKey
		if pc.Endpoint != nil {
			p.Endpoint = pc.Endpoint
		}
		if pc.PresharedKey != nil {
			p.PresharedKey = *pc.PresharedKey
		}
		if pc.PersistentKeepaliveInterval != nil {
			p.PersistentKeepaliveInterval = *pc.PersistentKeepaliveInterval
		}
		if pc.ReplaceAllowedIPs {
			p.AllowedIPs = nil
		}
		p.AllowedIPs = append(p.AllowedIPs, pc.AllowedIPs...)
		f.peers[pc.PublicKey] = p
	}
	return nil
}

// Reconciling is a diff of the desired peers against the dumped ones: a
// second run changes nothing, a peer removed by hand comes back, a changed
// endpoint is updated, a stale peer goes, and one refused peer does not stop
// the others.
func TestReconcilePeers(t *testing.T) {
	priv, _ := wgtypes.GeneratePrivateKey()
	k1, k2, stale := genKey(t), genKey(t), genKey(t)
	f := &fakeWG{peers: map[wgtypes.Key]wgtypes.Peer{stale: {PublicKey: stale}}}
	want := map[wgtypes.Key]peer{
		k1: {endpoint: netip.MustParseAddrPort("192.168.1.1:51820"), allowed: [2]netip.Prefix{netip.MustParsePrefix("10.5.1.0/24")}, keepalive: 25 * time.Second},
		k2: {endpoint: netip.MustParseAddrPort("[2001:db8::2]:51821"), allowed: [2]netip.Prefix{netip.MustParsePrefix("10.5.2.0/24"), netip.MustParsePrefix("fc00::/64")}},
	}
	have := map[wgtypes.Key]peer{}
	c, err := reconcilePeers(f, DeviceName, priv, 51820, want, have, nil)
	if err != nil || c.Added != 2 || c.Removed != 1 || f.key != priv || f.port != 51820 {
		t.Fatalf("first: %+v %v key set %v port %d", c, err, f.key == priv, f.port)
	}
	f.calls = 0
	if c, err := reconcilePeers(f, DeviceName, priv, 51820, want, have, nil); err != nil || c.Any() || f.calls != 0 {
		t.Errorf("second: %+v %v, %d calls; want nothing to do", c, err, f.calls)
	}
	delete(f.peers, k1) // wg set flannel-wg peer k1 remove
	if c, err := reconcilePeers(f, DeviceName, priv, 51820, want, have, nil); err != nil || c.Added != 1 {
		t.Errorf("after removing a peer by hand: %+v %v", c, err)
	}
	if _, ok := f.peers[k1]; !ok {
		t.Error("the peer removed by hand did not come back")
	}
	p := want[k2]
	p.endpoint = netip.MustParseAddrPort("[2001:db8::3]:51821")
	want[k2] = p
	f.fail = map[wgtypes.Key]bool{k1: true}
	delete(f.peers, k1)
	c, err = reconcilePeers(f, DeviceName, priv, 51820, want, have, nil)
	if err == nil || c.Failed != 1 || c.Updated != 1 || f.peers[k2].Endpoint.String() != "[2001:db8::3]:51821" {
		t.Errorf("one refused peer: %+v %v, k2 endpoint %v", c, err, f.peers[k2].Endpoint)
	}
}
