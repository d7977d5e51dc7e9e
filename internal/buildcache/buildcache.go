// Package buildcache keeps the binaries that tests build from the Go module
// proxy (an etcd server, the stock wireguard-go) outside the repository, in
// $HOME/.cache/flanneld-test (or $FLANNELD_TEST_CACHE), each rebuilt only
// when missing or of another version.
package buildcache

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
)

// Dir is the cache: $FLANNELD_TEST_CACHE, else $HOME/.cache/flanneld-test.
func Dir() (string, error) {
	if d := os.Getenv("FLANNELD_TEST_CACHE"); d != "" {
		return d, nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("finding the test cache directory: %w; set FLANNELD_TEST_CACHE", err)
	}
	return filepath.Join(home, ".cache", "flanneld-test"), nil
}

// Binary returns the path <cache>/<name>/<file>, first calling build(dir,
// bin) when current(bin) says the file there is missing or of another
// version, and checking current again afterwards. A lock file in the
// directory makes concurrent callers (several test processes) build once.
func Binary(name, file string, current func(bin string) bool, build func(dir, bin string) error) (string, error) {
	root, err := Dir()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(root, name)
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
	bin := filepath.Join(dir, file)
	if current(bin) {
		return bin, nil
	}
	if err := build(dir, bin); err != nil {
		return "", err
	}
	if !current(bin) {
		return "", fmt.Errorf("built %s but it is not the version asked for", bin)
	}
	return bin, nil
}

// GoTool is the go command: on PATH, else the toolchain that built this
// test binary (GOROOT), else the usual install place.
func GoTool() string {
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
