package lab

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Host is one host namespace of a lab.
type Host struct {
	Name       string     // "host1", "host2", ...
	NS         string     // namespace name, for ip netns exec
	Addr       netip.Addr // eth0 address on the LAN (the daemon's public IP)
	Addr6      netip.Addr // eth0 IPv6 address on the LAN (Options.LAN6); invalid without
	SubnetFile string     // the daemon's --subnet-file
	KeyFile    string     // the daemon's $WIREGUARD_KEY_FILE
	// DaemonEnv is added to the environment of the daemons StartDaemon
	// runs from then on, e.g. NODE_NAME=host1 for --kube-subnet-mgr.
	DaemonEnv []string

	lab *Lab
	dir string

	mu      sync.Mutex
	daemons []*Daemon // every daemon started here; the last is current
}

// Exec runs argv inside the host namespace (ip netns exec) and returns its
// combined output. A non-zero exit is an error that includes the output.
func (h *Host) Exec(ctx context.Context, argv ...string) (string, error) {
	if len(argv) == 0 {
		return "", errors.New("lab: Exec needs a command")
	}
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", h.NS}, argv...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("running %q on %s: %w: %s", strings.Join(argv, " "), h.Name, err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// ExecPrivate runs argv inside the host namespace in a mount namespace of
// its own with an empty WireGuardRunDir, as StartDaemon runs the daemon
// (e.g. a stock wireguard-go), and returns the started command; its
// stdout and stderr go to out. The process dies with the lab's.
func (h *Host) ExecPrivate(out *os.File, argv ...string) (*exec.Cmd, error) {
	if len(argv) == 0 {
		return nil, errors.New("lab: ExecPrivate needs a command")
	}
	if err := os.MkdirAll(WireGuardRunDir, 0o755); err != nil {
		return nil, fmt.Errorf("creating %s: %w", WireGuardRunDir, err)
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", h.NS, "sh", "-c", privateRunDir}, argv...)...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s on %s: %w", argv[0], h.Name, err)
	}
	return cmd, nil
}

// WG runs wg(8) (wireguard-tools) with args in the host namespace and the
// mount namespace of process pid (a daemon's, or one ExecPrivate started),
// where its WireGuard sockets are, and returns the combined output.
func (h *Host) WG(ctx context.Context, pid int, args ...string) (string, error) {
	argv := append([]string{"-t", strconv.Itoa(pid), "-m", "-n", "wg"}, args...)
	out, err := exec.CommandContext(ctx, "nsenter", argv...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("running wg %s on %s: %w: %s", strings.Join(args, " "), h.Name, err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// Ping sends one ICMP (ICMPv6 for an IPv6 dst) echo from the host to dst,
// from source address src (an invalid src lets the kernel choose), and
// reports whether a reply came back within two seconds.
func (h *Host) Ping(ctx context.Context, src, dst netip.Addr) error {
	args := []string{"ping", "-n", "-c", "1", "-W", "2"}
	if dst.Is6() && !dst.Is4In6() {
		args = append(args, "-6")
	}
	if src.IsValid() {
		args = append(args, "-I", src.String())
	}
	_, err := h.Exec(ctx, append(args, dst.String())...)
	return err
}

// WaitPing pings dst from src until a reply comes back or ctx ends (use a
// generous deadline: routes converge asynchronously).
func (h *Host) WaitPing(ctx context.Context, src, dst netip.Addr) error {
	for {
		err := h.Ping(ctx, src, dst)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s to reach %s from %s: %w (last: %v)", h.Name, dst, src, ctx.Err(), err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// SetBridgeAddr gives the host's docker0 bridge the address p (e.g.
// FLANNEL_SUBNET, 10.5.34.1/24, or FLANNEL_IPV6_SUBNET), replacing any
// address of p's family it had (IPv6: any global one); the other family's
// stay, so a dual-stack host calls it once per family.
func (h *Host) SetBridgeAddr(p netip.Prefix) error {
	if p.Addr().Is4() {
		if err := ipCmd("-n", h.NS, "-4", "addr", "flush", "dev", BridgeName); err != nil {
			return err
		}
		return ipCmd("-n", h.NS, "addr", "add", p.String(), "dev", BridgeName)
	}
	if err := ipCmd("-n", h.NS, "-6", "addr", "flush", "dev", BridgeName, "scope", "global"); err != nil {
		return err
	}
	return ipCmd("-n", h.NS, "addr", "add", p.String(), "dev", BridgeName, "nodad")
}

// ReadSubnetEnv reads and parses the host's subnet file.
func (h *Host) ReadSubnetEnv() (SubnetEnv, error) {
	data, err := os.ReadFile(h.SubnetFile)
	if err != nil {
		return SubnetEnv{}, fmt.Errorf("reading %s subnet file: %w", h.Name, err)
	}
	return ParseSubnetEnv(data)
}

// WaitSubnetEnv waits until the host's subnet file holds a complete
// subnet.env and returns it. If a daemon was started on the host, the file
// must have been written after that daemon started, and the wait fails as
// soon as the daemon exits (the error carries the end of its log).
func (h *Host) WaitSubnetEnv(ctx context.Context) (SubnetEnv, error) {
	d := h.Daemon()
	var since time.Time
	if d != nil {
		// mtime comes from a coarse clock; allow it to lag a little.
		since = d.started.Add(-20 * time.Millisecond)
	}
	var last error
	for {
		if fi, err := os.Stat(h.SubnetFile); err != nil {
			last = err
		} else if fi.ModTime().Before(since) {
			last = fmt.Errorf("%s was written before the current daemon started", h.SubnetFile)
		} else if env, err := h.ReadSubnetEnv(); err != nil {
			last = err
		} else {
			return env, nil
		}
		var done <-chan struct{}
		if d != nil {
			done = d.Done()
		}
		select {
		case <-done:
			code, _ := d.Wait()
			return SubnetEnv{}, fmt.Errorf("flanneld on %s exited with code %d before writing %s; log:\n%s",
				h.Name, code, h.SubnetFile, tail(d.Log(), 30))
		case <-ctx.Done():
			return SubnetEnv{}, fmt.Errorf("waiting for subnet.env on %s: %w (last: %v)", h.Name, ctx.Err(), last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Daemon returns the most recently started daemon, or nil.
func (h *Host) Daemon() *Daemon {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.daemons) == 0 {
		return nil
	}
	return h.daemons[len(h.daemons)-1]
}

func (h *Host) allDaemons() []*Daemon {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]*Daemon(nil), h.daemons...)
}
