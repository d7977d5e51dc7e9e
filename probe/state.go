package probe

import (
	"fmt"
	"math"
	"net/netip"
	"time"

	"github.com/flanneld-go/flanneld/subnet"
)

// State is what a node knows of the path to one peer.
type State uint8

// The states of a peer.
const (
	// Unprobed: no probe answered or lost K times yet.
	Unprobed State = iota
	// Reachable: the last small probe was answered and full-size probes
	// are not being lost.
	Reachable
	// Unreachable: the last LossThreshold small probes were lost.
	Unreachable
	// MTUBlackhole: small probes are answered, the last BigLossThreshold
	// full-size probes (FLANNEL_MTU bytes, DF set) were lost.
	MTUBlackhole
	numStates
)

// States lists every state, in order.
var States = []State{Unprobed, Reachable, Unreachable, MTUBlackhole}

const (
	// LossThreshold is how many small probes in a row must be lost for a
	// peer to be unreachable.
	LossThreshold = 3
	// BigLossThreshold is how many full-size probes in a row, each after
	// an answered small one, must be lost for an MTU black hole.
	BigLossThreshold = 2
)

func (s State) String() string {
	switch s {
	case Reachable:
		return "reachable"
	case Unreachable:
		return "unreachable"
	case MTUBlackhole:
		return "mtu-blackhole"
	}
	return "unprobed"
}

// MarshalText makes a State a JSON string.
func (s State) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText reads a State's name (for clients of /peers).
func (s *State) UnmarshalText(b []byte) error {
	for _, st := range States {
		if st.String() == string(b) {
			*s = st
			return nil
		}
	}
	return fmt.Errorf("unknown peer state %q: want one of unprobed, reachable, unreachable, mtu-blackhole", b)
}

// kind is the size of a probe: small (an echo with a few bytes) or big
// (FLANNEL_MTU bytes with DF set).
type kind uint8

const (
	small kind = iota
	big
)

func (k kind) String() string {
	if k == big {
		return "full"
	}
	return "small"
}

// peer is the record the prober keeps per peer, in one slice (table): 64
// bytes of plain data, no pointers, so that 10,000 peers are one
// allocation the garbage collector need not scan. Addresses are bytes and
// a family, times nanoseconds since the run's epoch (its clock's time when
// it started), flags bits.
type peer struct {
	since mono   // when state was entered
	from  mono   // when a probe was last answered; before any answer, when the peer was first seen or its address changed
	rtt   uint32 // nanoseconds of the last answered probe (saturated: 4.29 s)

	key    subnet.PrefixKey // the subnet
	public [16]byte         // the public address, of family pubFam
	pubFam addrFamily
	free   bool // the slot is free (table.free)

	state     State
	smallLoss uint8 // small probes lost in a row (saturated)
	bigLoss   uint8 // full-size probes lost in a row, each after an answered small one (saturated)
	want      kind  // the size of the next priority probe
	visits    uint8 // regular probes so far, modulo bigEvery
	flags     flags
}

// mono is a time as nanoseconds since the run's epoch.
type mono int64

// flags are a peer's yes/no facts.
type flags uint8

const (
	smallOK  flags = 1 << iota // the last small probe was answered
	replied                    // any probe was answered since the address was set
	bigOK                      // a full-size probe was ever answered
	answered                   // any probe was ever answered (from is the last answer)
	queued                     // in the scheduler's priority queue
	inflight                   // a probe is out
	gone                       // removed from the lease set (the slot is free once neither queued nor in flight)
	seen                       // in the lease set of the setView of this parity (run.parity)
)

func (p *peer) has(f flags) bool { return p.flags&f != 0 }

func (p *peer) set(f flags, on bool) {
	if on {
		p.flags |= f
	} else {
		p.flags &^= f
	}
}

// addrFamily is how an address is kept: none (invalid), IPv4 (the last 4
// bytes) or IPv6.
type addrFamily uint8

const (
	famNone addrFamily = iota
	fam4
	fam6
)

// packAddr and unpackAddr convert an address to bytes and back (an IPv6
// zone is not kept: peers' addresses have none).
func packAddr(a netip.Addr) ([16]byte, addrFamily) {
	switch {
	case a.Is4():
		return a.As16(), fam4
	case a.Is6():
		return a.As16(), fam6
	}
	return [16]byte{}, famNone
}

func unpackAddr(b [16]byte, f addrFamily) netip.Addr {
	switch f {
	case fam4:
		return netip.AddrFrom16(b).Unmap()
	case fam6:
		return netip.AddrFrom16(b)
	}
	return netip.Addr{}
}

// rttOf is d as a peer keeps it.
func rttOf(d time.Duration) uint32 { return uint32(min(max(d, 0), math.MaxUint32)) }

// settled reports whether the probes so far tell the peer's state for
// both sizes (flanneld --check stops there).
func (p *peer) settled() bool {
	return p.state == Unreachable || p.state == MTUBlackhole || (p.state == Reachable && p.has(bigOK) && p.bigLoss == 0)
}

// result folds the outcome of one probe into p's counters and returns the
// state they give now. ok is whether it was answered.
func (p *peer) result(k kind, ok bool, rtt time.Duration, now mono) State {
	switch {
	case ok:
		p.rtt, p.from = rttOf(rtt), now
		p.flags |= replied | answered | smallOK // a full-size answer proves a small one passes
		p.smallLoss = 0
		if k == big {
			p.bigLoss = 0
			p.flags |= bigOK
		}
	case k == small:
		p.set(smallOK, false)
		if p.smallLoss < 255 {
			p.smallLoss++
		}
	case p.has(smallOK) && p.bigLoss < 255:
		// A full-size probe lost right after an answered small one.
		p.bigLoss++
		p.set(smallOK, false) // ask again with a small one before the next counts
	}
	return p.computed()
}

// computed is the state of the counters: K small losses in a row mean
// unreachable; answered small and lost full-size probes mean a black hole;
// an answer with no recent loss means reachable; in between (one or two
// losses so far) the state holds.
func (p *peer) computed() State {
	switch {
	case p.smallLoss >= LossThreshold:
		return Unreachable
	case !p.has(replied):
		return p.state
	case p.bigLoss >= BigLossThreshold:
		return MTUBlackhole
	case p.smallLoss == 0 && p.bigLoss == 0:
		return Reachable
	case p.state == Unprobed || p.state == Unreachable:
		if p.smallLoss == 0 {
			return Reachable // answered again; a pending full-size check does not hold it back
		}
	}
	return p.state
}
