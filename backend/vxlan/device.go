package vxlan

import (
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/pkg/ip"
)

// encapOverhead is what VXLAN over IPv4 adds to each packet: outer IPv4 (20),
// UDP (8), VXLAN (8) and inner Ethernet (14) headers; encapOverhead6 the
// same over IPv6 (a 40-byte outer header).
const (
	encapOverhead  = 50
	encapOverhead6 = 70
)

// linkNetlink is the part of *netlink.Handle the device code uses.
type linkNetlink interface {
	LinkByName(name string) (netlink.Link, error)
	LinkAdd(link netlink.Link) error
	LinkDel(link netlink.Link) error
	LinkSetUp(link netlink.Link) error
	LinkSetMTU(link netlink.Link, mtu int) error
	LinkSetHardwareAddr(link netlink.Link, hwaddr net.HardwareAddr) error
	AddrList(link netlink.Link, family int) ([]netlink.Addr, error)
	AddrDel(link netlink.Link, addr *netlink.Addr) error
}

// deviceName is the VTEP device of a VNI, as flannel names it:
// flannel.<VNI> for IPv4, flannel-v6.<VNI> for IPv6.
func deviceName(vni int, v6 bool) string {
	if v6 {
		return "flannel-v6." + strconv.Itoa(vni)
	}
	return "flannel." + strconv.Itoa(vni)
}

// deviceSpec is the VTEP device as WIRE.md describes it.
type deviceSpec struct {
	Name     string
	VNI      int
	Local    netip.Addr // the external interface's address
	ExtIndex int        // the external interface
	Port     int        // never 0: the kernel default is spelled out
	GBP      bool
	MTU      int
}

// mismatch says why an existing link cannot serve as the device, or "" when
// it can. MTU and up/down are not reasons: they are set in place.
func (s deviceSpec) mismatch(l netlink.Link) string {
	v, ok := l.(*netlink.Vxlan)
	if !ok {
		return "it is a " + l.Type() + " link, not vxlan"
	}
	var why []string
	check := func(ok bool, format string, args ...any) {
		if !ok {
			why = append(why, fmt.Sprintf(format, args...))
		}
	}
	local, _ := ip.AddrFromIP(v.SrcAddr)
	check(v.VxlanId == s.VNI, "VNI %d, want %d", v.VxlanId, s.VNI)
	check(local == s.Local, "local %s, want %s", v.SrcAddr, s.Local)
	check(v.VtepDevIndex == s.ExtIndex, "dev index %d, want %d", v.VtepDevIndex, s.ExtIndex)
	check(v.Port == s.Port, "dstport %d, want %d", v.Port, s.Port)
	check(v.GBP == s.GBP, "gbp %t, want %t", v.GBP, s.GBP)
	check(!v.Learning, "learning on, want off")
	check(!v.L2miss && !v.L3miss, "l2miss/l3miss on, want off")
	check(!v.FlowBased, "external (flow-based), want a fixed VNI")
	check(len(v.Group) == 0 || v.Group.IsUnspecified(), "remote/group %s, want none", v.Group)
	return strings.Join(why, ", ")
}

// ensureDevice makes the VTEP device exist, match spec, and be up, and
// returns it as the kernel reports it. A matching device is kept as it is
// (so its MAC survives daemon restarts); a mismatching one is deleted and
// created again with its old MAC, so that peers' permanent neighbour
// entries for this node stay valid. A new device gets mac if valid, else a
// random locally administered MAC, set explicitly so that udev's
// MACAddressPolicy does not rewrite it after creation. replaced says why
// an existing link was replaced ("" if it was not).
func ensureDevice(nl linkNetlink, spec deviceSpec, mac hwAddr) (dev *netlink.Vxlan, replaced string, err error) {
	l, err := nl.LinkByName(spec.Name)
	switch {
	case err == nil:
		if replaced = spec.mismatch(l); replaced == "" {
			dev = l.(*netlink.Vxlan)
			break
		}
		if old, err := macOf(l); err == nil {
			mac = old
		}
		if err := nl.LinkDel(l); err != nil && !isNotFound(err) {
			return nil, replaced, fmt.Errorf("deleting %s (%s) to create it again: %w", spec.Name, replaced, err)
		}
		fallthrough
	case errors.As(err, new(netlink.LinkNotFoundError)):
		if dev, err = createDevice(nl, spec, mac); err != nil {
			return nil, replaced, err
		}
	default:
		return nil, "", fmt.Errorf("looking up %s: %w", spec.Name, err)
	}

	if dev.MTU != spec.MTU {
		if err := nl.LinkSetMTU(dev, spec.MTU); err != nil {
			return nil, replaced, fmt.Errorf("setting the MTU of %s to %d: %w", spec.Name, spec.MTU, err)
		}
		dev.MTU = spec.MTU
	}
	if dev.Flags&net.FlagUp == 0 {
		if err := nl.LinkSetUp(dev); err != nil {
			return nil, replaced, fmt.Errorf("setting %s up: %w", spec.Name, err)
		}
		dev.Flags |= net.FlagUp
	}
	return dev, replaced, nil
}

func createDevice(nl linkNetlink, spec deviceSpec, mac hwAddr) (*netlink.Vxlan, error) {
	if _, err := parseVtepMAC(mac.String()); err != nil {
		if mac, err = randomMAC(); err != nil {
			return nil, err
		}
	}
	want := &netlink.Vxlan{
		LinkAttrs: netlink.LinkAttrs{
			Name:         spec.Name,
			MTU:          spec.MTU,
			HardwareAddr: net.HardwareAddr(mac[:]),
		},
		VxlanId:      spec.VNI,
		VtepDevIndex: spec.ExtIndex,
		SrcAddr:      ip.IP(spec.Local),
		Port:         spec.Port,
		Learning:     false,
		GBP:          spec.GBP,
	}
	if err := nl.LinkAdd(want); err != nil {
		return nil, fmt.Errorf("creating vxlan device %s (VNI %d, local %s, dstport %d): %w", spec.Name, spec.VNI, spec.Local, spec.Port, err)
	}
	l, err := nl.LinkByName(spec.Name)
	if err != nil {
		return nil, fmt.Errorf("reading back %s: %w", spec.Name, err)
	}
	if why := spec.mismatch(l); why != "" {
		return nil, fmt.Errorf("creating vxlan device %s: the kernel made it with %s", spec.Name, why)
	}
	return l.(*netlink.Vxlan), nil
}

// macOf returns a link's MAC if it is a usable VTEP MAC.
func macOf(l netlink.Link) (hwAddr, error) {
	return parseVtepMAC(l.Attrs().HardwareAddr.String())
}

// randomMAC returns a random unicast, locally administered MAC.
func randomMAC() (hwAddr, error) {
	var m hwAddr
	if _, err := rand.Read(m[:]); err != nil {
		return hwAddr{}, fmt.Errorf("generating a MAC address: %w", err)
	}
	m[0] = m[0]&^1 | 2
	return m, nil
}

// isNotFound reports whether a delete failed only because the thing is
// already gone.
func isNotFound(err error) bool {
	return errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) ||
		errors.Is(err, unix.ENODEV) || errors.Is(err, unix.EADDRNOTAVAIL) ||
		errors.As(err, new(netlink.LinkNotFoundError))
}
