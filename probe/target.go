package probe

import (
	"encoding/json"
	"fmt"
	"net/netip"

	"github.com/flanneld-go/flanneld/subnet"
)

// Path is what a node probes through: the backend, its UDP port, the MTU of
// the overlay and the address probes leave from.
type Path struct {
	// Backend is the config's backend type.
	Backend string
	// Port is the UDP port the backend carries traffic on (0 for host-gw);
	// Port6 the one of IPv6 peers where it differs (wireguard's
	// ListenPortV6), else 0.
	Port, Port6 int
	// MTU is FLANNEL_MTU: the size of the full-size probes.
	MTU int
	// Source and Source6 are the addresses IPv4 and IPv6 probes are sent
	// from: this node's overlay addresses (its subnets' first addresses),
	// or its public addresses with host-gw; invalid without the family.
	Source, Source6 netip.Addr
}

// sources is Source and Source6, indexed by family.
func (p Path) sources() [2]netip.Addr { return [2]netip.Addr{p.Source, p.Source6} }

// family is 0 for IPv4 addresses, 1 for IPv6.
func family(a netip.Addr) int {
	if a.Is6() {
		return 1
	}
	return 0
}

// Overlay reports whether probes travel through the overlay's own data
// path (vxlan, udp, wireguard: the peer's device holds its subnet's first
// address). With host-gw and extension they reach the peer's public
// address, which proves the peer's host is up and answers on the underlay,
// not that routed overlay traffic is forwarded.
func (p Path) Overlay() bool {
	switch p.Backend {
	case "host-gw", "extension", "alloc":
		return false
	}
	return true
}

// Probed reports whether the backend has a data path to probe: alloc only
// hands out subnets.
func (p Path) Probed() bool { return p.Backend != "alloc" }

// Remedy is what to check when a peer stops answering; v6 is whether the
// peer is an IPv6 one.
func (p Path) Remedy(v6 bool) string {
	port := p.Port
	if v6 && p.Port6 != 0 {
		port = p.Port6
	}
	if port == 0 {
		return "check that the hosts reach each other (ICMP and routed traffic on the LAN)"
	}
	return fmt.Sprintf("check that UDP %d passes between the hosts", port)
}

// Default UDP ports of the backends, used when the config gives none.
const (
	VXLANPort     = 8472
	UDPPort       = 8285
	WireGuardPort = 51820
	// WireGuardPort6 is wireguard's ListenPortV6, flannel-wg-v6's port.
	WireGuardPort6 = 51821
)

// PathOf is the path of a node with config cfg, overlay MTU mtu and own
// lease own.
func PathOf(cfg *subnet.Config, mtu int, own subnet.Lease) Path {
	p := Path{Backend: cfg.BackendType, MTU: mtu}
	var keys struct {
		Port, ListenPort, ListenPortV6 int
		Mode                           string
	}
	if len(cfg.Backend) > 0 {
		_ = json.Unmarshal(cfg.Backend, &keys) // the backend validated its keys; a bad one means the default
	}
	switch cfg.BackendType {
	case "vxlan":
		p.Port = VXLANPort
		if keys.Port > 0 {
			p.Port = keys.Port
		}
	case "udp":
		p.Port = UDPPort
		if keys.Port > 0 {
			p.Port = keys.Port
		}
	case "wireguard":
		p.Port = WireGuardPort
		if keys.ListenPort > 0 {
			p.Port = keys.ListenPort
		}
		if keys.Mode == "" || keys.Mode == "separate" { // IPv6 on flannel-wg-v6
			p.Port6 = WireGuardPort6
			if keys.ListenPortV6 > 0 {
				p.Port6 = keys.ListenPortV6
			}
		}
	}
	switch {
	case !p.Overlay():
		p.Source, p.Source6 = own.Attrs.PublicIP, own.Attrs.PublicIPv6
	case own.Subnet.IsValid():
		p.Source = own.Subnet.Addr()
	}
	if p.Overlay() && own.IPv6Subnet.IsValid() {
		p.Source6 = own.IPv6Subnet.Addr()
	}
	if !cfg.EnableIPv4 {
		p.Source = netip.Addr{}
	}
	if !cfg.EnableIPv6 {
		p.Source6 = netip.Addr{}
	}
	return p
}

// Peer is one peer to probe. Through an overlay it is probed at the first
// address of its subnet, which vxlan (flannel.N), udp (flannel0) and
// wireguard put on the peer's device, so that flannel's own nodes answer
// too; with host-gw at its public address.
type Peer struct {
	Subnet   netip.Prefix
	PublicIP netip.Addr
}

// target is the address a peer of subnet sn and public address public is
// probed at along p.
func (p Path) target(sn netip.Prefix, public netip.Addr) netip.Addr {
	if p.Overlay() {
		return sn.Addr()
	}
	return public
}

// PeersOf is the peers of the leases in remote, for path p: one per
// subnet of a family p has a source for (none when the backend has no data
// path).
func PeersOf(p Path, remote []subnet.Lease) []Peer {
	if !p.Probed() {
		return nil
	}
	out := make([]Peer, 0, len(remote))
	add := func(sn netip.Prefix, public netip.Addr) {
		out = append(out, Peer{Subnet: sn, PublicIP: public})
	}
	for _, l := range remote {
		if p.Source.IsValid() && l.Subnet.IsValid() && l.Subnet.Addr().Is4() {
			add(l.Subnet, l.Attrs.PublicIP)
		}
		if p.Source6.IsValid() && l.IPv6Subnet.IsValid() && l.Attrs.PublicIPv6.Is6() {
			add(l.IPv6Subnet, l.Attrs.PublicIPv6)
		}
	}
	return out
}
