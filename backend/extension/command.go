package extension

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// DefaultTimeout bounds one run of a command; a command still running then
// is killed with its process group.
const DefaultTimeout = 30 * time.Second

// maxOutput is how much of a command's combined stdout and stderr is kept;
// the rest is read and dropped, so a chatty command never blocks on a full
// pipe and never grows the daemon.
const maxOutput = 64 << 10

// logOutput is how much of a failed command's output its log line shows.
const logOutput = 200

// waitDelay is how long a killed command's pipes may stay open (held by a
// child that escaped its process group) before Wait gives up on them.
const waitDelay = time.Second

// command is one of the four configured commands.
type command struct {
	key    string   // config key, e.g. "SubnetAddCommand", for messages
	fields []string // the command split on white space, not yet expanded
}

func parseCommand(key, s string) command {
	return command{key: key, fields: strings.Fields(s)}
}

// set reports whether the command is configured.
func (c command) set() bool { return len(c.fields) > 0 }

// argv expands $VAR and ${VAR} in each field: vars first, then the daemon's
// environment; an unknown variable expands to "".
func (c command) argv(vars map[string]string) []string {
	lookup := func(k string) string {
		if v, ok := vars[k]; ok {
			return v
		}
		return os.Getenv(k)
	}
	out := make([]string, len(c.fields))
	for i, f := range c.fields {
		out[i] = os.Expand(f, lookup)
	}
	return out
}

// runError is a command that failed: did not start, exited non-zero, or
// was killed at the timeout.
type runError struct {
	key    string
	argv   []string
	err    error         // exec's error (e.g. "exit status 3", "signal: killed")
	output string        // the start of the captured output
	killed time.Duration // the timeout it was killed at; 0 if not
}

func (e *runError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %q ", e.key, strings.Join(e.argv, " "))
	if e.killed > 0 {
		fmt.Fprintf(&b, "timed out after %v and was killed (%v)", e.killed, e.err)
	} else {
		fmt.Fprintf(&b, "failed: %v", e.err)
	}
	if e.output != "" {
		fmt.Fprintf(&b, "; output: %q", e.output)
	}
	return b.String()
}

func (e *runError) Unwrap() error { return e.err }

// run runs c directly (no shell) with vars expanded into its fields and
// added to the daemon's environment, stdin on its standard input, and
// returns its trimmed combined output (at most maxOutput bytes of it) and
// how many bytes past that were dropped. The command is killed, with every
// process of its group, when timeout passes or ctx ends.
func (c command) run(ctx context.Context, timeout time.Duration, vars map[string]string, stdin string) (string, int, error) {
	argv := c.argv(vars)
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = os.Environ()
	for k, v := range vars {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	cmd.Stdin = strings.NewReader(stdin)
	out := &boundedBuffer{max: maxOutput}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error {
		// The whole group: a script's children die with it.
		return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	cmd.WaitDelay = waitDelay
	err := cmd.Run()
	text := strings.TrimSpace(out.String())
	if err != nil {
		e := &runError{key: c.key, argv: argv, err: err, output: head(text, logOutput)}
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			e.killed = timeout
		}
		return text, out.dropped, e
	}
	return text, out.dropped, nil
}

// head is the first n bytes of s, with "..." when cut.
func head(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// boundedBuffer keeps the first max bytes written to it and counts the rest.
type boundedBuffer struct {
	mu      sync.Mutex
	max     int
	buf     []byte
	dropped int
}

func (b *boundedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := min(len(p), b.max-len(b.buf))
	b.buf = append(b.buf, p[:n]...)
	b.dropped += len(p) - n
	return len(p), nil
}

func (b *boundedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return string(b.buf)
}
