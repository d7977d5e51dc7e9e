package lab

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
)

// The daemon is built once per test binary.
var build struct {
	sync.Mutex
	dir, path string
	err       error
}

// BuildDaemon builds flanneld from the repository root (CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o
// <tmp>/flanneld .) the first time it is called in a test binary and
// returns the binary's path; later calls return the same path. The test
// fails if the build fails. Call Main from TestMain to remove the binary
// when the tests end.
func BuildDaemon(t TB) string {
	t.Helper()
	build.Lock()
	defer build.Unlock()
	if build.path == "" && build.err == nil {
		build.path, build.err = buildDaemon()
	}
	if build.err != nil {
		t.Fatalf("building flanneld: %v", build.err)
	}
	return build.path
}

// Main runs the tests, then removes the binary BuildDaemon made, and exits.
// Use it as: func TestMain(m *testing.M) { lab.Main(m) }.
func Main(m interface{ Run() int }) {
	code := m.Run()
	build.Lock()
	if build.dir != "" {
		os.RemoveAll(build.dir)
	}
	build.Unlock()
	os.Exit(code)
}

func buildDaemon() (string, error) {
	root, err := repoRoot()
	if err != nil {
		return "", err
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		// The toolchain that built this test binary.
		goBin = filepath.Join(os.Getenv("GOROOT"), "bin", "go")
		if _, serr := os.Stat(goBin); serr != nil {
			goBin = "/usr/local/go/bin/go"
		}
	}
	dir, err := os.MkdirTemp("", "flanneld-e2e-")
	if err != nil {
		return "", fmt.Errorf("creating build directory: %w", err)
	}
	build.dir = dir
	path := filepath.Join(dir, "flanneld")
	// The binary make build ships: static, stripped.
	cmd := exec.Command(goBin, "build", "-trimpath", "-ldflags", "-s -w", "-o", path, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o %s . in %s: %w\n%s", path, root, err, tail(string(out), 30))
	}
	return path, nil
}

// repoRoot walks up from the working directory to the go.mod of the
// flanneld module.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("finding repository root: %w", err)
	}
	for {
		data, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && strings.Contains(string(data), "module github.com/flanneld-go/flanneld\n") {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("finding repository root: no go.mod of github.com/flanneld-go/flanneld above the working directory")
		}
		dir = parent
	}
}
