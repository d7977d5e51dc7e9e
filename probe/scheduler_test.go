package probe

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/flanneld-go/flanneld/subnet"
)

// testPeers is a table of n peers, in slots 0 to n-1.
func testPeers(n int) *table {
	t := newTable()
	for i := range n {
		a := netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 0})
		t.add(peer{key: subnet.KeyOf(netip.PrefixFrom(a, 24))})
	}
	return t
}

// drive runs s from start for d, sending whenever it asks, and returns the
// send times per peer and in order.
func drive(s *scheduler, start time.Time, d time.Duration) (map[int32][]time.Time, []time.Time) {
	sends := map[int32][]time.Time{}
	var all []time.Time
	now := start
	for now.Before(start.Add(d)) {
		i, _, wait := s.next(now)
		if i >= 0 {
			sends[i] = append(sends[i], now)
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
			s := newScheduler(tt.rate, testPeers(tt.peers))
			for i := range tt.peers {
				s.add(int32(i))
			}
			interval := max(MinRound, time.Duration(tt.peers)*time.Second/time.Duration(tt.rate))
			// New peers are queued first: the first N probes are one per peer.
			sends, all := drive(s, start, 3*interval+2*time.Duration(tt.peers)*time.Second/time.Duration(tt.rate))
			if n := maxInWindow(all, time.Second); n > tt.rate {
				t.Errorf("%d probes within one second, rate %d", n, tt.rate)
			}
			for i := range tt.peers {
				got := sends[int32(i)]
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
	tb := testPeers(4)
	s := newScheduler(10, tb)
	for i := range int32(4) {
		s.add(i)
	}
	now := time.Unix(0, 0)
	next := func() (int32, kind) {
		t.Helper()
		for range 100 {
			i, k, wait := s.next(now)
			if i >= 0 {
				return i, k
			}
			if wait == 0 {
				return -1, small
			}
			now = now.Add(wait)
		}
		t.Fatal("no probe after 100 waits")
		return -1, small
	}
	for i := range int32(4) { // the new peers' queue
		if got, _ := next(); got != i {
			t.Fatalf("probe %d went to slot %d, want %d", i, got, i)
		}
	}
	s.remove(1)
	tb.peers[2].set(inflight, true)
	s.urgent(3, big)
	if i, k := next(); i != 3 || k != big {
		t.Fatalf("urgent probe went to slot %d (%v), want 3 (full)", i, k)
	}
	var got []int32
	for range 2 {
		i, _ := next()
		got = append(got, i)
	}
	if got[0] != 0 || got[1] != 3 {
		t.Errorf("round probed slots %v, want 0 and 3 (removed and in-flight peers skipped)", got)
	}
	before := now
	next()
	if now.Sub(before) < MinRound-time.Second || tb.live != 3 || len(tb.free) != 1 || tb.free[0] != 1 || tb.lookup(tb.peers[1].key) != -1 {
		t.Errorf("next round after %v with %d peers, free slots %v; want about %v, 3, and slot 1 free and not found", now.Sub(before), tb.live, tb.free, MinRound)
	}
}
