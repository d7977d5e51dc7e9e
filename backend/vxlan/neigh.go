package vxlan

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/pkg/nlbatch"
)

// neighNetlink is the part of *nlbatch.Handle the neighbour and fdb code
// uses: dumps, batched writes for the bulk, single deletes for the rollback
// and odd entries.
type neighNetlink interface {
	ListNeighs(family uint8, link int, fn func(*nlbatch.NeighEntry) bool) error
	NeighDel(neigh *netlink.Neigh) error
	SetNeighs(ns []nlbatch.Neigh, errs []error) error
	DeleteNeighs(ns []nlbatch.Neigh, errs []error) error
}

// writeAll converts each entry with conv, writes them all with one batched
// call (SetNeighs or DeleteNeighs) and leaves in errs[i] the result of
// es[i], described by what (nil for success; with ignoreNotFound a missing
// entry counts as success). buf is reused scratch space.
func writeAll[E any](buf *[]nlbatch.Neigh, es []E, errs []error, conv func(E) nlbatch.Neigh,
	write func([]nlbatch.Neigh, []error) error, ignoreNotFound bool, what func(E, error) error) {
	*buf = (*buf)[:0]
	for _, e := range es {
		*buf = append(*buf, conv(e))
	}
	_ = write(*buf, errs) // a socket failure is in errs too
	for i, err := range errs {
		if err != nil && ignoreNotFound && isNotFound(err) {
			err = nil
		}
		if err != nil {
			err = what(es[i], err)
		}
		errs[i] = err
	}
}

// dumpAttempts bounds the re-dumps when the kernel reports that a table
// changed during a dump.
const dumpAttempts = 3

// dumpNeigh calls fn for each entry of one family on one link, reading
// the table again (from scratch) when the kernel reports that it changed
// during the dump. If it keeps changing, the last view is used, which is
// safe: a set replaces, a delete of an entry already gone succeeds, and
// whatever was missed is fixed by the next Apply. start is called before
// each read, to reset what fn collected.
func dumpNeigh(nl neighNetlink, family uint8, link int, start func(), fn func(*nlbatch.NeighEntry)) error {
	var err error
	for range dumpAttempts {
		start()
		err = nl.ListNeighs(family, link, func(e *nlbatch.NeighEntry) bool { fn(e); return true })
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return err
		}
	}
	return nil
}

// neighTable is the neighbour table (of family: AF_INET or AF_INET6) of the
// VTEP device, as far as the
// backend owns it: every permanent entry (nobody but this backend adds
// those on flannel.<VNI>), plus whatever entry the kernel holds for a
// desired IP, so that a resolved or failed entry there is made permanent.
// Entries the kernel manages for other IPs are left to it.
type neighTable struct {
	nl     neighNetlink
	link   int
	family uint8
	have   map[netip.Addr]neighEntry
	buf    []nlbatch.Neigh
}

// load reads the table; want is the desired set.
func (t *neighTable) load(want map[netip.Addr]neighEntry) error {
	err := dumpNeigh(t.nl, t.family, t.link, func() { clear(t.have) }, func(n *nlbatch.NeighEntry) {
		a := n.IP
		if a.Is4() != (t.family == unix.AF_INET) {
			return
		}
		if _, desired := want[a]; !desired && n.State&unix.NUD_PERMANENT == 0 {
			return
		}
		var m hwAddr
		if n.HasMAC {
			m = n.MAC
		}
		t.have[a] = neighEntry{IP: a, MAC: m, State: int(n.State)}
	})
	if err != nil {
		return fmt.Errorf("listing neighbours: %w", err)
	}
	return nil
}

// entry is e as written to the kernel: permanent, unicast.
func (t *neighTable) entry(e neighEntry) nlbatch.Neigh {
	return nlbatch.Neigh{LinkIndex: t.link, Family: t.family, State: unix.NUD_PERMANENT, Type: unix.RTN_UNICAST, IP: e.IP, MAC: e.MAC}
}

// setAll sets each entry; errs[i] receives the result of es[i].
func (t *neighTable) setAll(es []neighEntry, errs []error) {
	writeAll(&t.buf, es, errs, t.entry, t.nl.SetNeighs, false, func(e neighEntry, err error) error {
		return fmt.Errorf("setting neighbour %s lladdr %s: %w", e.IP, e.MAC, err)
	})
}

// delAll deletes each entry (by IP); one already gone counts as deleted.
func (t *neighTable) delAll(es []neighEntry, errs []error) {
	byIP := func(e neighEntry) nlbatch.Neigh {
		return nlbatch.Neigh{LinkIndex: t.link, Family: t.family, IP: e.IP}
	}
	writeAll(&t.buf, es, errs, byIP, t.nl.DeleteNeighs, true, func(e neighEntry, err error) error {
		return fmt.Errorf("deleting neighbour %s: %w", e.IP, err)
	})
}

func (t *neighTable) del(_ netip.Addr, e neighEntry) error {
	err := t.nl.NeighDel(&netlink.Neigh{LinkIndex: t.link, Family: int(t.family), IP: ip.IP(e.IP)})
	if err != nil && !isNotFound(err) {
		return fmt.Errorf("deleting neighbour %s: %w", e.IP, err)
	}
	return nil
}

// fdbTable is the forwarding database of the VTEP device; the backend owns
// all of it (learning is off, so only configured entries exist).
type fdbTable struct {
	nl   neighNetlink
	link int
	have map[hwAddr]fdbEntry
	// extra holds entries no set replaces: further remotes of one MAC (only
	// the all-zeros and multicast MACs can have several, with bridge fdb
	// append) and entries whose MAC does not parse.
	extra []netlink.Neigh
	buf   []nlbatch.Neigh
}

// entry is e as written to the kernel: permanent, in the device's own table.
func (t *fdbTable) entry(e fdbEntry) nlbatch.Neigh {
	return nlbatch.Neigh{LinkIndex: t.link, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF, State: unix.NUD_PERMANENT,
		IP: e.Dst, MAC: e.MAC, VNI: uint32(e.VNI)}
}

// setAll sets each entry; errs[i] receives the result of es[i].
func (t *fdbTable) setAll(es []fdbEntry, errs []error) {
	writeAll(&t.buf, es, errs, t.entry, t.nl.SetNeighs, false, func(e fdbEntry, err error) error {
		return fmt.Errorf("setting fdb entry %s dst %s: %w", e.MAC, e.Dst, err)
	})
}

// delAll deletes each entry (MAC and dst); one already gone counts as
// deleted.
func (t *fdbTable) delAll(es []fdbEntry, errs []error) {
	writeAll(&t.buf, es, errs, t.entry, t.nl.DeleteNeighs, true, func(e fdbEntry, err error) error {
		return fmt.Errorf("deleting fdb entry %s dst %s: %w", e.MAC, e.Dst, err)
	})
}

// load reads the table; want is the desired set.
func (t *fdbTable) load(want map[hwAddr]fdbEntry) error {
	start := func() {
		clear(t.have)
		clear(t.extra)
		t.extra = t.extra[:0]
	}
	err := dumpNeigh(t.nl, unix.AF_BRIDGE, t.link, start, func(n *nlbatch.NeighEntry) {
		if n.Flags&netlink.NTF_SELF == 0 {
			return // a bridge's entry for the device as its port; not the device's own table
		}
		if !n.IP.IsValid() || !n.HasMAC {
			if n.IP.IsValid() {
				// Without a usable MAC: delete it by what it has.
				t.extra = append(t.extra, netlink.Neigh{LinkIndex: t.link, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF,
					IP: n.IP.AsSlice(), VNI: int(n.VNI)})
			}
			return
		}
		got := fdbEntry{MAC: n.MAC, Dst: n.IP, VNI: int(n.VNI), State: int(n.State)}
		prev, dup := t.have[got.MAC]
		if !dup {
			t.have[got.MAC] = got
			return
		}
		// Several remotes for one MAC (a flood list): keep the desired one,
		// if any, and delete the rest.
		if got == want[got.MAC] {
			t.have[got.MAC], got = got, prev
		}
		t.extra = append(t.extra, t.neigh(got))
	})
	if err != nil {
		return fmt.Errorf("listing fdb entries: %w", err)
	}
	return nil
}

func (t *fdbTable) neigh(e fdbEntry) netlink.Neigh {
	return netlink.Neigh{
		LinkIndex:    t.link,
		Family:       unix.AF_BRIDGE,
		Flags:        netlink.NTF_SELF,
		State:        unix.NUD_PERMANENT,
		IP:           e.Dst.AsSlice(),
		HardwareAddr: e.MAC[:],
		VNI:          e.VNI,
	}
}

func (t *fdbTable) del(_ hwAddr, e fdbEntry) error {
	n := t.neigh(e)
	return t.delNeigh(&n)
}

// delNeigh deletes one remote of one MAC (the dst is always given, so that
// an appended remote goes alone).
func (t *fdbTable) delNeigh(n *netlink.Neigh) error {
	if err := t.nl.NeighDel(n); err != nil && !isNotFound(err) {
		return fmt.Errorf("deleting fdb entry %s dst %s: %w", n.HardwareAddr, n.IP, err)
	}
	return nil
}
