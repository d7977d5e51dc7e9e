package network

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"runtime"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// childNice is how much nicer than the daemon iptables-save and
// iptables-restore run: checking and repairing the rules gives way to the
// daemon's own work (at start, writing subnet.env) and to the host's when a
// CPU is contended.
const childNice = 10

// execIPTables runs the iptables-save and iptables-restore binaries (IPv4)
// or ip6tables-save and ip6tables-restore (IPv6). They come with the
// iptables package and use the same back-end (nf_tables or legacy) as the
// iptables command of the host.
type execIPTables struct {
	save    string // path of iptables-save
	restore string // path of iptables-restore
}

// lookIPTables finds iptables-save and iptables-restore on PATH, or with
// ipv6 ip6tables-save and ip6tables-restore.
func lookIPTables(ipv6 bool) (*execIPTables, error) {
	prog := "iptables"
	if ipv6 {
		prog = "ip6tables"
	}
	save, err := exec.LookPath(prog + "-save")
	if err != nil {
		return nil, err
	}
	restore, err := exec.LookPath(prog + "-restore")
	if err != nil {
		return nil, err
	}
	return &execIPTables{save: save, restore: restore}, nil
}

// Save runs iptables-save (all tables, no counters).
func (e *execIPTables) Save(ctx context.Context) ([]byte, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, e.save)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := runNiced(cmd); err != nil {
		return nil, execError(e.save, err, stderr.String())
	}
	return stdout.Bytes(), nil
}

// Restore runs iptables-restore --noflush --wait with script on stdin. Each
// table's part (up to its COMMIT) is applied as one transaction.
func (e *execIPTables) Restore(ctx context.Context, script []byte) error {
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, e.restore, "--noflush", "--wait")
	cmd.Stdin = bytes.NewReader(script)
	cmd.Stderr = &stderr
	if err := runNiced(cmd); err != nil {
		return execError(e.restore, err, stderr.String())
	}
	return nil
}

// RandomFully reports whether this iptables has MASQUERADE --random-fully:
// version 1.6.2 or later, as `iptables-save --version` prints it
// ("iptables-save v1.8.9 (nf_tables)").
func (e *execIPTables) RandomFully(ctx context.Context) (bool, error) {
	out, err := exec.CommandContext(ctx, e.save, "--version").Output()
	if err != nil {
		return false, execError(e.save, err, "")
	}
	return versionAtLeast(string(out), 1, 6, 2)
}

// versionAtLeast finds the first "vX.Y.Z" in s and compares it with
// major.minor.patch.
func versionAtLeast(s string, major, minor, patch int) (bool, error) {
	for _, f := range strings.Fields(s) {
		v, ok := strings.CutPrefix(f, "v")
		if !ok {
			continue
		}
		var got [3]int
		parts := strings.SplitN(v, ".", 3)
		if len(parts) != 3 {
			continue
		}
		bad := false
		for i, p := range parts {
			n, err := strconv.Atoi(p)
			if err != nil {
				bad = true
				break
			}
			got[i] = n
		}
		if bad {
			continue
		}
		want := [3]int{major, minor, patch}
		for i := range got {
			if got[i] != want[i] {
				return got[i] > want[i], nil
			}
		}
		return true, nil
	}
	return false, fmt.Errorf("no version (vX.Y.Z) in %q", strings.TrimSpace(s))
}

// runNiced runs cmd childNice nicer than the daemon (at most 19). A child
// inherits the nice value of the thread that forks it, so cmd is started
// from a thread of its own whose priority is lowered first; the thread is
// not given back (raising the priority again would need CAP_SYS_NICE) and
// ends with its goroutine. If the priority cannot be lowered, cmd runs at
// the daemon's.
func runNiced(cmd *exec.Cmd) error {
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: see above
		tid := unix.Gettid()
		// The system call returns 20 - nice.
		if p, err := unix.Getpriority(unix.PRIO_PROCESS, tid); err == nil {
			unix.Setpriority(unix.PRIO_PROCESS, tid, min(20-p+childNice, 19))
		}
		started <- cmd.Start()
	}()
	if err := <-started; err != nil {
		return err
	}
	return cmd.Wait()
}

// execError names the program and adds what it printed.
func execError(prog string, err error, stderr string) error {
	var ee *exec.ExitError
	if msg := strings.TrimSpace(stderr); msg != "" && errors.As(err, &ee) {
		return fmt.Errorf("running %s: %w: %s", prog, err, msg)
	}
	return fmt.Errorf("running %s: %w", prog, err)
}
