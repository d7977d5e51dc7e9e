package network

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strings"
)

// execIPTables runs the IPv4 iptables-save and iptables-restore binaries.
// They come with the iptables package and use the same back-end (nf_tables
// or legacy) as the iptables command of the host.
type execIPTables struct {
	save    string // path of iptables-save
	restore string // path of iptables-restore
}

// lookIPTables finds iptables-save and iptables-restore on PATH.
func lookIPTables() (*execIPTables, error) {
	save, err := exec.LookPath("iptables-save")
	if err != nil {
		return nil, err
	}
	restore, err := exec.LookPath("iptables-restore")
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
	if err := cmd.Run(); err != nil {
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
	if err := cmd.Run(); err != nil {
		return execError(e.restore, err, stderr.String())
	}
	return nil
}

// execError names the program and adds what it printed.
func execError(prog string, err error, stderr string) error {
	var ee *exec.ExitError
	if msg := strings.TrimSpace(stderr); msg != "" && errors.As(err, &ee) {
		return fmt.Errorf("running %s: %w: %s", prog, err, msg)
	}
	return fmt.Errorf("running %s: %w", prog, err)
}
