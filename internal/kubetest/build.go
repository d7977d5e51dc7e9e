package kubetest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
)

// Version is the kube-apiserver the tests run: k8s.io/kubernetes at this
// tag, built from the Go module proxy.
const Version = "v1.33.13"

// stagingVersion is the version of the k8s.io/X modules that Version's
// staging directories are published as.
const stagingVersion = "v0.33.13"

// CacheDir is where built test binaries are kept across runs:
// $FLANNELD_TEST_CACHE, else $HOME/.cache/flanneld-test (without a home,
// flanneld-test-cache in the temporary directory).
func CacheDir() (string, error) {
	if d := os.Getenv("FLANNELD_TEST_CACHE"); d != "" {
		return d, nil
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".cache", "flanneld-test"), nil
	}
	return filepath.Join(os.TempDir(), "flanneld-test-cache"), nil
}

// Binary returns the path of kube-apiserver Version, building it first when
// the cache does not hold it (about 3 minutes on 2 cores with a cold Go
// build cache, seconds with a warm one). Concurrent callers, in this
// process or in other test binaries, wait for one build.
func Binary() (string, error) {
	dir, err := CacheDir()
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "kube-apiserver-"+Version)
	if fi, err := os.Stat(bin); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
		return bin, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("creating the test binary cache: %w", err)
	}
	unlock, err := lockFile(filepath.Join(dir, "kube-apiserver.lock"))
	if err != nil {
		return "", err
	}
	defer unlock()
	if _, err := os.Stat(bin); err == nil { // built while we waited
		return bin, nil
	}
	// What a build killed half-way left behind (we hold the lock).
	if stale, _ := filepath.Glob(filepath.Join(dir, "build-*")); len(stale) > 0 {
		for _, d := range stale {
			os.RemoveAll(d)
		}
	}
	if err := build(bin); err != nil {
		return "", fmt.Errorf("building kube-apiserver %s from the Go module proxy: %w", Version, err)
	}
	return bin, nil
}

// lockFile takes an exclusive flock on path; the returned func releases it.
func lockFile(path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("opening build lock: %w", err)
	}
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX)
		if !errors.Is(err, syscall.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("locking %s: %w", path, err)
	}
	return func() { f.Close() }, nil
}

// build fetches k8s.io/kubernetes Version, points its staging modules at
// their published versions and builds cmd/kube-apiserver into bin.
func build(bin string) error {
	goCmd, err := exec.LookPath("go")
	if err != nil {
		goCmd = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	// A fixed directory, not a random one: the Go build cache keys the
	// main module's packages by their directory, so a rebuild (a deleted
	// binary, another cache directory on the same machine) reuses them.
	tmp := filepath.Join(filepath.Dir(bin), "build-"+Version)
	if err := os.RemoveAll(tmp); err != nil {
		return err
	}
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(tmp)

	out, err := goRun(goCmd, tmp, nil, "mod", "download", "-json", "k8s.io/kubernetes@"+Version)
	if err != nil {
		return err
	}
	var mod struct{ Dir, Error string }
	if err := json.Unmarshal(out, &mod); err != nil {
		return fmt.Errorf("reading go mod download output: %w", err)
	}
	if mod.Error != "" || mod.Dir == "" {
		return fmt.Errorf("downloading k8s.io/kubernetes@%s: %s", Version, mod.Error)
	}

	src := filepath.Join(tmp, "src")
	if err := os.CopyFS(src, os.DirFS(mod.Dir)); err != nil {
		return fmt.Errorf("copying the module source: %w", err)
	}
	for _, f := range []string{"go.work", "go.work.sum"} {
		if err := os.Remove(filepath.Join(src, f)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	out, err = goRun(goCmd, src, nil, "mod", "edit", "-json")
	if err != nil {
		return err
	}
	var gomod struct {
		Replace []struct {
			Old struct{ Path string }
			New struct{ Path string }
		}
	}
	if err := json.Unmarshal(out, &gomod); err != nil {
		return fmt.Errorf("reading go.mod: %w", err)
	}
	args := []string{"mod", "edit"}
	for _, r := range gomod.Replace {
		if strings.HasPrefix(r.New.Path, "./staging/") {
			args = append(args, "-dropreplace="+r.Old.Path, "-require="+r.Old.Path+"@"+stagingVersion)
		}
	}
	if len(args) == 2 {
		return errors.New("go.mod of k8s.io/kubernetes has no staging replaces; the recipe no longer fits this version")
	}
	if _, err := goRun(goCmd, src, nil, args...); err != nil {
		return err
	}
	part := bin + ".part"
	env := []string{"GOWORK=off", "GOFLAGS=-mod=mod -buildvcs=false", "CGO_ENABLED=0"}
	if _, err := goRun(goCmd, src, env, "build", "-o", part,
		"-ldflags=-s -w -X k8s.io/component-base/version.gitVersion="+Version,
		"./cmd/kube-apiserver"); err != nil {
		os.Remove(part)
		return err
	}
	return os.Rename(part, bin)
}

// goRun runs the go command in dir with extra environment and returns its
// standard output; an error carries its standard error.
func goRun(goCmd, dir string, env []string, args ...string) ([]byte, error) {
	cmd := exec.Command(goCmd, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("go %s: %w: %s", strings.Join(args, " "), err, lastLines(stderr.String(), 20))
	}
	return out, nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
