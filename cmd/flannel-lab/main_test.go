package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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

// TestDemoWireGuard runs `make demo BACKEND=wireguard`: each host's daemon
// has its own key file and /run/wireguard, and every host reaches every
// other.
func TestDemoWireGuard(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the demo needs root (it creates network namespaces)")
	}
	bin := lab.BuildDaemon(t)
	if code := run([]string{"-flanneld", bin, "-backend", "wireguard", "-timeout", "90s"}); code != 0 {
		t.Fatalf("demo exit code %d, want 0 (see the output above)", code)
	}
}

// TestDemoWithoutIptables runs the demo on a PATH without iptables-save,
// iptables-restore and apt-get (as on a machine that is not Debian, or
// not root): it stops before creating anything, with one line naming the
// package and the command that installs it. (With apt-get as root the lab
// installs the package itself: e2e/lab's TestEnsureInstallsMissing.)
func TestDemoWithoutIptables(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the demo needs root (it creates network namespaces)")
	}
	bin := lab.BuildDaemon(t)
	dir := t.TempDir()
	for _, cmd := range []string{"ip", "ping", "ss", "bash"} {
		if p, err := exec.LookPath(cmd); err == nil {
			if err := os.Symlink(p, filepath.Join(dir, cmd)); err != nil {
				t.Fatal(err)
			}
		}
	}
	before := netns(t)
	t.Setenv("PATH", dir)
	stderr := captureStderr(t)
	code := run([]string{"-flanneld", bin, "-timeout", "10s"})
	out := stderr()
	if code != 1 {
		t.Fatalf("demo exit code %d, want 1; output:\n%s", code, out)
	}
	if !strings.Contains(out, "iptables") || !strings.Contains(out, "apt-get install") || strings.Count(strings.TrimSpace(out), "\n") != 0 {
		t.Fatalf("demo output %q, want one line naming the iptables package and apt-get install", out)
	}
	if after := netns(t); after != before {
		t.Fatalf("the demo left namespaces: before %q, after %q", before, after)
	}
}

// netns lists the network namespaces, with the PATH of the test.
func netns(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns list: %v: %s", err, out)
	}
	return string(out)
}

// captureStderr sends os.Stderr to a file until the returned function is
// called, which returns what was written.
func captureStderr(t *testing.T) func() string {
	t.Helper()
	f, err := os.CreateTemp(t.TempDir(), "stderr")
	if err != nil {
		t.Fatal(err)
	}
	orig := os.Stderr
	os.Stderr = f
	restored := false
	restore := func() {
		if !restored {
			os.Stderr = orig
			restored = true
		}
	}
	t.Cleanup(restore)
	return func() string {
		restore()
		b, err := os.ReadFile(f.Name())
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
}
