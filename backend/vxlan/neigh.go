package vxlan

import (
	"fmt"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/backend"
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
	want   backend.Desired[addr, neighVal] // the desired set of the current Apply
	buf    []nlbatch.Neigh
}

// neigh is the neighbour ip → v on the device.
func (t *neighTable) neigh(ip addr, v neighVal) nlbatch.Neigh {
	return nlbatch.Neigh{LinkIndex: t.link, Family: t.family, State: v.state, Type: unix.RTN_UNICAST, IP: ip.ip(), MAC: v.mac}
}

// Dump reports the owned entries.
func (t *neighTable) Dump(add func(addr, neighVal)) error {
	err := t.nl.ListNeighs(t.family, t.link, func(n *nlbatch.Neigh) bool {
		if n.IP.Is4() != (t.family == unix.AF_INET) {
			return true
		}
		k := addrOf(n.IP)
		if n.State&unix.NUD_PERMANENT == 0 && backend.Search(t.want, k, compareAddrs) < 0 {
			return true
		}
		add(k, neighVal{mac: n.MAC, state: n.State})
		return true
	})
	if err != nil {
		return fmt.Errorf("listing neighbours: %w", err)
	}
	return nil
}

func (t *neighTable) Set(ips []addr, vs []neighVal, errs []error) {
	writeChunks(&t.buf, len(ips), func(i int) nlbatch.Neigh { return t.neigh(ips[i], vs[i]) }, errs, t.set)
}

func (t *neighTable) Delete(ips []addr, vs []neighVal, errs []error) {
	writeChunks(&t.buf, len(ips), func(i int) nlbatch.Neigh { return t.neigh(ips[i], vs[i]) }, errs, t.delete)
}

func (t *neighTable) set(ns []nlbatch.Neigh, errs []error) {
	_ = t.nl.SetNeighs(ns, errs) // a socket failure is in errs too
	for i, err := range errs {
		if err != nil {
			errs[i] = fmt.Errorf("setting neighbour %s lladdr %s: %w", ns[i].IP, hwAddr(ns[i].MAC), err)
		}
	}
}

func (t *neighTable) delete(ns []nlbatch.Neigh, errs []error) {
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
	buf  []nlbatch.Neigh
}

// entry is the fdb entry mac → v of the device.
func (t *fdbTable) entry(mac hwAddr, v fdbVal) nlbatch.Neigh {
	return nlbatch.Neigh{LinkIndex: t.link, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF, State: v.state, IP: v.dst.ip(), MAC: mac, VNI: v.vni}
}

// Dump reports the device's own entries (with a remote).
func (t *fdbTable) Dump(add func(hwAddr, fdbVal)) error {
	err := t.nl.ListNeighs(unix.AF_BRIDGE, t.link, func(n *nlbatch.Neigh) bool {
		if n.Flags&netlink.NTF_SELF == 0 || !n.IP.IsValid() {
			return true // a bridge's entry for the device as its port, or one without a remote
		}
		add(n.MAC, fdbVal{vni: n.VNI, state: n.State, dst: addrOf(n.IP)})
		return true
	})
	if err != nil {
		return fmt.Errorf("listing fdb entries: %w", err)
	}
	return nil
}

func (t *fdbTable) Set(macs []hwAddr, vs []fdbVal, errs []error) {
	writeChunks(&t.buf, len(macs), func(i int) nlbatch.Neigh { return t.entry(macs[i], vs[i]) }, errs, t.set)
}

// Delete deletes each entry by MAC and remote, so that one remote of an
// appended list goes alone.
func (t *fdbTable) Delete(macs []hwAddr, vs []fdbVal, errs []error) {
	writeChunks(&t.buf, len(macs), func(i int) nlbatch.Neigh { return t.entry(macs[i], vs[i]) }, errs, t.delete)
}

func (t *fdbTable) set(ns []nlbatch.Neigh, errs []error) {
	_ = t.nl.SetNeighs(ns, errs)
	for i, err := range errs {
		if err != nil {
			errs[i] = fmt.Errorf("setting fdb entry %s dst %s: %w", hwAddr(ns[i].MAC), ns[i].IP, err)
		}
	}
}

func (t *fdbTable) delete(ns []nlbatch.Neigh, errs []error) {
	_ = t.nl.DeleteNeighs(ns, errs)
	for i, err := range errs {
		if err != nil {
			errs[i] = fmt.Errorf("deleting fdb entry %s dst %s: %w", hwAddr(ns[i].MAC), ns[i].IP, err)
		}
	}
}

// neighChunk is how many entries one write converts at a time: the buffer
// stays small (200 KB) however many entries change.
const neighChunk = 4096

// writeChunks calls write with the entries entry(0) to entry(n-1),
// neighChunk at a time, in *buf, and the matching part of errs. *buf is
// kept only while small.
func writeChunks(buf *[]nlbatch.Neigh, n int, entry func(int) nlbatch.Neigh, errs []error, write func([]nlbatch.Neigh, []error)) {
	if c := min(n, neighChunk); cap(*buf) < c {
		*buf = make([]nlbatch.Neigh, 0, c)
	}
	for start := 0; start < n; start += neighChunk {
		end := min(start+neighChunk, n)
		b := (*buf)[:0]
		for i := start; i < end; i++ {
			b = append(b, entry(i))
		}
		write(b, errs[start:end])
	}
	clear((*buf)[:cap(*buf)])
	if cap(*buf) > keepBuf {
		*buf = nil
	}
}
