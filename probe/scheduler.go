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
// the order they were asked for; the rest of the budget walks the table's
// slots round-robin, one round every max(MinRound, peers/rate). It never
// sleeps: next says how long to wait, and the caller's timer (on an
// injected clock) calls it again. Peers are slots of t.
type scheduler struct {
	gap        time.Duration // 1/rate
	t          *table
	cursor     int // next slot in this round
	roundStart time.Time
	prio       []int32 // FIFO of slots asking to be probed soon
	lastSend   time.Time
	sent       bool
}

func newScheduler(rate int, t *table) *scheduler {
	return &scheduler{gap: time.Second / time.Duration(rate), t: t}
}

// add asks for a probe of a new peer soon; the round reaches it by its
// slot.
func (s *scheduler) add(i int32) { s.urgent(i, small) }

// remove takes slot i's peer out: it is skipped from now on.
func (s *scheduler) remove(i int32) { s.t.remove(i) }

// urgent asks for a probe of size k of slot i's peer ahead of the round.
func (s *scheduler) urgent(i int32, k kind) {
	p := &s.t.peers[i]
	p.want = k
	if !p.has(queued) {
		p.set(queued, true)
		s.prio = append(s.prio, i)
	}
}

// interval is the time between two rounds.
func (s *scheduler) interval() time.Duration {
	return max(MinRound, time.Duration(s.t.live)*s.gap)
}

// next returns the slot to probe now and the size of its probe, or -1 and
// how long to wait before asking again (0: nothing to do until a peer is
// added or asks for a probe).
func (s *scheduler) next(now time.Time) (int32, kind, time.Duration) {
	if s.sent {
		if wait := s.lastSend.Add(s.gap).Sub(now); wait > 0 {
			return -1, small, wait
		}
	}
	for len(s.prio) > 0 {
		i := s.prio[0]
		s.prio = s.prio[1:]
		if len(s.prio) == 0 {
			s.prio = nil // let the backing array go
		}
		p := &s.t.peers[i]
		p.set(queued, false)
		if p.has(gone) || p.has(inflight) {
			s.t.release(i)
			continue // a result will ask again if it needs to
		}
		s.sendAt(now)
		return i, p.want, 0
	}
	for {
		if s.cursor >= len(s.t.peers) {
			if s.t.live == 0 {
				return -1, small, 0
			}
			if wait := s.roundStart.Add(s.interval()).Sub(now); wait > 0 {
				return -1, small, wait
			}
			s.cursor, s.roundStart = 0, now
		}
		if s.roundStart.IsZero() {
			s.roundStart = now
		}
		i := int32(s.cursor)
		s.cursor++
		p := &s.t.peers[i]
		if p.has(gone) || p.has(inflight) {
			continue
		}
		p.visits = (p.visits + 1) % bigEvery
		k := small
		if p.visits == 0 {
			k = big
		}
		s.sendAt(now)
		return i, k, 0
	}
}

func (s *scheduler) sendAt(now time.Time) { s.lastSend, s.sent = now, true }
