package buildcache

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Binary builds when the cached file is not current, not otherwise, and
// refuses a build that did not produce the version asked for.
func TestBinary(t *testing.T) {
	t.Setenv("FLANNELD_TEST_CACHE", t.TempDir())
	builds := 0
	current := func(bin string) bool {
		b, err := os.ReadFile(bin)
		return err == nil && string(b) == "v2"
	}
	build := func(version string) func(dir, bin string) error {
		return func(dir, bin string) error {
			builds++
			return os.WriteFile(bin, []byte(version), 0o755)
		}
	}
	bin, err := Binary("tool-v2", "tool", current, build("v2"))
	if err != nil || builds != 1 || filepath.Base(bin) != "tool" {
		t.Fatalf("first: %s %v, %d builds", bin, err, builds)
	}
	if again, err := Binary("tool-v2", "tool", current, build("v2")); err != nil || again != bin || builds != 1 {
		t.Errorf("cached: %s %v, %d builds; want no new build", again, err, builds)
	}
	if err := os.WriteFile(bin, []byte("v1"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := Binary("tool-v2", "tool", current, build("v2")); err != nil || builds != 2 {
		t.Errorf("another version cached: %v, %d builds; want a rebuild", err, builds)
	}
	os.Remove(bin)
	if _, err := Binary("tool-v2", "tool", current, build("v1")); err == nil || !strings.Contains(err.Error(), "not the version asked for") {
		t.Errorf("a build of the wrong version: %v", err)
	}
}
