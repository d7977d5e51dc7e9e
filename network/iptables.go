package network

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"runtime"
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
