package subnet

import (
	"testing"
	"time"
)

func TestBackoff(t *testing.T) {
	b := Backoff{Min: 100 * time.Millisecond, Max: 5 * time.Second}
	wantCaps := []time.Duration{100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000}
	for round := range 2 {
		for i, c := range wantCaps {
			c *= time.Millisecond
			if d := b.Next(); d < c/2 || d > c {
				t.Fatalf("round %d wait %d = %v, want in [%v, %v]", round, i, d, c/2, c)
			}
		}
		b.Reset()
	}
}
