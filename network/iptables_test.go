package network

import (
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestRunNiced: the child runs childNice nicer than the caller, whose own
// priority is unchanged.
func TestRunNiced(t *testing.T) {
	before, err := unix.Getpriority(unix.PRIO_PROCESS, 0)
	if err != nil {
		t.Fatal(err)
	}
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skip("no sh to report its niceness")
	}
	for range 3 {
		var out strings.Builder
		cmd := exec.Command(sh, "-c", "cat /proc/$$/stat")
		cmd.Stdout = &out
		if err := runNiced(cmd); err != nil {
			t.Fatalf("runNiced: %v", err)
		}
		// Field 19 of /proc/<pid>/stat is the nice value; the name in field
		// 2 has no spaces here.
		f := strings.Fields(out.String())
		if len(f) < 19 {
			t.Fatalf("unexpected /proc stat line %q", out.String())
		}
		nice, err := strconv.Atoi(f[18])
		if err != nil {
			t.Fatal(err)
		}
		// Getpriority returns 20 - nice.
		if want := min(20-before+childNice, 19); nice != want {
			t.Errorf("child niceness = %d, want %d (the test's %d + %d)", nice, want, 20-before, childNice)
		}
	}
	after, err := unix.Getpriority(unix.PRIO_PROCESS, 0)
	if err != nil {
		t.Fatal(err)
	}
	if after != before {
		t.Errorf("the process's priority changed from %d to %d", before, after)
	}
}
