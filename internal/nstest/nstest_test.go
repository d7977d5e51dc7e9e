package nstest

import (
	"context"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/vishvananda/netns"
)

// TestNewLeavesCallerAndCleansUp creates namespaces from many goroutines,
// checks that no thread of the test is left in one, that a veth pair joins
// two of them, and that Cleanup removes them.
func TestNewLeavesCallerAndCleansUp(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root to create network namespaces")
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	runtime.UnlockOSThread()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()

	var paths []string
	t.Run("make", func(t *testing.T) {
		a, b := New(t, "flnst"), New(t, "flnst")
		if a.Name == b.Name || !strings.HasPrefix(a.Name, "flnst-") || a.Path != "/run/netns/"+a.Name {
			t.Fatalf("names %q, %q, path %q", a.Name, b.Name, a.Path)
		}
		paths = append(paths, a.Path, b.Path)
		var wg sync.WaitGroup
		for i := 0; i < 8; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				runtime.LockOSThread()
				defer runtime.UnlockOSThread()
				cur, err := netns.Get()
				if err != nil {
					t.Error(err)
					return
				}
				defer cur.Close()
				if !cur.Equal(orig) {
					t.Error("a thread of the test is in another network namespace")
				}
			}()
		}
		wg.Wait()

		l := a.Veth(t, "x0", 1400, b, "y0", "10.250.77.1/24")
		if l.Attrs().MTU != 1400 || l.Attrs().Flags&net.FlagUp == 0 {
			t.Fatalf("x0 = %+v, want up with MTU 1400", l.Attrs())
		}
		b.Up(t, "y0", "10.250.77.2/24")
		b.Up(t, "lo")
		out, err := b.Command(context.Background(), "ip", "-4", "-o", "addr", "show").CombinedOutput()
		if err != nil || !strings.Contains(string(out), "y0    inet 10.250.77.2/24") || !strings.Contains(string(out), "lo    inet 127.0.0.1/8") {
			t.Fatalf("addresses in %s: %v\n%s", b.Name, err, out)
		}
		if _, err := a.NL.LinkByName("y0"); err == nil {
			t.Fatal("the peer end is in the first namespace")
		}
	})
	for _, p := range paths {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s left behind after the test: %v", p, err)
		}
	}
}
