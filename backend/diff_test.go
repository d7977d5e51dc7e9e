package backend

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
)

func TestDiff(t *testing.T) {
	errBoom := errors.New("boom")
	tests := []struct {
		name             string
		desired, applied map[string]string
		failSet, failDel map[string]bool
		wantCalls        []string // sets (sorted) then dels (sorted)
		want             Changes
		wantErr          bool
		wantErrText      string
	}{
		{
			name:    "empty",
			desired: map[string]string{}, applied: map[string]string{},
		},
		{
			name:      "add all",
			desired:   map[string]string{"a": "a1", "b": "b1"},
			applied:   map[string]string{},
			wantCalls: []string{"set a1", "set b1"},
			want:      Changes{Added: 2},
		},
		{
			name:    "in sync does nothing",
			desired: map[string]string{"a": "a1", "b": "b1"},
			applied: map[string]string{"a": "a1", "b": "b1"},
		},
		{
			name:      "update, add, remove; sets before deletes",
			desired:   map[string]string{"a": "a2", "b": "b1", "c": "c1"},
			applied:   map[string]string{"a": "a1", "b": "b1", "d": "d1", "e": "e1"},
			wantCalls: []string{"set a2", "set c1", "del d1", "del e1"},
			want:      Changes{Added: 1, Updated: 1, Removed: 2},
		},
		{
			name:      "remove all",
			desired:   map[string]string{},
			applied:   map[string]string{"a": "a1"},
			wantCalls: []string{"del a1"},
			want:      Changes{Removed: 1},
		},
		{
			name:      "one failure does not stop the others",
			desired:   map[string]string{"a": "a1", "b": "b1"},
			applied:   map[string]string{"c": "c1"},
			failSet:   map[string]bool{"a1": true},
			wantCalls: []string{"set a1", "set b1", "del c1"},
			want:      Changes{Added: 1, Removed: 1, Failed: 1},
			wantErr:   true, wantErrText: "boom",
		},
		{
			name:      "several failures are counted",
			desired:   map[string]string{"a": "a1"},
			applied:   map[string]string{"c": "c1", "d": "d1"},
			failSet:   map[string]bool{"a1": true},
			failDel:   map[string]bool{"c1": true, "d1": true},
			wantCalls: []string{"set a1", "del c1", "del d1"},
			want:      Changes{Failed: 3},
			wantErr:   true, wantErrText: "boom (and 2 more failed)",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var sets, dels []string
			set := func(_, v string) error {
				if len(dels) > 0 {
					t.Errorf("set %s called after a delete", v)
				}
				sets = append(sets, "set "+v)
				if tt.failSet[v] {
					return errBoom
				}
				return nil
			}
			del := func(_, v string) error {
				dels = append(dels, "del "+v)
				if tt.failDel[v] {
					return errBoom
				}
				return nil
			}
			got, err := Diff(tt.desired, tt.applied, set, del)
			slices.Sort(sets)
			slices.Sort(dels)
			if calls := append(sets, dels...); !slices.Equal(calls, tt.wantCalls) {
				t.Errorf("calls = %q, want %q", calls, tt.wantCalls)
			}
			if got != tt.want {
				t.Errorf("changes = %+v, want %+v", got, tt.want)
			}
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error %t", err, tt.wantErr)
			}
			if err != nil {
				if !errors.Is(err, errBoom) {
					t.Errorf("err = %v, does not wrap the failure", err)
				}
				if err.Error() != tt.wantErrText {
					t.Errorf("err = %q, want %q", err, tt.wantErrText)
				}
			}
		})
	}
}

// The helper is generic: a neighbour-like table keyed by IP with struct
// values works the same way.
func TestDiffStructValues(t *testing.T) {
	type neigh struct {
		IP  string
		MAC string
	}
	desired := map[string]neigh{"10.5.2.0": {"10.5.2.0", "aa"}, "10.5.3.0": {"10.5.3.0", "bb"}}
	applied := map[string]neigh{"10.5.2.0": {"10.5.2.0", "aa"}, "10.5.3.0": {"10.5.3.0", "cc"}, "10.5.4.0": {"10.5.4.0", "dd"}}
	var log []string
	c, err := Diff(desired, applied,
		func(_ string, n neigh) error { log = append(log, fmt.Sprint("set ", n)); return nil },
		func(_ string, n neigh) error { log = append(log, fmt.Sprint("del ", n)); return nil })
	if err != nil {
		t.Fatal(err)
	}
	if want := (Changes{Updated: 1, Removed: 1}); c != want {
		t.Errorf("changes = %+v, want %+v", c, want)
	}
	if got, want := strings.Join(log, "; "), "set {10.5.3.0 bb}; del {10.5.4.0 dd}"; got != want {
		t.Errorf("calls = %q, want %q", got, want)
	}
	if !c.Any() || (Changes{}).Any() {
		t.Error("Changes.Any is wrong")
	}
}
