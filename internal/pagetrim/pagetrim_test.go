package pagetrim

import (
	"bufio"
	"os"
	"strconv"
	"strings"
	"testing"
)

// rssFile is the process's file-backed resident memory, in KiB.
func rssFile(t *testing.T) int {
	t.Helper()
	f, err := os.Open("/proc/self/status")
	if err != nil {
		t.Skipf("no /proc/self/status: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "RssFile:"); ok {
			n, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatal("no RssFile in /proc/self/status")
	return 0
}

// TestTrim: the test binary's read-only pages are dropped (file-backed RSS
// falls), the process goes on running the code whose pages were dropped,
// and a second Trim works as well.
func TestTrim(t *testing.T) {
	before := rssFile(t)
	n, err := Trim()
	if err != nil {
		t.Fatal(err)
	}
	after := rssFile(t)
	if n == 0 || after >= before {
		t.Fatalf("Trim covered %d bytes; file-backed RSS %d → %d KiB, want it lower", n, before, after)
	}
	t.Logf("trimmed %d bytes of mappings: file-backed RSS %d → %d KiB", n, before, after)
	// Code and read-only data fault back in on use.
	if s := strconv.Itoa(12345) + strings.Repeat("x", 3); s != "12345xxx" {
		t.Fatalf("got %q", s)
	}
	if _, err := Trim(); err != nil {
		t.Fatal(err)
	}
}
