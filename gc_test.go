package main

import (
	"runtime/debug"
	"testing"
)

func TestSetGCPercent(t *testing.T) {
	was := debug.SetGCPercent(100)
	defer debug.SetGCPercent(was)

	unset := func(string) (string, bool) { return "", false }
	if got := setGCPercent(unset); got != defaultGCPercent {
		t.Errorf("GOGC unset: in force %d, want %d", got, defaultGCPercent)
	}
	if got := debug.SetGCPercent(80); got != defaultGCPercent {
		t.Errorf("GOGC unset: the runtime has %d, want %d", got, defaultGCPercent)
	}
	// GOGC=80 in the environment: the runtime applied it; it stays.
	set := func(k string) (string, bool) { return "80", k == "GOGC" }
	if got := setGCPercent(set); got != 80 {
		t.Errorf("GOGC set: in force %d, want 80", got)
	}
	if got := debug.SetGCPercent(100); got != 80 {
		t.Errorf("GOGC set: the runtime has %d, want 80", got)
	}
}
