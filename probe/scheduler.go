package probe

import (
	"time"
)

const (
	// MinRound is the shortest time between two regular probes of one
	// peer: with few peers each is probed every MinRound; with more than
	// rate × MinRound, every peers/rate.
	MinRound = 10 * time.Second
	// bigEvery makes every bigEvery-th regular probe of a peer a
	// full-size one.
	bigEvery = 3
)

// scheduler decides which peer to probe next within the budget: at most
// one probe per 1/rate, so that any second holds at most rate probes.
// Priority probes (new peers, peers with a loss to confirm) go first, in
// the order they were asked for; the rest of the budget walks the peers
// round-robin, one round every max(MinRound, peers/rate). It never sleeps:
// next says how long to wait, and the caller's timer (on an injected
// clock) calls it again.
type scheduler struct {
	gap        time.Duration // 1/rate
	ring       []*peer       // round-robin order; removed peers leave at the next round
	cursor     int           // next index of ring in this round
	roundStart time.Time
	prio       []*peer // FIFO of peers asking to be probed soon
	lastSend   time.Time
	sent       bool
	live       int // peers in the ring not removed
}

func newScheduler(rate int) *scheduler {
	return &scheduler{gap: time.Second / time.Duration(rate)}
}

// add puts a new peer in the ring and asks for a probe of it soon.
func (s *scheduler) add(p *peer) {
	s.ring = append(s.ring, p)
	s.live++
	s.urgent(p, small)
}

// remove takes p out: it is skipped from now on and leaves the ring at the
// start of the next round.
func (s *scheduler) remove(p *peer) {
	if !p.gone {
		p.gone = true
		s.live--
	}
}

// urgent asks for a probe of size k of p ahead of the round-robin.
func (s *scheduler) urgent(p *peer, k kind) {
	p.want = k
	if !p.queued {
		p.queued = true
		s.prio = append(s.prio, p)
	}
}

// interval is the time between two rounds.
func (s *scheduler) interval() time.Duration {
	return max(MinRound, time.Duration(s.live)*s.gap)
}

// next returns the peer to probe now and the size of its probe, or nil and
// how long to wait before asking again (0: nothing to do until a peer is
// added or asks for a probe).
func (s *scheduler) next(now time.Time) (*peer, kind, time.Duration) {
	if s.sent {
		if wait := s.lastSend.Add(s.gap).Sub(now); wait > 0 {
			return nil, small, wait
		}
	}
	for len(s.prio) > 0 {
		p := s.prio[0]
		s.prio[0] = nil
		s.prio = s.prio[1:]
		if len(s.prio) == 0 {
			s.prio = nil // let the backing array go
		}
		p.queued = false
		if p.gone || p.inflight {
			continue // a result will ask again if it needs to
		}
		s.sendAt(now)
		return p, p.want, 0
	}
	for {
		if s.cursor >= len(s.ring) {
			if len(s.ring) == 0 {
				return nil, small, 0
			}
			if wait := s.roundStart.Add(s.interval()).Sub(now); wait > 0 {
				return nil, small, wait
			}
			s.compact()
			s.cursor, s.roundStart = 0, now
			if len(s.ring) == 0 {
				return nil, small, 0
			}
		}
		if s.roundStart.IsZero() {
			s.roundStart = now
		}
		p := s.ring[s.cursor]
		s.cursor++
		if p.gone || p.inflight {
			continue
		}
		p.visits++
		k := small
		if p.visits%bigEvery == 0 {
			k = big
		}
		s.sendAt(now)
		return p, k, 0
	}
}

func (s *scheduler) sendAt(now time.Time) { s.lastSend, s.sent = now, true }

// compact drops removed peers from the ring, between rounds.
func (s *scheduler) compact() {
	kept := s.ring[:0]
	for _, p := range s.ring {
		if !p.gone {
			kept = append(kept, p)
		}
	}
	clear(s.ring[len(kept):])
	s.ring = kept
}
