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
	"syscall"
)

// Module is wireguard-go's module path; its root package is the daemon.
const Module = "golang.zx2c4.com/wireguard"

// Version is the wireguard-go the tests run: the one go.mod requires for
// the in-process data path, so that a comparison is engine against engine.
const Version = "v0.0.0-20260522210424-ecfc5a8d5446"

// cacheDir is where built binaries are kept.
func cacheDir() (string, error) {
	if d := os.Getenv("FLANNELD_TEST_CACHE"); d != "" {
		return d, nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("finding the test cache directory: %w; set FLANNELD_TEST_CACHE", err)
	}
	return filepath.Join(home, ".cache", "flanneld-test"), nil
}

// Path returns the wireguard-go binary of version, building it first if it
// is missing or was built from another version. Concurrent callers (several
// test processes) build it once.
func Path(version string) (string, error) {
	root, err := cacheDir()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(root, "wireguard-go-"+version)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("creating %s: %w", dir, err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", fmt.Errorf("locking %s: %w", dir, err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", fmt.Errorf("locking %s: %w", dir, err)
	}
	bin := filepath.Join(dir, "wireguard-go")
	if BuiltFrom(bin) == version {
		return bin, nil
	}
	if err := build(dir, bin, version); err != nil {
		return "", err
	}
	if got := BuiltFrom(bin); got != version {
		return "", fmt.Errorf("built %s but it was built from %s %q, not %s", bin, Module, got, version)
	}
	return bin, nil
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
	cmd := exec.Command(goTool(), "install", "-trimpath", Module+"@"+version)
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

// goTool is the go command: on PATH, else the toolchain that built this
// test binary (GOROOT), else the usual install place.
func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	if p := filepath.Join(os.Getenv("GOROOT"), "bin", "go"); fileExists(p) {
		return p
	}
	return "/usr/local/go/bin/go"
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
