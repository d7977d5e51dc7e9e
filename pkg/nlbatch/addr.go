package nlbatch

import (
	"encoding/binary"
	"net/netip"

	"golang.org/x/sys/unix"
)

// ReplaceAddr adds or replaces the address p on link (ip address replace p
// dev link metric metric): for IPv4 with the broadcast address of p (as
// vishvananda/netlink adds it), and with metric as the metric of the prefix
// route the kernel keeps for the address (IFA_RT_PRIORITY, Linux 4.18 and
// later; 0 is the kernel's default). Replacing an existing address changes
// the metric of its prefix route in place: the route never goes away.
func (h *Handle) ReplaceAddr(link int, p netip.Prefix, metric uint32) error {
	h.reset()
	b := h.begin(unix.RTM_NEWADDR, unix.NLM_F_CREATE|unix.NLM_F_REPLACE)
	// struct ifaddrmsg: family, prefixlen, flags, scope, index.
	b = append(b, family(p.Addr()), uint8(p.Bits()), 0, unix.RT_SCOPE_UNIVERSE)
	b = binary.NativeEndian.AppendUint32(b, uint32(link))
	b = attrAddr(b, unix.IFA_LOCAL, p.Addr())
	b = attrAddr(b, unix.IFA_ADDRESS, p.Addr())
	if p.Addr().Is4() && p.Bits() < 31 {
		a := p.Addr().As4()
		v := binary.BigEndian.Uint32(a[:]) | (1<<(32-p.Bits()) - 1)
		var brd [4]byte
		binary.BigEndian.PutUint32(brd[:], v)
		b = attr(b, unix.IFA_BROADCAST, brd[:])
	}
	if metric != 0 {
		b = attrU32(b, unix.IFA_RT_PRIORITY, metric)
	}
	h.end(b)
	errs := []error{nil}
	if err := h.run(errs); err != nil {
		return err
	}
	return errs[0]
}
