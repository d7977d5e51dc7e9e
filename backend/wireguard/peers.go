package wireguard

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/subnet"
)

// leaseData is the BackendData (and BackendV6Data) of a wireguard lease.
// Port is absent (0) in leases of older flannel: the peer listens on the
// local listen port then.
type leaseData struct {
	PublicKey string
	Port      int `json:",omitempty"`
}

// peer is what one peer entry of a device holds, in a comparable form so
// that the desired and the dumped peer tables diff as maps.
type peer struct {
	endpoint netip.AddrPort
	// allowed holds the peer's subnets: IPv4 first, then IPv6; an unused
	// slot is the zero Prefix.
	allowed   [2]netip.Prefix
	psk       wgtypes.Key
	keepalive time.Duration
}

// config converts p to the wgctrl change that installs it under key.
func (p peer) config(key wgtypes.Key) wgtypes.PeerConfig {
	psk := p.psk
	ka := p.keepalive
	pc := wgtypes.PeerConfig{
		PublicKey:                   key,
		PresharedKey:                &psk,
		PersistentKeepaliveInterval: &ka,
		ReplaceAllowedIPs:           true,
	}
	if p.endpoint.IsValid() {
		pc.Endpoint = net.UDPAddrFromAddrPort(p.endpoint)
	}
	for _, a := range p.allowed {
		if a.IsValid() {
			pc.AllowedIPs = append(pc.AllowedIPs, *ip.IPNet(a))
		}
	}
	return pc
}

// peerOf converts a dumped peer.
func peerOf(d *wgtypes.Peer) peer {
	p := peer{psk: d.PresharedKey, keepalive: d.PersistentKeepaliveInterval}
	if d.Endpoint != nil {
		p.endpoint = d.Endpoint.AddrPort()
		p.endpoint = netip.AddrPortFrom(p.endpoint.Addr().Unmap(), p.endpoint.Port())
	}
	var as []netip.Prefix
	for i := range d.AllowedIPs {
		if a, ok := ip.PrefixFromIPNet(&d.AllowedIPs[i]); ok {
			as = append(as, a)
		}
	}
	slices.SortFunc(as, func(a, b netip.Prefix) int {
		if a.Addr().Is4() != b.Addr().Is4() {
			if a.Addr().Is4() {
				return -1
			}
			return 1
		}
		return a.Addr().Compare(b.Addr())
	})
	for i := range as {
		if i == len(p.allowed) {
			// More than a flannel peer has: never equal to a desired one.
			p.allowed[0] = netip.Prefix{}
			break
		}
		p.allowed[i] = as[i]
	}
	return p
}

// devSpec says what one device carries.
type devSpec struct {
	name string
	// v4, v6: the families whose subnets the device's peers get.
	v4, v6 bool
	// port is the device's listen port, also the peers' port when their
	// lease names none.
	port int
}

// peerTable computes a device's desired peers from the leases.
type peerTable struct {
	mode Mode
	psk  wgtypes.Key
	ka   time.Duration
	// ownV4, ownV6: whether this node has an address of the family on the
	// external interface, and whether it is private (auto mode).
	ownV4, ownV6Public bool
	ownV6              bool
}

// desired fills want with the peers of spec for the remote leases and
// returns the leases skipped and why, by lease key.
func (t *peerTable) desired(spec devSpec, remote []subnet.Lease, want map[wgtypes.Key]peer, skipped map[netip.Prefix]string) {
	clear(want)
	type holder struct {
		exp time.Time
		key netip.Prefix
	}
	won := map[wgtypes.Key]holder{} // the lease that holds a public key
	for i := range remote {
		l := &remote[i]
		p, key, reason := t.peer(spec, l)
		if reason == "skip" {
			continue
		}
		if reason != "" {
			skipped[l.Key()] = reason
			continue
		}
		if prev, dup := won[key]; dup {
			// Two leases with one key (a node that moved to a new subnet
			// while its old lease lives on): the later lease wins.
			if !l.Expiration.After(prev.exp) {
				skipped[l.Key()] = "lease " + prev.key.String() + " has the same PublicKey"
				continue
			}
			skipped[prev.key] = "lease " + l.Key().String() + " has the same PublicKey"
		}
		want[key], won[key] = p, holder{l.Expiration, l.Key()}
	}
}

// peer is the peer entry of lease l on the device spec. reason is "skip"
// for a lease the device does not carry (an IPv4-only lease on the IPv6
// device) and otherwise why l is unusable, or "".
func (t *peerTable) peer(spec devSpec, l *subnet.Lease) (p peer, key wgtypes.Key, reason string) {
	has4 := spec.v4 && l.Subnet.IsValid()
	has6 := spec.v6 && l.IPv6Subnet.IsValid()
	if !has4 && !has6 {
		return peer{}, key, "skip"
	}
	var d4, d6 leaseData
	if has4 {
		if err := json.Unmarshal(l.Attrs.BackendData, &d4); err != nil {
			return peer{}, key, fmt.Sprintf("its BackendData is not wireguard's {\"PublicKey\":...}: %v", err)
		}
	}
	if has6 {
		if err := json.Unmarshal(l.Attrs.BackendV6Data, &d6); err != nil {
			return peer{}, key, fmt.Sprintf("its BackendV6Data is not wireguard's {\"PublicKey\":...}: %v", err)
		}
	}
	// flannel takes the IPv6 data's key when the lease has both.
	d := d4
	if has6 {
		d = d6
	}
	k, err := wgtypes.ParseKey(d.PublicKey)
	if err != nil {
		return peer{}, key, fmt.Sprintf("its PublicKey %q is not a WireGuard key", d.PublicKey)
	}
	if d.Port < 0 || d.Port > 65535 {
		return peer{}, key, fmt.Sprintf("its Port %d is not a UDP port", d.Port)
	}
	p = peer{psk: t.psk, keepalive: t.ka}
	n := 0
	if has4 {
		p.allowed[n] = l.Subnet
		n++
	}
	if has6 {
		p.allowed[n] = l.IPv6Subnet
	}
	use6 := false
	switch {
	case t.mode == ModeSeparate:
		use6 = spec.v6
	case t.mode == ModeIPv6:
		use6 = true
	case t.mode == ModeIPv4:
		use6 = false
	default: // auto
		use6 = t.auto6(l.Attrs.PublicIP, l.Attrs.PublicIPv6)
	}
	host, port := l.Attrs.PublicIP, d4.Port
	if use6 {
		host, port = l.Attrs.PublicIPv6, d6.Port
		if !has6 {
			port = d4.Port
		}
	} else if !has4 {
		port = d6.Port
	}
	if port == 0 {
		port = spec.port
	}
	if use6 && !(host.Is6() && !host.Is4In6()) {
		return peer{}, key, "it has no IPv6 PublicIPv6 to reach it at"
	}
	if !use6 && !host.Is4() {
		return peer{}, key, "it has no IPv4 PublicIP to reach it at"
	}
	p.endpoint = netip.AddrPortFrom(host, uint16(port))
	return p, k, ""
}

// auto6 is auto mode's choice of a peer's endpoint family: its IPv4 address
// unless it has none, or it is private while the peer's IPv6 address and
// this node's are public.
func (t *peerTable) auto6(v4, v6 netip.Addr) bool {
	switch {
	case v4.IsValid() && !v6.IsValid():
		return false
	case !v4.IsValid() && v6.IsValid():
		return true
	case !v4.IsPrivate() && t.ownV4:
		return false
	case !v6.IsPrivate() && t.ownV6 && t.ownV6Public:
		return true
	}
	return false
}

// wgClient is the part of *wgctrl.Client the backend uses: it reaches
// kernel devices over generic netlink and wireguard-go ones over their UAPI
// sockets alike.
type wgClient interface {
	Device(name string) (*wgtypes.Device, error)
	ConfigureDevice(name string, cfg wgtypes.Config) error
}

// reconcilePeers makes the peers of device name exactly want, and its
// private key and listen port key and port: it dumps the device, then,
// through a backend.Reconciler, sets each missing or different peer and
// removes the ones not wanted (one wgctrl call each, so that one refused
// peer does not stop the others). have receives the peers as dumped.
// added, if not nil, is called with each peer that was not there before.
func reconcilePeers(c wgClient, name string, key wgtypes.Key, port int, want map[wgtypes.Key]peer, have map[wgtypes.Key]peer, added func(wgtypes.Key)) (backend.Changes, error) {
	dev, err := c.Device(name)
	if err != nil {
		return backend.Changes{}, fmt.Errorf("reading the WireGuard device %s: %w", name, err)
	}
	if dev.PrivateKey != key || dev.ListenPort != port {
		if err := c.ConfigureDevice(name, wgtypes.Config{PrivateKey: &key, ListenPort: &port}); err != nil {
			return backend.Changes{}, fmt.Errorf("setting the private key and listen port %d of %s: %w", port, name, err)
		}
	}
	t := &devicePeers{c: c, name: name, dev: dev, have: have, added: added}
	compare := func(a, b wgtypes.Key) int { return bytes.Compare(a[:], b[:]) }
	return backend.NewReconciler[wgtypes.Key, peer](t, compare, backend.Same[peer]).Reconcile(backend.SortedEntries(want, compare))
}

// devicePeers is the peers of one WireGuard device as a backend.Table,
// dumped from dev (read once per reconcile).
type devicePeers struct {
	c     wgClient
	name  string
	dev   *wgtypes.Device
	have  map[wgtypes.Key]peer
	added func(wgtypes.Key)
}

func (t *devicePeers) Dump(add func(wgtypes.Key, peer)) error {
	clear(t.have)
	for i := range t.dev.Peers {
		k, p := t.dev.Peers[i].PublicKey, peerOf(&t.dev.Peers[i])
		t.have[k] = p
		add(k, p)
	}
	return nil
}

func (t *devicePeers) Set(keys []wgtypes.Key, ps []peer, errs []error) {
	for i, k := range keys {
		if err := t.c.ConfigureDevice(t.name, wgtypes.Config{Peers: []wgtypes.PeerConfig{ps[i].config(k)}}); err != nil {
			errs[i] = fmt.Errorf("setting peer %s (%s) on %s: %w", k, ps[i].endpoint, t.name, err)
			continue
		}
		if _, had := t.have[k]; !had && t.added != nil {
			t.added(k)
		}
	}
}

func (t *devicePeers) Delete(keys []wgtypes.Key, _ []peer, errs []error) {
	for i, k := range keys {
		if err := t.c.ConfigureDevice(t.name, wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: k, Remove: true}}}); err != nil {
			errs[i] = fmt.Errorf("removing peer %s from %s: %w", k, t.name, err)
		}
	}
}
