package lab

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// WireGuardRunDir is where wireguard-go and wg(8) keep the UAPI sockets
// (/var/run/wireguard). Every process the lab starts in a host gets an
// empty one of its own (a tmpfs in its own mount namespace), so that the
// hosts' devices, all named flannel-wg, do not share one socket.
const WireGuardRunDir = "/run/wireguard"

// privateRunDir is the sh script that mounts the private WireGuardRunDir and
// execs its arguments.
const privateRunDir = `mount -t tmpfs -o mode=0755 flannel-lab ` + WireGuardRunDir + ` && exec "$0" "$@"`

// stopTimeout is how long Stop waits after the signal before SIGKILL.
const stopTimeout = 30 * time.Second

var sigTerm os.Signal = syscall.SIGTERM

// Daemon is one flanneld process running in a host namespace.
type Daemon struct {
	Host    *Host
	Args    []string // the daemon's arguments (without the binary)
	LogPath string   // stdout and stderr of the process

	started time.Time
	cmd     *exec.Cmd
	done    chan struct{}
	code    int   // valid after done
	waitErr error // valid after done
}

// StartDaemon runs the lab's flanneld inside the host namespace with
//
//	--etcd-endpoints http://<etcd LAN addr>:2379 --iface eth0
//	--subnet-file <host dir>/subnet.env --etcd-prefix <prefix>
//
// followed by extraArgs (a repeated single-valued flag overrides the earlier
// one), with WIREGUARD_KEY_FILE=<host dir>/wgkey and a /run/wireguard of
// its own (see WireGuardRunDir). Its stdout and stderr go to a new log file per start. FLANNELD_*
// variables of the caller's environment are not passed on; h.DaemonEnv is. The process dies
// with the lab's process, and Lab.Close stops it.
func (h *Host) StartDaemon(extraArgs ...string) (*Daemon, error) {
	l := h.lab
	if l.isClosed() {
		return nil, ErrClosed
	}
	if l.opts.DaemonPath == "" {
		return nil, fmt.Errorf("lab: no daemon binary: set Options.DaemonPath (see BuildDaemon)")
	}
	args := []string{
		"--etcd-endpoints", l.EtcdEndpoint(),
		"--iface", ExternalIface,
		"--subnet-file", h.SubnetFile,
		"--etcd-prefix", l.opts.EtcdPrefix,
	}
	args = append(args, extraArgs...)

	h.mu.Lock()
	n := len(h.daemons) + 1
	h.mu.Unlock()
	logPath := filepath.Join(h.dir, fmt.Sprintf("flanneld.%d.log", n))
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return nil, fmt.Errorf("creating daemon log: %w", err)
	}
	defer logFile.Close()

	// ip netns exec runs the daemon in a mount namespace of its own, where
	// a tmpfs on /run/wireguard gives it a WireGuard socket directory of
	// its own (as on a host of its own); sh execs the daemon in place, so
	// the pid is the daemon's.
	if err := os.MkdirAll(WireGuardRunDir, 0o755); err != nil {
		return nil, fmt.Errorf("creating %s: %w", WireGuardRunDir, err)
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", h.NS, "sh", "-c", privateRunDir, l.opts.DaemonPath}, args...)...)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.Env = append(daemonEnv(os.Environ()), "WIREGUARD_KEY_FILE="+h.KeyFile)
	cmd.Env = append(cmd.Env, h.DaemonEnv...)
	// Own process group: a terminal's Ctrl-C reaches the lab, which then
	// stops the daemons in order. Pdeathsig: never outlive the lab process.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	d := &Daemon{Host: h, Args: args, LogPath: logPath, cmd: cmd, done: make(chan struct{})}
	d.started = time.Now()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting flanneld on %s: %w", h.Name, err)
	}
	h.mu.Lock()
	h.daemons = append(h.daemons, d)
	h.mu.Unlock()
	go func() {
		err := cmd.Wait()
		d.code = cmd.ProcessState.ExitCode()
		if _, isExit := err.(*exec.ExitError); !isExit {
			d.waitErr = err
		}
		close(d.done)
	}()
	l.opts.Logf("%s: started flanneld (pid %d), log %s", h.Name, cmd.Process.Pid, logPath)
	return d, nil
}

// daemonEnv drops FLANNELD_* variables, which the daemon reads as flags.
func daemonEnv(env []string) []string {
	out := make([]string, 0, len(env))
	for _, kv := range env {
		if !strings.HasPrefix(kv, "FLANNELD_") {
			out = append(out, kv)
		}
	}
	return out
}

// Pid is the daemon's process id.
func (d *Daemon) Pid() int { return d.cmd.Process.Pid }

// Done is closed when the process has exited.
func (d *Daemon) Done() <-chan struct{} { return d.done }

// Exited reports whether the process has exited.
func (d *Daemon) Exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// Signal sends sig to the daemon; signalling an exited daemon does nothing.
func (d *Daemon) Signal(sig os.Signal) error {
	if d.Exited() {
		return nil
	}
	if err := d.cmd.Process.Signal(sig); err != nil && !d.Exited() {
		return fmt.Errorf("signalling flanneld on %s: %w", d.Host.Name, err)
	}
	return nil
}

// Wait blocks until the daemon exits and returns its exit code (-1 if a
// signal killed it).
func (d *Daemon) Wait() (int, error) {
	<-d.done
	return d.code, d.waitErr
}

// Stop sends sig and waits for the exit code. If the daemon is still running
// 30 s later it is killed and Stop returns an error. Stopping an exited
// daemon just returns its exit code.
func (d *Daemon) Stop(sig os.Signal) (int, error) {
	if err := d.Signal(sig); err != nil {
		return -1, err
	}
	select {
	case <-d.done:
		return d.Wait()
	case <-time.After(stopTimeout):
	}
	d.cmd.Process.Kill()
	code, _ := d.Wait()
	return code, fmt.Errorf("flanneld on %s did not exit within %v of %v; killed it", d.Host.Name, stopTimeout, sig)
}

// Log returns everything the daemon has written so far.
func (d *Daemon) Log() string {
	b, err := os.ReadFile(d.LogPath)
	if err != nil {
		return fmt.Sprintf("(reading %s: %v)", d.LogPath, err)
	}
	return string(b)
}
