package wgtest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Version is the wireguard-go go.mod requires, so that the stock binary
// and the in-process data path are the same engine.
func TestVersionIsGoMods(t *testing.T) {
	data, err := os.ReadFile("../../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	want := "\t" + Module + " " + Version + "\n"
	if !strings.Contains(string(data), want) {
		t.Errorf("go.mod does not require %s %s; set wgtest.Version to the version it requires", Module, Version)
	}
}

// Path builds the binary once, then finds it in the cache; a binary of
// another version is rebuilt.
func TestPath(t *testing.T) {
	if testing.Short() {
		t.Skip("builds wireguard-go")
	}
	bin, err := Path(Version)
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, "--version").Output()
	if err != nil || !strings.HasPrefix(string(out), "wireguard-go v") {
		t.Fatalf("%s --version: %q %v", bin, out, err)
	}
	fi, _ := os.Stat(bin)
	again, err := Path(Version)
	if err != nil || again != bin {
		t.Fatalf("second Path: %s %v", again, err)
	}
	if fi2, _ := os.Stat(bin); !fi2.ModTime().Equal(fi.ModTime()) {
		t.Error("the cached binary was rebuilt")
	}

	// A binary of another version (here: not wireguard-go at all) is
	// replaced.
	cache := t.TempDir()
	t.Setenv("FLANNELD_TEST_CACHE", cache)
	dir := filepath.Join(cache, "wireguard-go-"+Version)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "wireguard-go"), []byte("#!/bin/sh\necho wireguard-go v0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	got, err := Path(Version)
	if err != nil || BuiltFrom(got) != Version {
		t.Fatalf("rebuild: %s %v (built from %q)", got, err, BuiltFrom(got))
	}
	t.Logf("rebuilt in %v", time.Since(start).Round(time.Millisecond))
}
