package nlbatch

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// dumpBuf is the receive buffer of a dump; the kernel sends at most about
// 32 KiB per datagram.
const dumpBuf = 64 << 10

// ListRoutes dumps the IPv4 routes of every table, calling fn for each until
// it returns false. If the kernel reports that the tables changed during
// the dump, every route is still delivered and the error is
// netlink.ErrDumpInterrupted: the view may be inconsistent.
func (h *Handle) ListRoutes(fn func(*Route) bool) error {
	return h.listRoutes(unix.AF_INET, fn)
}

// ListRoutes6 is ListRoutes for the IPv6 routes.
func (h *Handle) ListRoutes6(fn func(*Route) bool) error {
	return h.listRoutes(unix.AF_INET6, fn)
}

func (h *Handle) listRoutes(family uint8, fn func(*Route) bool) error {
	var e Route
	stop := false
	err := h.dump(unix.RTM_GETROUTE, []byte{family, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, func(typ uint16, body []byte) {
		if typ == unix.RTM_NEWROUTE && !stop && decodeRoute(body, family, &e) {
			stop = !fn(&e)
		}
	})
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		return fmt.Errorf("dumping routes: %w", err)
	}
	return err
}

// CheckNexthops reports whether the kernel has nexthop objects (Linux 5.3
// and later), by dumping them.
func (h *Handle) CheckNexthops() error {
	err := h.dump(unix.RTM_GETNEXTHOP, []byte{unix.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0}, func(uint16, []byte) {})
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		return fmt.Errorf("listing nexthop objects: %w", err)
	}
	return nil
}

// dump sends a dump request of type typ with the fixed header hdr and
// calls fn with the type and body of each message of the answer. If the
// kernel marks the dump interrupted, it still reads it to the end and
// returns netlink.ErrDumpInterrupted.
func (h *Handle) dump(typ uint16, hdr []byte, fn func(typ uint16, body []byte)) error {
	h.reset()
	b := h.begin(typ, unix.NLM_F_DUMP)
	b = append(b, hdr...)
	h.end(b)
	h.seq++
	seq := h.seq
	binary.NativeEndian.PutUint32(h.buf[8:], seq)
	if err := unix.Sendto(h.sock.GetFd(), h.buf, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	if cap(h.rbuf) < dumpBuf {
		h.rbuf = make([]byte, dumpBuf)
	}
	interrupted := false
	for {
		n, _, err := unix.Recvfrom(h.sock.GetFd(), h.rbuf[:dumpBuf], 0)
		if err == unix.EAGAIN || err == unix.EINTR {
			if err = h.wait(); err != nil {
				return err
			}
			continue
		}
		if err != nil {
			return err
		}
		for msg := h.rbuf[:n]; len(msg) >= unix.SizeofNlMsghdr; {
			l := int(binary.NativeEndian.Uint32(msg))
			if l < unix.SizeofNlMsghdr || l > len(msg) {
				return ErrShortAnswer
			}
			mtyp := binary.NativeEndian.Uint16(msg[4:])
			flags := binary.NativeEndian.Uint16(msg[6:])
			mseq := binary.NativeEndian.Uint32(msg[8:])
			body := msg[unix.SizeofNlMsghdr:l]
			msg = msg[min(nlmAlign(l), len(msg)):]
			if mseq != seq {
				continue // a late answer to an abandoned request
			}
			if flags&unix.NLM_F_DUMP_INTR != 0 {
				interrupted = true
			}
			switch mtyp {
			case unix.NLMSG_DONE:
				if len(body) >= 4 {
					if code := int32(binary.NativeEndian.Uint32(body)); code < 0 {
						return unix.Errno(-code)
					}
				}
				if interrupted {
					return netlink.ErrDumpInterrupted
				}
				return nil
			case unix.NLMSG_ERROR:
				if len(body) >= 4 {
					if code := int32(binary.NativeEndian.Uint32(body)); code != 0 {
						return unix.Errno(-code)
					}
				}
				return nil
			default:
				fn(mtyp, body)
			}
		}
	}
}

// wait blocks until the socket is readable or the receive timeout passes.
func (h *Handle) wait() error {
	fds := []unix.PollFd{{Fd: int32(h.sock.GetFd()), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(fds, int(recvTimeout.Milliseconds()))
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return err
		case n == 0:
			return unix.EAGAIN
		}
		return nil
	}
}

// nextAttr splits the first attribute off a: its type (without the nested
// and byte-order flags), its value and what follows; ok is false if a does
// not start with a well-formed attribute.
func nextAttr(a []byte) (typ uint16, val, rest []byte, ok bool) {
	if len(a) < unix.SizeofRtAttr {
		return 0, nil, nil, false
	}
	l := int(binary.NativeEndian.Uint16(a))
	if l < unix.SizeofRtAttr || l > len(a) {
		return 0, nil, nil, false
	}
	typ = binary.NativeEndian.Uint16(a[2:]) &^ (unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER)
	return typ, a[unix.SizeofRtAttr:l], a[min((l+unix.NLA_ALIGNTO-1)&^(unix.NLA_ALIGNTO-1), len(a)):], true
}

func nlmAlign(l int) int { return (l + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1) }

// decodeRoute fills e from an rtmsg and its attributes; false for anything
// but a well-formed route of family (AF_INET or AF_INET6).
func decodeRoute(b []byte, family uint8, e *Route) bool {
	if len(b) < unix.SizeofRtMsg || b[0] != family {
		return false
	}
	alen := 4
	if family == unix.AF_INET6 {
		alen = 16
	}
	*e = Route{
		Tos:      b[3],
		Table:    uint32(b[4]),
		Protocol: b[5],
		Scope:    b[6],
		Type:     b[7],
		Onlink:   binary.NativeEndian.Uint32(b[8:])&unix.RTNH_F_ONLINK != 0,
	}
	dstLen := int(b[1])
	if dstLen > 8*alen {
		return false
	}
	var dst [16]byte
	for a := b[unix.SizeofRtMsg:]; len(a) >= unix.SizeofRtAttr; {
		t, v, rest, ok := nextAttr(a)
		if !ok {
			return false
		}
		a = rest
		switch t {
		case unix.RTA_DST:
			if len(v) != alen {
				return false
			}
			copy(dst[:], v)
		case unix.RTA_GATEWAY:
			if len(v) == alen {
				e.Gw = addrOf(v)
			}
		case unix.RTA_OIF:
			if len(v) == 4 {
				e.LinkIndex = int(binary.NativeEndian.Uint32(v))
			}
		case unix.RTA_PRIORITY:
			if len(v) == 4 {
				e.Priority = binary.NativeEndian.Uint32(v)
			}
		case unix.RTA_TABLE:
			if len(v) == 4 {
				e.Table = binary.NativeEndian.Uint32(v)
			}
		case unix.RTA_MULTIPATH:
			e.Multipath = true
		case rtaNHID:
			if len(v) == 4 {
				e.NexthopID = binary.NativeEndian.Uint32(v)
			}
		}
	}
	if alen == 4 {
		e.Dst = netip.PrefixFrom(netip.AddrFrom4([4]byte(dst[:4])), dstLen)
	} else {
		e.Dst = netip.PrefixFrom(netip.AddrFrom16(dst), dstLen)
	}
	return true
}

// addrOf is a 4- or 16-byte address; an IPv4-mapped one stays IPv6.
func addrOf(v []byte) netip.Addr {
	if len(v) == 4 {
		return netip.AddrFrom4([4]byte(v))
	}
	return netip.AddrFrom16([16]byte(v))
}

// RouteOf returns r as a dump of it would report it (vishvananda/netlink
// does not model nexthop IDs; NexthopID is 0).
func RouteOf(r *netlink.Route) Route {
	e := Route{
		LinkIndex: r.LinkIndex,
		Table:     uint32(r.Table),
		Protocol:  uint8(r.Protocol),
		Scope:     uint8(r.Scope),
		Type:      uint8(r.Type),
		Onlink:    r.Flags&unix.RTNH_F_ONLINK != 0,
		Tos:       uint8(r.Tos),
		Priority:  uint32(r.Priority),
		Multipath: len(r.MultiPath) > 0,
		Dst:       netip.PrefixFrom(netip.IPv4Unspecified(), 0),
	}
	if r.Family == unix.AF_INET6 {
		e.Dst = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
	}
	if a, ok := netip.AddrFromSlice(r.Gw); ok {
		e.Gw = a.Unmap()
	}
	if r.Dst != nil {
		if a, ok := netip.AddrFromSlice(r.Dst.IP); ok {
			ones, _ := r.Dst.Mask.Size()
			e.Dst = netip.PrefixFrom(a.Unmap(), ones)
		}
	}
	return e
}

// ListNeighs dumps the neighbour (AF_INET) or fdb (AF_BRIDGE) entries of
// link (all links if 0) and calls fn for each until it returns false. The
// link filter is applied here, as not every kernel applies it. An
// interrupted dump is reported as with ListRoutes.
func (h *Handle) ListNeighs(family uint8, link int, fn func(*Neigh) bool) error {
	var e Neigh
	stop := false
	hdr := make([]byte, 12, 20)
	hdr[0] = family
	binary.NativeEndian.PutUint32(hdr[4:], uint32(link))
	if link != 0 && family != unix.AF_BRIDGE {
		hdr = attrU32(hdr, unix.NDA_IFINDEX, uint32(link))
	}
	err := h.dump(unix.RTM_GETNEIGH, hdr, func(typ uint16, body []byte) {
		if typ == unix.RTM_NEWNEIGH && !stop && decodeNeigh(body, &e) && (link == 0 || e.LinkIndex == link) && e.Family == family {
			stop = !fn(&e)
		}
	})
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		return fmt.Errorf("dumping neighbours: %w", err)
	}
	return err
}

// decodeNeigh fills e from an ndmsg and its attributes; false if malformed.
func decodeNeigh(b []byte, e *Neigh) bool {
	const sizeofNdmsg = 12
	if len(b) < sizeofNdmsg {
		return false
	}
	*e = Neigh{
		Family:    b[0],
		LinkIndex: int(int32(binary.NativeEndian.Uint32(b[4:]))),
		State:     binary.NativeEndian.Uint16(b[8:]),
		Flags:     b[10],
		Type:      b[11],
	}
	for a := b[sizeofNdmsg:]; len(a) >= unix.SizeofRtAttr; {
		t, v, rest, ok := nextAttr(a)
		if !ok {
			return false
		}
		a = rest
		switch t {
		case unix.NDA_DST:
			if ip, ok := netip.AddrFromSlice(v); ok {
				e.IP = ip.Unmap()
			}
		case unix.NDA_LLADDR:
			if len(v) == 6 {
				e.MAC = [6]byte(v)
			}
		case unix.NDA_VNI:
			if len(v) == 4 {
				e.VNI = binary.NativeEndian.Uint32(v)
			}
		}
	}
	return true
}
