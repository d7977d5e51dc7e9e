// Package wgtest gives tests a WireGuard we did not write: the stock
// wireguard-go binary, built from the Go module proxy (go install
// golang.zx2c4.com/wireguard@Version), to be configured with wg(8) from
// Debian's wireguard-tools. The binary is cached outside the repository
// ($HOME/.cache/flanneld-test/wireguard-go-<version>/wireguard-go, or under
// $FLANNELD_TEST_CACHE) and rebuilt only when missing or of another
// version.
package wgtest

import (
	"debug/buildinfo"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/flanneld-go/flanneld/internal/buildcache"
)

// Module is wireguard-go's module path; its root package is the daemon.
const Module = "golang.zx2c4.com/wireguard"

// Version is the wireguard-go the tests run: the one go.mod requires for
// the in-process data path, so that a comparison is engine against engine.
const Version = "v0.0.0-20260522210424-ecfc5a8d5446"

// Path returns the wireguard-go binary of version, building it first if it
// is missing or was built from another version. Concurrent callers (several
// test processes) build it once.
func Path(version string) (string, error) {
	return buildcache.Binary("wireguard-go-"+version, "wireguard-go",
		func(bin string) bool { return BuiltFrom(bin) == version },
		func(dir, bin string) error { return build(dir, bin, version) })
}

// BuiltFrom returns the version of Module the binary at bin was built from
// (its main module), or "" if it is missing or not such a binary.
func BuiltFrom(bin string) string {
	info, err := buildinfo.ReadFile(bin)
	if err != nil || info.Main.Path != Module {
		return ""
	}
	return info.Main.Version
}

// build runs go install Module@version into a scratch GOBIN and moves the
// binary into place.
func build(dir, bin, version string) error {
	gobin := filepath.Join(dir, "gobin")
	if err := os.RemoveAll(gobin); err != nil {
		return err
	}
	cmd := exec.Command(buildcache.GoTool(), "install", "-trimpath", Module+"@"+version)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOBIN="+gobin, "GOWORK=off", "GOFLAGS=")
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("building wireguard-go (go install %s@%s): %w\n%s", Module, version, err, strings.TrimSpace(string(out)))
	}
	if err := os.Rename(filepath.Join(gobin, "wireguard"), bin); err != nil {
		return fmt.Errorf("installing wireguard-go %s: %w", version, err)
	}
	return os.RemoveAll(gobin)
}
