package main

import (
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// TestShippedBinariesDoNotLinkTesting checks that no package linked into
// flanneld or a program under cmd/ imports the testing package: test
// helpers (e2e/lab, internal/etcdtest) take a small interface that
// *testing.T satisfies instead of testing.TB.
func TestShippedBinariesDoNotLinkTesting(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("the go command is not on PATH")
	}
	// Every package the binaries link, each with what it imports.
	out, err := exec.Command(goBin, "list", "-deps", "-f", "{{.ImportPath}}{{range .Imports}} {{.}}{{end}}", ".", "./cmd/...").Output()
	if err != nil {
		t.Fatalf("go list -deps . ./cmd/...: %v", err)
	}
	var linked, importers []string
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		fields := strings.Fields(line)
		linked = append(linked, fields[0])
		if slices.Contains(fields[1:], "testing") {
			importers = append(importers, fields[0])
		}
	}
	if len(linked) < 50 || !slices.Contains(linked, "github.com/flanneld-go/flanneld/agent") || !slices.Contains(linked, "github.com/flanneld-go/flanneld/e2e/lab") {
		t.Fatalf("go list -deps listed %d packages without agent or e2e/lab; the check would prove nothing:\n%s", len(linked), out)
	}
	if slices.Contains(linked, "testing") || len(importers) > 0 {
		t.Errorf("shipped binaries link the testing package, imported by %v; give those helpers an interface that *testing.T satisfies", importers)
	}
}
