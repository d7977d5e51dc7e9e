// Package etcdbin builds a real etcd server binary of a given version from
// the Go module proxy, for tests that need an etcd without the v2 API (3.6
// and later) running as its own process. The binary is cached outside the
// repository ($HOME/.cache/flanneld-test/etcd-<version>/etcd, or under
// $FLANNELD_TEST_CACHE) and rebuilt only when missing or of another version.
package etcdbin

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/flanneld-go/flanneld/internal/buildcache"
)

// Version is the etcd release the tests run: the newest 3.6 the module proxy
// serves (3.6 has no v2 API at all).
const Version = "v3.6.16"

// Path returns the etcd binary of version, building it first if it is
// missing or reports another version. Concurrent callers (several test
// processes) build it once.
func Path(version string) (string, error) {
	return buildcache.Binary("etcd-"+version, "etcd",
		func(bin string) bool { return hasVersion(bin, version) },
		func(dir, bin string) error { return build(dir, bin, version) })
}

// hasVersion reports whether bin runs and says it is etcd version.
func hasVersion(bin, version string) bool {
	out, err := exec.Command(bin, "--version").Output()
	return err == nil && bytes.Contains(out, []byte("etcd Version: "+strings.TrimPrefix(version, "v")+"\n"))
}

// build compiles etcd's server main from a scratch module requiring
// go.etcd.io/etcd/server/v3 at version.
func build(dir, bin, version string) error {
	src := filepath.Join(dir, "src")
	if err := os.RemoveAll(src); err != nil {
		return err
	}
	if err := os.MkdirAll(src, 0o755); err != nil {
		return err
	}
	files := map[string]string{
		"go.mod":  "module etcdbuild\n\ngo 1.24\n\nrequire go.etcd.io/etcd/server/v3 " + version + "\n",
		"main.go": "package main\n\nimport (\n\t\"os\"\n\n\t\"go.etcd.io/etcd/server/v3/etcdmain\"\n)\n\nfunc main() { etcdmain.Main(os.Args) }\n",
	}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(src, name), []byte(body), 0o644); err != nil {
			return err
		}
	}
	env := append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=-mod=mod", "GOWORK=off")
	goBin := buildcache.GoTool()
	for _, args := range [][]string{
		{"mod", "tidy"},
		{"build", "-trimpath", "-o", bin + ".tmp", "."},
	} {
		cmd := exec.Command(goBin, args...)
		cmd.Dir, cmd.Env = src, env
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("building etcd %s (go %s): %w\n%s", version, strings.Join(args, " "), err, out)
		}
	}
	if err := os.Rename(bin+".tmp", bin); err != nil {
		return fmt.Errorf("installing etcd %s: %w", version, err)
	}
	return os.RemoveAll(src)
}
