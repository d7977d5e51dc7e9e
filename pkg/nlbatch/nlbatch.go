// Package nlbatch writes routes, neighbours, fdb entries and nexthop objects
// to the kernel many requests per system call.
//
// A netlink socket accepts any number of requests in one sendmsg; the kernel
// runs them in order and answers each failing one with an error carrying its
// sequence number. Only the last request of each chunk asks for an
// acknowledgement, so a chunk costs one sendmsg and, when all goes well, one
// recvmsg. Programming 10,000 routes this way takes about a tenth of the time
// of one request and one answer per route, which is what vishvananda/netlink
// (used for everything else: dumps, links, addresses) does.
package nlbatch

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Limits of one chunk: at most chunkMsgs requests and about chunkBytes
// bytes per sendmsg, so that the error answers of a chunk where everything
// fails (about 36 bytes each with NETLINK_CAP_ACK) fit the socket's receive
// buffer.
const (
	chunkMsgs  = 512
	chunkBytes = 48 << 10
)

// recvTimeout bounds each wait for the kernel's answer.
const recvTimeout = 30 * time.Second

// Message types and attributes x/sys/unix may lack on older versions.
const (
	rtaNHID = 30 // RTA_NH_ID
)

// ErrShortAnswer is returned when the kernel's answer to a chunk cannot be
// matched to its requests (a truncated or foreign message).
var ErrShortAnswer = errors.New("nlbatch: malformed netlink answer")

// Handle is a netlink handle with batched writes: the embedded
// *netlink.Handle serves everything else. Use it from one goroutine at a
// time.
type Handle struct {
	*netlink.Handle
	sock *nl.NetlinkSocket

	buf  []byte  // the requests queued by the current call
	ends []int   // where each request ends in buf
	seq  uint32  // last sequence number used
	errs []error // scratch results when the caller gives none
	rbuf []byte  // receive buffer of dumps
}

// NewHandle returns a handle for the process's network namespace.
func NewHandle() (*Handle, error) { return NewHandleAt(netns.None()) }

// NewHandleAt returns a handle for the network namespace ns
// (netns.None() for the process's own).
func NewHandleAt(ns netns.NsHandle) (*Handle, error) {
	var h *netlink.Handle
	var err error
	if ns.IsOpen() {
		h, err = netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	} else {
		h, err = netlink.NewHandle(unix.NETLINK_ROUTE)
	}
	if err != nil {
		return nil, fmt.Errorf("opening netlink handle: %w", err)
	}
	sock, err := nl.GetNetlinkSocketAt(ns, netns.None(), unix.NETLINK_ROUTE)
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("opening netlink batch socket: %w", err)
	}
	// A kernel that never answers must not hang the daemon.
	if err := sock.SetReceiveTimeout(&unix.Timeval{Sec: int64(recvTimeout / time.Second)}); err != nil {
		sock.Close()
		h.Close()
		return nil, fmt.Errorf("setting the netlink receive timeout: %w", err)
	}
	// Error answers without a copy of the request: they stay small.
	if err := unix.SetsockoptInt(sock.GetFd(), unix.SOL_NETLINK, unix.NETLINK_CAP_ACK, 1); err != nil {
		sock.Close()
		h.Close()
		return nil, fmt.Errorf("setting NETLINK_CAP_ACK: %w", err)
	}
	return &Handle{Handle: h, sock: sock}, nil
}

// Close closes both sockets.
func (h *Handle) Close() {
	if h == nil {
		return
	}
	h.sock.Close()
	h.Handle.Close()
}

// Route is an IPv4 or IPv6 route (the family of Dst): the one route type
// of the backends, of the batched writes and of the dumps. Written, it is
// Dst via Gw on link LinkIndex (with the onlink flag when Onlink), or, with
// NexthopID set, Dst via that nexthop object (Gw and LinkIndex unused), in
// Table (0: the main table) with metric Priority (0: the kernel's default)
// and TOS Tos, as a unicast route. A dump fills every field; Type, Protocol,
// Scope and Multipath are read only.
type Route struct {
	Dst       netip.Prefix // 0.0.0.0/0 (::/0) for a default route
	Gw        netip.Addr   // invalid if none
	LinkIndex int
	NexthopID uint32 // 0 unless the route uses a nexthop object
	Priority  uint32 // the metric
	Table     uint32
	Tos       uint8
	Type      uint8
	Protocol  uint8
	Scope     uint8
	Onlink    bool
	Multipath bool // several next hops (RTA_MULTIPATH)
}

// Netlink returns r in vishvananda/netlink's form (without NexthopID,
// which that package does not model).
func (r Route) Netlink() *netlink.Route {
	nr := &netlink.Route{
		LinkIndex: r.LinkIndex,
		Dst:       &net.IPNet{IP: r.Dst.Addr().AsSlice(), Mask: net.CIDRMask(r.Dst.Bits(), r.Dst.Addr().BitLen())},
		Gw:        r.Gw.AsSlice(),
		Table:     int(r.table()),
		Priority:  int(r.Priority),
		Tos:       int(r.Tos),
	}
	if r.Onlink {
		nr.Flags = int(netlink.FLAG_ONLINK)
	}
	return nr
}

func (r *Route) table() uint32 {
	if r.Table == 0 {
		return unix.RT_TABLE_MAIN
	}
	return r.Table
}

// Nexthop is a nexthop object: Gw (IPv4 or IPv6) on link LinkIndex.
type Nexthop struct {
	ID        uint32
	Gw        netip.Addr
	LinkIndex int
	Onlink    bool
}

// Neigh is a neighbour (Family AF_INET or AF_INET6: IP has lladdr MAC) or an
// fdb entry (Family AF_BRIDGE with NTF_SELF: frames to MAC go to IP, in VNI
// if not 0): the one neighbour type of the backends, of the batched writes
// and of the dumps. A dump leaves MAC zero when the entry has no 6-byte
// lladdr.
type Neigh struct {
	IP        netip.Addr // NDA_DST; invalid if none
	LinkIndex int
	VNI       uint32
	State     uint16
	MAC       [6]byte
	Family    uint8
	Flags     uint8
	Type      uint8
}

// ReplaceRoutes adds or replaces each route (ip route replace). errs, if not
// nil, must be as long as routes and receives each route's result.
func (h *Handle) ReplaceRoutes(routes []Route, errs []error) error {
	h.reset()
	for i := range routes {
		h.route(unix.RTM_NEWROUTE, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, &routes[i])
	}
	return h.run(errs)
}

// DeleteRoutes deletes each route, naming its gateway and link (or
// nexthop) so that only that route goes.
func (h *Handle) DeleteRoutes(routes []Route, errs []error) error {
	h.reset()
	for i := range routes {
		h.route(unix.RTM_DELROUTE, 0, &routes[i])
	}
	return h.run(errs)
}

// ReplaceNexthops adds or replaces each nexthop object.
func (h *Handle) ReplaceNexthops(nhs []Nexthop, errs []error) error {
	h.reset()
	for i := range nhs {
		n := &nhs[i]
		var flags uint32
		if n.Onlink {
			flags = unix.RTNH_F_ONLINK
		}
		b := h.begin(unix.RTM_NEWNEXTHOP, unix.NLM_F_CREATE|unix.NLM_F_REPLACE)
		// struct nhmsg: family, scope, protocol, resvd, flags.
		b = append(b, family(n.Gw), unix.RT_SCOPE_UNIVERSE, unix.RTPROT_BOOT, 0)
		b = binary.NativeEndian.AppendUint32(b, flags)
		b = attrU32(b, unix.NHA_ID, n.ID)
		b = attrAddr(b, unix.NHA_GATEWAY, n.Gw)
		b = attrU32(b, unix.NHA_OIF, uint32(n.LinkIndex))
		h.end(b)
	}
	return h.run(errs)
}

// DeleteNexthops deletes the nexthop objects with the given IDs.
func (h *Handle) DeleteNexthops(ids []uint32, errs []error) error {
	h.reset()
	for _, id := range ids {
		b := h.begin(unix.RTM_DELNEXTHOP, 0)
		b = append(b, unix.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0)
		b = attrU32(b, unix.NHA_ID, id)
		h.end(b)
	}
	return h.run(errs)
}

// SetNeighs adds or replaces each neighbour or fdb entry (ip neigh replace,
// bridge fdb replace).
func (h *Handle) SetNeighs(ns []Neigh, errs []error) error {
	h.reset()
	for i := range ns {
		h.neigh(unix.RTM_NEWNEIGH, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, &ns[i])
	}
	return h.run(errs)
}

// DeleteNeighs deletes each neighbour or fdb entry.
func (h *Handle) DeleteNeighs(ns []Neigh, errs []error) error {
	h.reset()
	for i := range ns {
		h.neigh(unix.RTM_DELNEIGH, 0, &ns[i])
	}
	return h.run(errs)
}

func (h *Handle) route(typ uint16, flags uint16, r *Route) {
	b := h.begin(typ, flags)
	var rtFlags uint32
	if r.Onlink {
		rtFlags = unix.RTNH_F_ONLINK
	}
	scope, proto, rtype := uint8(unix.RT_SCOPE_UNIVERSE), uint8(unix.RTPROT_BOOT), uint8(unix.RTN_UNICAST)
	if typ == unix.RTM_DELROUTE {
		// As ip route del: match any protocol and type.
		scope, proto, rtype = unix.RT_SCOPE_NOWHERE, 0, 0
	}
	table := r.table()
	// struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope,
	// type, flags.
	b = append(b, family(r.Dst.Addr()), uint8(r.Dst.Bits()), 0, r.Tos, uint8(min(table, unix.RT_TABLE_COMPAT)), proto, scope, rtype)
	b = binary.NativeEndian.AppendUint32(b, rtFlags)
	if table >= unix.RT_TABLE_COMPAT {
		b = attrU32(b, unix.RTA_TABLE, table)
	}
	b = attrAddr(b, unix.RTA_DST, r.Dst.Addr())
	if r.Priority != 0 {
		b = attrU32(b, unix.RTA_PRIORITY, r.Priority)
	}
	if r.NexthopID != 0 {
		b = attrU32(b, rtaNHID, r.NexthopID)
	} else {
		b = attrAddr(b, unix.RTA_GATEWAY, r.Gw)
		b = attrU32(b, unix.RTA_OIF, uint32(r.LinkIndex))
	}
	h.end(b)
}

func (h *Handle) neigh(typ uint16, flags uint16, n *Neigh) {
	b := h.begin(typ, flags)
	// struct ndmsg: family, pad1, pad2, ifindex, state, flags, type.
	b = append(b, n.Family, 0, 0, 0)
	b = binary.NativeEndian.AppendUint32(b, uint32(n.LinkIndex))
	b = binary.NativeEndian.AppendUint16(b, n.State)
	b = append(b, n.Flags, n.Type)
	if n.IP.IsValid() {
		b = attr(b, unix.NDA_DST, n.IP.AsSlice())
	}
	if n.MAC != [6]byte{} || n.Family == unix.AF_BRIDGE {
		b = attr(b, unix.NDA_LLADDR, n.MAC[:])
	}
	if n.VNI != 0 {
		b = attrU32(b, unix.NDA_VNI, n.VNI)
	}
	h.end(b)
}

func (h *Handle) reset() {
	h.buf = h.buf[:0]
	h.ends = h.ends[:0]
}

// begin appends a netlink header (length filled in by end) and returns buf.
func (h *Handle) begin(typ, flags uint16) []byte {
	var hdr [unix.SizeofNlMsghdr]byte
	binary.NativeEndian.PutUint16(hdr[4:], typ)
	binary.NativeEndian.PutUint16(hdr[6:], unix.NLM_F_REQUEST|flags)
	return append(h.buf, hdr[:]...)
}

// end closes the request that begins after the previous one.
func (h *Handle) end(b []byte) {
	start := 0
	if len(h.ends) > 0 {
		start = h.ends[len(h.ends)-1]
	}
	binary.NativeEndian.PutUint32(b[start:], uint32(len(b)-start))
	h.buf = b
	h.ends = append(h.ends, len(b))
}

func attr(b []byte, typ uint16, val []byte) []byte {
	b = binary.NativeEndian.AppendUint16(b, uint16(unix.SizeofRtAttr+len(val)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, val...)
	for len(b)%unix.NLA_ALIGNTO != 0 {
		b = append(b, 0)
	}
	return b
}

// family is AF_INET for an IPv4 address, else AF_INET6.
func family(a netip.Addr) uint8 {
	if a.Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

// attrAddr appends a as 4 bytes (IPv4) or 16 (IPv6).
func attrAddr(b []byte, typ uint16, a netip.Addr) []byte {
	if a.Is4() {
		a4 := a.As4()
		return attr(b, typ, a4[:])
	}
	a16 := a.As16()
	return attr(b, typ, a16[:])
}

func attrU32(b []byte, typ uint16, v uint32) []byte {
	var a [4]byte
	binary.NativeEndian.PutUint32(a[:], v)
	return attr(b, typ, a[:])
}

// run sends the queued requests in chunks and fills errs (if given) with
// each request's result. The returned error is a socket failure; requests
// whose result is then unknown get it too.
func (h *Handle) run(errs []error) error {
	defer h.trim()
	n := len(h.ends)
	if errs == nil {
		if cap(h.errs) < n {
			h.errs = make([]error, n)
		}
		errs = h.errs[:n]
	}
	if len(errs) != n {
		return fmt.Errorf("nlbatch: %d results for %d requests", len(errs), n)
	}
	clear(errs)
	for first := 0; first < n; {
		last, start := first, 0
		if first > 0 {
			start = h.ends[first-1]
		}
		for last+1 < n && last+1-first < chunkMsgs && h.ends[last+1]-start <= chunkBytes {
			last++
		}
		if err := h.chunk(first, last, start, errs); err != nil {
			for i := first; i <= last; i++ {
				if errs[i] == nil {
					errs[i] = err
				}
			}
			for i := last + 1; i < n; i++ {
				errs[i] = err
			}
			return err
		}
		first = last + 1
	}
	return nil
}

// keepBytes is the largest request buffer kept between calls; a bigger one
// (a burst of thousands of changes) is left to the garbage collector.
const keepBytes = 64 << 10

func (h *Handle) trim() {
	if cap(h.buf) > keepBytes {
		h.buf, h.ends, h.errs = nil, nil, nil
	}
}

// chunk sends requests first..last (which begin at buf[start]) in one
// sendmsg, the last one asking for an acknowledgement, and reads the answers
// until that acknowledgement.
func (h *Handle) chunk(first, last, start int, errs []error) error {
	base := h.seq + 1
	off := start
	for i := first; i <= last; i++ {
		h.seq++
		binary.NativeEndian.PutUint32(h.buf[off+8:], h.seq)
		if i == last {
			f := binary.NativeEndian.Uint16(h.buf[off+6:])
			binary.NativeEndian.PutUint16(h.buf[off+6:], f|unix.NLM_F_ACK)
		}
		off = h.ends[i]
	}
	if err := unix.Sendto(h.sock.GetFd(), h.buf[start:h.ends[last]], 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("sending %d netlink requests: %w", last-first+1, err)
	}
	for {
		msgs, _, err := h.sock.Receive()
		if err != nil {
			return fmt.Errorf("reading netlink answers: %w", err)
		}
		for _, m := range msgs {
			if m.Header.Type != unix.NLMSG_ERROR || m.Header.Seq < base || m.Header.Seq > h.seq {
				continue // an answer to an earlier, abandoned chunk
			}
			if len(m.Data) < 4 {
				return ErrShortAnswer
			}
			if code := int32(binary.NativeEndian.Uint32(m.Data)); code != 0 {
				errs[first+int(m.Header.Seq-base)] = syscall.Errno(-code)
			}
			if m.Header.Seq == h.seq {
				return nil
			}
		}
	}
}

// ipv4DevconfPromoteSecondaries is IPV4_DEVCONF_PROMOTE_SECONDARIES of
// linux/ip.h.
const ipv4DevconfPromoteSecondaries = 20

// PromoteSecondaries turns on net.ipv4.conf.<link>.promote_secondaries for
// the link with index link: deleting the primary IPv4 address of a subnet
// then makes the next address of that subnet primary instead of deleting it
// too, so that a new address can be added before the old one goes.
func (h *Handle) PromoteSecondaries(link int) error {
	h.reset()
	b := h.begin(unix.RTM_SETLINK, 0)
	// struct ifinfomsg: family, pad, type, index, flags, change.
	b = append(b, unix.AF_UNSPEC, 0, 0, 0)
	b = binary.NativeEndian.AppendUint32(b, uint32(link))
	b = append(b, 0, 0, 0, 0, 0, 0, 0, 0)
	conf := attrU32(nil, ipv4DevconfPromoteSecondaries, 1)
	inet := attr(nil, unix.IFLA_INET_CONF, conf)
	spec := attr(nil, unix.AF_INET, inet)
	b = attr(b, unix.IFLA_AF_SPEC, spec)
	h.end(b)
	var errs [1]error
	if err := h.run(errs[:]); err != nil {
		return fmt.Errorf("setting promote_secondaries on link %d: %w", link, err)
	}
	if errs[0] != nil {
		return fmt.Errorf("setting promote_secondaries on link %d: %w", link, errs[0])
	}
	return nil
}
