package vxlan

import (
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/pkg/nlbatch"
)

// neighNetlink is the part of *nlbatch.Handle the neighbour and fdb tables
// use: dumps and batched writes.
type neighNetlink interface {
	ListNeighs(family uint8, link int, fn func(*nlbatch.Neigh) bool) error
	SetNeighs(ns []nlbatch.Neigh, errs []error) error
	DeleteNeighs(ns []nlbatch.Neigh, errs []error) error
}

// neighTable is the neighbour table (of family: AF_INET or AF_INET6) of the
// VTEP device as a backend.Table, as far as the backend owns it: every
// permanent entry (nobody but this backend adds those on flannel.<VNI>),
// plus whatever entry the kernel holds for a desired IP, so that a resolved
// or failed entry there is made permanent. Entries the kernel manages for
// other IPs are left to it.
type neighTable struct {
	nl     neighNetlink
	link   int
	family uint8
	want   map[netip.Addr]nlbatch.Neigh // the desired set of the current Apply
}

// Dump reports the owned entries in the form compute writes them.
func (t *neighTable) Dump(add func(netip.Addr, nlbatch.Neigh)) error {
	err := t.nl.ListNeighs(t.family, t.link, func(n *nlbatch.Neigh) bool {
		if n.IP.Is4() != (t.family == unix.AF_INET) {
			return true
		}
		if _, desired := t.want[n.IP]; !desired && n.State&unix.NUD_PERMANENT == 0 {
			return true
		}
		add(n.IP, nlbatch.Neigh{LinkIndex: t.link, Family: t.family, State: n.State, Type: unix.RTN_UNICAST, IP: n.IP, MAC: n.MAC})
		return true
	})
	if err != nil {
		return fmt.Errorf("listing neighbours: %w", err)
	}
	return nil
}

func (t *neighTable) Set(_ []netip.Addr, ns []nlbatch.Neigh, errs []error) {
	_ = t.nl.SetNeighs(ns, errs) // a socket failure is in errs too
	for i, err := range errs {
		if err != nil {
			errs[i] = fmt.Errorf("setting neighbour %s lladdr %s: %w", ns[i].IP, hwAddr(ns[i].MAC), err)
		}
	}
}

func (t *neighTable) Delete(_ []netip.Addr, ns []nlbatch.Neigh, errs []error) {
	_ = t.nl.DeleteNeighs(ns, errs)
	for i, err := range errs {
		if err != nil {
			errs[i] = fmt.Errorf("deleting neighbour %s: %w", ns[i].IP, err)
		}
	}
}

// fdbTable is the forwarding database of the VTEP device as a
// backend.Table; the backend owns all of it (learning is off, so only
// configured entries exist). Several remotes of one MAC (bridge fdb append)
// are reported each, so that the Reconciler deletes all but one.
type fdbTable struct {
	nl   neighNetlink
	link int
}

// Dump reports the device's own entries (with a remote) in the form compute
// writes them.
func (t *fdbTable) Dump(add func(hwAddr, nlbatch.Neigh)) error {
	err := t.nl.ListNeighs(unix.AF_BRIDGE, t.link, func(n *nlbatch.Neigh) bool {
		if n.Flags&netlink.NTF_SELF == 0 || !n.IP.IsValid() {
			return true // a bridge's entry for the device as its port, or one without a remote
		}
		add(n.MAC, nlbatch.Neigh{LinkIndex: t.link, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF, State: n.State, IP: n.IP, MAC: n.MAC, VNI: n.VNI})
		return true
	})
	if err != nil {
		return fmt.Errorf("listing fdb entries: %w", err)
	}
	return nil
}

func (t *fdbTable) Set(_ []hwAddr, ns []nlbatch.Neigh, errs []error) {
	_ = t.nl.SetNeighs(ns, errs)
	for i, err := range errs {
		if err != nil {
			errs[i] = fmt.Errorf("setting fdb entry %s dst %s: %w", hwAddr(ns[i].MAC), ns[i].IP, err)
		}
	}
}

// Delete deletes each entry by MAC and remote, so that one remote of an
// appended list goes alone.
func (t *fdbTable) Delete(_ []hwAddr, ns []nlbatch.Neigh, errs []error) {
	_ = t.nl.DeleteNeighs(ns, errs)
	for i, err := range errs {
		if err != nil {
			errs[i] = fmt.Errorf("deleting fdb entry %s dst %s: %w", hwAddr(ns[i].MAC), ns[i].IP, err)
		}
	}
}
