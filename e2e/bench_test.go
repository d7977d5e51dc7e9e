package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/flanneld-go/flanneld/e2e/lab"
)

// BenchmarkStartToSubnetEnv measures the time from starting flanneld to its
// subnet.env being in place (median-ms, p90-ms) and to its READY=1
// notification (ready-median-ms, ready-p90-ms: subnet.env written and the
// iptables rules installed). The network config exists before each start.
//
// The daemon is the release build (CGO_ENABLED=0 -trimpath -ldflags "-s
// -w", as make build and the image build it), forked by the benchmark
// straight into the host's network namespace, so that the time is the
// daemon's and not that of `ip netns exec` (which also execs ip and makes a
// mount namespace). The clock starts just before the fork.
//
//   - restart: the node's lease and subnet.env are still there (the common
//     case: a restarted daemon).
//   - fresh: no lease and no subnet.env; the daemon allocates a subnet.
func BenchmarkStartToSubnetEnv(b *testing.B) {
	needRoot(b)
	l := newLab(b, 1, hostGWConfig)
	h := l.Host(1)
	bin := buildRelease(b)
	notify := listenNotify(b)
	// A first start so that "restart" finds a lease, a subnet.env and the
	// rules in place.
	d := startInNS(b, l, h, bin, notify)
	d.waitNewEnv(b, 0)
	d.waitReady(b)
	d.stop(b)

	for _, mode := range []string{"restart", "fresh"} {
		b.Run(mode, func(b *testing.B) {
			var toEnv, toReady []time.Duration
			for b.Loop() {
				b.StopTimer()
				if mode == "fresh" {
					forget(b, l, h)
				}
				ino := inode(h.SubnetFile)
				b.StartTimer()
				d := startInNS(b, l, h, bin, notify)
				toEnv = append(toEnv, d.waitNewEnv(b, ino))
				toReady = append(toReady, d.waitReady(b))
				b.StopTimer()
				d.stop(b)
				b.StartTimer()
			}
			report(b, toEnv, "")
			report(b, toReady, "ready-")
			b.ReportMetric(float64(len(toEnv)), "starts")
		})
	}
}

// report adds the median and the 90th percentile of times as metrics.
func report(b *testing.B, times []time.Duration, prefix string) {
	slices.Sort(times)
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	b.ReportMetric(ms(times[len(times)/2]), prefix+"median-ms")
	b.ReportMetric(ms(times[len(times)*9/10]), prefix+"p90-ms")
}

var release struct {
	sync.Mutex
	path string
}

// buildRelease builds flanneld as the Makefile's build target does, once
// per test binary, into a directory removed when the benchmark ends.
func buildRelease(b *testing.B) string {
	b.Helper()
	release.Lock()
	defer release.Unlock()
	if release.path != "" {
		if _, err := os.Stat(release.path); err == nil {
			return release.path
		}
	}
	root, err := filepath.Abs("..")
	if err != nil {
		b.Fatal(err)
	}
	path := filepath.Join(b.TempDir(), "flanneld")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", path, ".")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("building flanneld (CGO_ENABLED=0 go build -trimpath -ldflags '-s -w') in %s: %v\n%s", root, err, out)
	}
	release.path = path
	return path
}

// notifySocket is a NOTIFY_SOCKET (a unixgram socket in the filesystem,
// which a process reaches from any network namespace) and the time each
// message arrived.
type notifySocket struct {
	path string
	msgs chan notifyMsg
}

type notifyMsg struct {
	text string
	at   time.Time
}

func listenNotify(b *testing.B) *notifySocket {
	b.Helper()
	// Not b.TempDir(): a socket path must fit in 108 bytes.
	dir, err := os.MkdirTemp("", "flanneld-bench-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		b.Fatal(err)
	}
	s := &notifySocket{path: path, msgs: make(chan notifyMsg, 64)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for {
			n, _, err := conn.ReadFromUnix(buf)
			at := time.Now()
			if err != nil {
				return
			}
			s.msgs <- notifyMsg{text: string(buf[:n]), at: at}
		}
	}()
	b.Cleanup(func() { conn.Close(); <-done })
	return s
}

// benchDaemon is one flanneld started by startInNS.
type benchDaemon struct {
	h      *lab.Host
	cmd    *exec.Cmd
	log    string
	notify *notifySocket
	begin  time.Time
	done   chan struct{}
}

// startInNS forks bin into h's network namespace: the forking OS thread
// enters the namespace for the fork and leaves it again; the child keeps
// it. The daemon gets the lab's usual flags (as lab.Host.StartDaemon) and
// NOTIFY_SOCKET. It checks that the process is in h's namespace.
func startInNS(b *testing.B, l *lab.Lab, h *lab.Host, bin string, notify *notifySocket) *benchDaemon {
	b.Helper()
	for drained := false; !drained; {
		select {
		case <-notify.msgs:
		default:
			drained = true
		}
	}
	logFile, err := os.CreateTemp(b.TempDir(), "flanneld-*.log")
	if err != nil {
		b.Fatal(err)
	}
	defer logFile.Close()
	cmd := exec.Command(bin,
		"--etcd-endpoints", l.EtcdEndpoint(),
		"--iface", lab.ExternalIface,
		"--subnet-file", h.SubnetFile,
		"--etcd-prefix", l.EtcdPrefix())
	cmd.Stdout, cmd.Stderr = logFile, logFile
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "FLANNELD_") && !strings.HasPrefix(kv, "NOTIFY_SOCKET=") {
			env = append(env, kv)
		}
	}
	cmd.Env = append(env, "NOTIFY_SOCKET="+notify.path)
	// Pdeathsig: the daemon dies with the thread that forked it, which
	// lives as long as the benchmark unless it could not leave the
	// namespace (then it must die, and the daemon with it).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}

	d := &benchDaemon{h: h, cmd: cmd, log: logFile.Name(), notify: notify, done: make(chan struct{})}
	if err := forkInNS(nsPath(h), func() error {
		d.begin = time.Now()
		return cmd.Start()
	}); err != nil {
		b.Fatalf("starting flanneld in %s: %v", h.NS, err)
	}
	go func() { cmd.Wait(); close(d.done) }()
	b.Cleanup(func() { d.kill() })
	if err := sameNetNS(cmd.Process.Pid, nsPath(h)); err != nil {
		d.kill()
		b.Fatal(err)
	}
	return d
}

// forkInNS runs start on an OS thread that is inside the namespace at
// nsFile, then returns the thread to the namespace it came from.
func forkInNS(nsFile string, start func() error) error {
	target, err := netns.GetFromPath(nsFile)
	if err != nil {
		return fmt.Errorf("opening %s: %w", nsFile, err)
	}
	defer target.Close()
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("opening the thread's namespace: %w", err)
	}
	defer orig.Close()
	if err := netns.Set(target); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("entering %s: %w", nsFile, err)
	}
	startErr := start()
	if err := netns.Set(orig); err != nil {
		// Stay locked: the thread ends with this goroutine instead of
		// running other goroutines inside the namespace.
		return errors.Join(startErr, fmt.Errorf("leaving %s: %w", nsFile, err))
	}
	runtime.UnlockOSThread()
	return startErr
}

// sameNetNS checks that pid's network namespace is the one at nsFile.
func sameNetNS(pid int, nsFile string) error {
	var want, got syscall.Stat_t
	if err := syscall.Stat(nsFile, &want); err != nil {
		return err
	}
	if err := syscall.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &got); err != nil {
		return fmt.Errorf("reading the daemon's namespace: %w", err)
	}
	if got.Ino != want.Ino || got.Dev != want.Dev {
		return fmt.Errorf("flanneld (pid %d) runs in network namespace %d:%d, want %s (%d:%d)", pid, got.Dev, got.Ino, nsFile, want.Dev, want.Ino)
	}
	return nil
}

func (d *benchDaemon) exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

func (d *benchDaemon) logText() string {
	out, err := os.ReadFile(d.log)
	if err != nil {
		return err.Error()
	}
	return string(out)
}

// waitNewEnv polls (every millisecond, to keep the measurement fine) until
// the host's subnet file is a new, complete subnet.env, and returns the time
// since the start.
func (d *benchDaemon) waitNewEnv(b *testing.B, oldIno uint64) time.Duration {
	b.Helper()
	deadline := time.Now().Add(converge)
	for {
		if ino := inode(d.h.SubnetFile); ino != 0 && ino != oldIno {
			if _, err := d.h.ReadSubnetEnv(); err == nil {
				return time.Since(d.begin)
			}
		}
		if d.exited() {
			b.Fatalf("flanneld exited before writing subnet.env; log:\n%s", d.logText())
		}
		if time.Now().After(deadline) {
			b.Fatalf("no new subnet.env within %v; log:\n%s", converge, d.logText())
		}
		time.Sleep(time.Millisecond)
	}
}

// waitReady waits for READY=1 and returns the time from the start to its
// arrival.
func (d *benchDaemon) waitReady(b *testing.B) time.Duration {
	b.Helper()
	deadline := time.After(converge)
	for {
		select {
		case m := <-d.notify.msgs:
			if slices.Contains(strings.Split(m.text, "\n"), "READY=1") {
				return m.at.Sub(d.begin)
			}
		case <-d.done:
			b.Fatalf("flanneld exited before READY=1; log:\n%s", d.logText())
		case <-deadline:
			b.Fatalf("no READY=1 within %v; log:\n%s", converge, d.logText())
		}
	}
}

// stop sends SIGTERM and checks that the daemon exits 0.
func (d *benchDaemon) stop(b *testing.B) {
	b.Helper()
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(converge):
		d.kill()
		b.Fatalf("flanneld did not exit within %v of SIGTERM; log:\n%s", converge, d.logText())
	}
	if code := d.cmd.ProcessState.ExitCode(); code != 0 {
		b.Fatalf("flanneld exited with %d after SIGTERM; log:\n%s", code, d.logText())
	}
}

// kill ends a daemon still running (at cleanup) and waits for it.
func (d *benchDaemon) kill() {
	if !d.exited() {
		d.cmd.Process.Kill()
		<-d.done
	}
}

// forget deletes the host's leases and its subnet.env.
func forget(b *testing.B, l *lab.Lab, h *lab.Host) {
	ctx, cancel := context.WithTimeout(context.Background(), converge)
	defer cancel()
	leases, err := readLeases(ctx, l)
	if err != nil {
		b.Fatal(err)
	}
	for _, ls := range leasesOf(leases, h) {
		if _, err := l.KeysAPI().Delete(ctx, leaseKey(l, ls.Subnet), nil); err != nil {
			b.Fatal(err)
		}
	}
	if err := os.Remove(h.SubnetFile); err != nil && !errors.Is(err, os.ErrNotExist) {
		b.Fatal(err)
	}
}

// inode is the inode number of path, 0 if it does not exist. The daemon
// writes subnet.env to a temporary file and renames it, so a new file has
// a new inode.
func inode(path string) uint64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Ino
	}
	return 0
}
