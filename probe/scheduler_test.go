package probe

import (
	"fmt"
	"net/netip"
	"testing"
	"time"
)

func testPeers(n int) []*peer {
	ps := make([]*peer, n)
	for i := range ps {
		a := netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 0})
		ps[i] = &peer{subnet: netip.PrefixFrom(a, 24), target: a}
	}
	return ps
}

// drive runs s from start for d, sending whenever it asks, and returns the
// send times per peer and in order.
func drive(s *scheduler, start time.Time, d time.Duration) (map[*peer][]time.Time, []time.Time) {
	sends := map[*peer][]time.Time{}
	var all []time.Time
	now := start
	for now.Before(start.Add(d)) {
		p, _, wait := s.next(now)
		if p != nil {
			sends[p] = append(sends[p], now)
			all = append(all, now)
			continue
		}
		if wait == 0 {
			wait = time.Second
		}
		now = now.Add(wait)
	}
	return sends, all
}

// maxInWindow is the most sends in any half-open window of length w.
func maxInWindow(all []time.Time, w time.Duration) int {
	most, j := 0, 0
	for i := range all {
		for all[i].Sub(all[j]) >= w {
			j++
		}
		most = max(most, i-j+1)
	}
	return most
}

// TestSchedulerBudget: at 5,000 peers and the default rate no second holds
// more than rate probes, and every peer is probed every peers/rate; with
// three peers each is probed first at once, then every MinRound.
func TestSchedulerBudget(t *testing.T) {
	start := time.Unix(1000, 0)
	for _, tt := range []struct{ peers, rate int }{{5000, 20}, {3, 20}, {300, 20}, {5000, 200}, {10, 1}} {
		t.Run(fmt.Sprintf("%d peers at %d per s", tt.peers, tt.rate), func(t *testing.T) {
			s := newScheduler(tt.rate)
			ps := testPeers(tt.peers)
			for _, p := range ps {
				s.add(p)
			}
			interval := max(MinRound, time.Duration(tt.peers)*time.Second/time.Duration(tt.rate))
			// New peers are queued first: the first N probes are one per peer.
			sends, all := drive(s, start, 3*interval+2*time.Duration(tt.peers)*time.Second/time.Duration(tt.rate))
			if n := maxInWindow(all, time.Second); n > tt.rate {
				t.Errorf("%d probes within one second, rate %d", n, tt.rate)
			}
			for i, p := range ps {
				got := sends[p]
				if len(got) < 3 {
					t.Fatalf("peer %d probed %d times in three rounds", i, len(got))
				}
				// The first probe comes from the queue of new peers, in order.
				if want := start.Add(time.Duration(i) * time.Second / time.Duration(tt.rate)); !got[0].Equal(want) {
					t.Errorf("peer %d first probed at %v, want %v", i, got[0].Sub(start), want.Sub(start))
				}
				for j := 2; j < len(got); j++ {
					if gap := got[j].Sub(got[j-1]); gap > interval+time.Second/time.Duration(tt.rate) {
						t.Errorf("peer %d: %v between probes %d and %d, want at most %v", i, gap, j-1, j, interval)
						break
					}
				}
			}
		})
	}
}

// TestSchedulerUrgentFirst: a peer asking for a probe goes before the
// round; removed and in-flight peers are skipped; removed ones leave the
// ring at the next round.
func TestSchedulerUrgentFirst(t *testing.T) {
	s := newScheduler(10)
	ps := testPeers(4)
	for _, p := range ps {
		s.add(p)
	}
	now := time.Unix(0, 0)
	next := func() (*peer, kind) {
		t.Helper()
		for range 100 {
			p, k, wait := s.next(now)
			if p != nil {
				return p, k
			}
			if wait == 0 {
				return nil, small
			}
			now = now.Add(wait)
		}
		t.Fatal("no probe after 100 waits")
		return nil, small
	}
	for i := range 4 { // the new peers' queue
		if p, _ := next(); p != ps[i] {
			t.Fatalf("probe %d went to %v, want %v", i, p.subnet, ps[i].subnet)
		}
	}
	s.remove(ps[1])
	ps[2].inflight = true
	s.urgent(ps[3], big)
	if p, k := next(); p != ps[3] || k != big {
		t.Fatalf("urgent probe went to %v (%v), want %v (full)", p.subnet, k, ps[3].subnet)
	}
	var got []netip.Prefix
	for range 2 {
		p, _ := next()
		got = append(got, p.subnet)
	}
	if got[0] != ps[0].subnet || got[1] != ps[3].subnet {
		t.Errorf("round probed %v, want %v and %v (removed and in-flight peers skipped)", got, ps[0].subnet, ps[3].subnet)
	}
	before := now
	next()
	if now.Sub(before) < MinRound-time.Second || len(s.ring) != 3 {
		t.Errorf("next round after %v with %d peers, want about %v and 3", now.Sub(before), len(s.ring), MinRound)
	}
}
