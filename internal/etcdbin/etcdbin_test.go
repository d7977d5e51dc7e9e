package etcdbin

import (
	"os/exec"
	"strings"
	"testing"
)

// TestPath builds (or finds) etcd 3.6 and checks the binary runs and has
// no v2 API flag left.
func TestPath(t *testing.T) {
	if testing.Short() {
		t.Skip("builds etcd from the module proxy; skipped with -short")
	}
	bin, err := Path(Version)
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, "--help").CombinedOutput()
	if err != nil {
		t.Fatalf("%s --help: %v", bin, err)
	}
	if strings.Contains(string(out), "--enable-v2 ") {
		t.Errorf("etcd %s still offers --enable-v2", Version)
	}
}
