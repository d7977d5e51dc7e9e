package probe

import (
	"testing"
	"time"
)

// TestPeerStates: the state a sequence of probe outcomes leads to.
func TestPeerStates(t *testing.T) {
	type step struct {
		k  kind
		ok bool
	}
	S, SL, B, BL := step{small, true}, step{small, false}, step{big, true}, step{big, false}
	tests := []struct {
		name  string
		steps []step
		want  []State // after each step
	}{
		{"first answer", []step{S}, []State{Reachable}},
		{"never answered", []step{SL, SL, SL}, []State{Unprobed, Unprobed, Unreachable}},
		{"two losses hold", []step{S, SL, SL, S}, []State{Reachable, Reachable, Reachable, Reachable}},
		{"three losses", []step{S, SL, SL, SL, S}, []State{Reachable, Reachable, Reachable, Unreachable, Reachable}},
		{"black hole", []step{S, BL, S, BL, S, B}, []State{Reachable, Reachable, Reachable, MTUBlackhole, MTUBlackhole, Reachable}},
		// A full-size loss counts only right after an answered small one:
		// a host that is down is not a black hole.
		{"down, not a black hole", []step{S, BL, SL, BL, SL, SL}, []State{Reachable, Reachable, Reachable, Reachable, Reachable, Unreachable}},
		{"black hole, then down, then back", []step{S, BL, S, BL, SL, SL, SL, S}, []State{Reachable, Reachable, Reachable, MTUBlackhole, MTUBlackhole, MTUBlackhole, Unreachable, MTUBlackhole}},
		{"full size answers first", []step{B}, []State{Reachable}},
	}
	for _, tt := range tests {
		p := &peer{}
		for i, st := range tt.steps {
			s := p.result(st.k, st.ok, time.Millisecond, 0)
			p.state = s
			if s != tt.want[i] {
				t.Errorf("%s: after step %d (%v answered %v) state %v, want %v", tt.name, i+1, st.k, st.ok, s, tt.want[i])
				break
			}
		}
	}
}
