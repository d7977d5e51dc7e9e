package probe

import (
	"fmt"
	"net/netip"
	"time"
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

// peer is the fixed-size record the prober keeps per peer: a few
// addresses, counters and times, no pointers to per-probe data.
type peer struct {
	subnet netip.Prefix
	public netip.Addr
	target netip.Addr // the address probed

	state     State
	smallLoss uint8 // small probes lost in a row
	bigLoss   uint8 // full-size probes lost in a row, each after an answered small one
	smallOK   bool  // the last small probe was answered
	replied   bool  // any probe was ever answered
	bigOK     bool  // a full-size probe was ever answered
	want      kind  // the size of the next priority probe
	queued    bool  // in the scheduler's priority queue
	inflight  bool  // a probe is out
	gone      bool  // removed from the lease set
	visits    uint32

	rtt    time.Duration // of the last answered probe
	since  time.Time     // when state was entered
	lastOK time.Time     // when a probe was last answered
	first  time.Time     // when the peer was first seen
}

// settled reports whether the probes so far tell the peer's state for
// both sizes (flanneld --check stops there).
func (p *peer) settled() bool {
	return p.state == Unreachable || p.state == MTUBlackhole || (p.state == Reachable && p.bigOK && p.bigLoss == 0)
}

// result folds the outcome of one probe into p's counters and returns the
// state they give now. ok is whether it was answered.
func (p *peer) result(k kind, ok bool, rtt time.Duration, now time.Time) State {
	switch {
	case ok:
		p.replied, p.rtt, p.lastOK = true, rtt, now
		p.smallLoss, p.smallOK = 0, true // a full-size answer proves a small one passes
		if k == big {
			p.bigLoss, p.bigOK = 0, true
		}
	case k == small:
		p.smallOK = false
		if p.smallLoss < 255 {
			p.smallLoss++
		}
	case p.smallOK && p.bigLoss < 255:
		// A full-size probe lost right after an answered small one.
		p.bigLoss++
		p.smallOK = false // ask again with a small one before the next counts
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
	case !p.replied:
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
