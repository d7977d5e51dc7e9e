package lab

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Teardown removes leftovers of labs whose namespace names start with
// namePrefix + "-" (e.g. after the lab's process was killed): it kills every
// process inside those namespaces, then deletes the namespaces. It returns
// the namespaces it deleted. The embedded etcd lives in the lab's own
// process; Teardown does not touch that process. It also removes the
// default directories (<tmp>/<lab name>-<random>) of the labs it tore down.
func Teardown(namePrefix string) ([]string, error) {
	if namePrefix == "" || strings.ContainsAny(namePrefix, "/ ") {
		return nil, fmt.Errorf("lab: teardown needs a name prefix without '/' or spaces, got %q", namePrefix)
	}
	entries, err := os.ReadDir("/run/netns")
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("listing network namespaces: %w", err)
	}
	var names []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), namePrefix+"-") {
			names = append(names, e.Name())
		}
	}
	sort.Strings(names)

	var errs []error
	for _, ns := range names {
		if err := killNSProcesses(ns); err != nil {
			errs = append(errs, err)
		}
	}
	var deleted []string
	labs := map[string]bool{}
	for _, ns := range names {
		if err := deleteNS(ns); err != nil {
			errs = append(errs, err)
			continue
		}
		deleted = append(deleted, ns)
		labs[labName(ns)] = true
	}
	for name := range labs {
		if err := removeLabDirs(name); err != nil {
			errs = append(errs, err)
		}
	}
	return deleted, errors.Join(errs...)
}

// labName strips the role (-lan, -host<i>) from a namespace name.
func labName(ns string) string {
	if i := strings.LastIndex(ns, "-"); i > 0 {
		return ns[:i]
	}
	return ns
}

// removeLabDirs removes <tmp>/<lab name>-<digits>, the default lab
// directories New makes.
func removeLabDirs(name string) error {
	entries, err := os.ReadDir(os.TempDir())
	if err != nil {
		return fmt.Errorf("listing %s: %w", os.TempDir(), err)
	}
	var errs []error
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), name+"-")
		if !ok || !e.IsDir() || rest == "" || strings.Trim(rest, "0123456789") != "" {
			continue
		}
		if err := os.RemoveAll(filepath.Join(os.TempDir(), e.Name())); err != nil {
			errs = append(errs, fmt.Errorf("removing lab directory: %w", err))
		}
	}
	return errors.Join(errs...)
}

// killNSProcesses sends SIGTERM to the processes in ns, then SIGKILL to
// those still there after a few seconds.
func killNSProcesses(ns string) error {
	pids, err := nsPids(ns)
	if err != nil || len(pids) == 0 {
		return err
	}
	self := os.Getpid()
	for _, pid := range pids {
		if pid != self {
			syscall.Kill(pid, syscall.SIGTERM)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if pids, err = nsPids(ns); err != nil || len(pids) == 0 {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, pid := range pids {
		if pid != self {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	return nil
}

// nsPids lists the processes whose network namespace is ns.
func nsPids(ns string) ([]int, error) {
	out, err := exec.Command("ip", "netns", "pids", ns).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("listing processes in %s: %w: %s", ns, err, strings.TrimSpace(string(out)))
	}
	var pids []int
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}
