package main

import (
	"os"
	"testing"

	"github.com/flanneld-go/flanneld/e2e/lab"
)

func TestMain(m *testing.M) { lab.Main(m) }

func TestUsageErrors(t *testing.T) {
	for name, args := range map[string][]string{
		"positional":     {"extra"},
		"unknown flag":   {"-nope"},
		"bad backend":    {"-backend", "bogus", "-flanneld", os.Args[0]},
		"bad network":    {"-network", "10.5.0.0", "-flanneld", os.Args[0]},
		"missing binary": {"-flanneld", "/nonexistent/flanneld"},
	} {
		if code := run(args); code != 2 {
			t.Errorf("%s: exit code %d, want 2", name, code)
		}
	}
}

// TestDemoHostGW runs what `make demo` runs, with the daemon built from this
// repository: every host must reach every other host's overlay address.
func TestDemoHostGW(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the demo needs root (it creates network namespaces)")
	}
	bin := lab.BuildDaemon(t)
	if code := run([]string{"-flanneld", bin, "-backend", "host-gw", "-timeout", "90s"}); code != 0 {
		t.Fatalf("demo exit code %d, want 0 (see the output above)", code)
	}
}
