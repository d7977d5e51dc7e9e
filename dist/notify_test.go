package dist

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flanneld-go/flanneld/e2e/lab"
	"github.com/flanneld-go/flanneld/internal/etcdtest"
	"github.com/flanneld-go/flanneld/internal/nstest"
)

// Generous bounds for convergence; nothing is asserted about timing.
const (
	readyTimeout = 2 * time.Minute
	stopTimeout  = 30 * time.Second
)

// ipIn runs ip -n ns args... or fails.
func ipIn(t *testing.T, ns string, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", append([]string{"-n", ns}, args...)...).CombinedOutput(); err != nil {
		t.Fatalf("ip -n %s %s: %v: %s", ns, strings.Join(args, " "), err, out)
	}
}

// notification is a datagram on the notify socket with the subnet file as
// it was when the datagram was read.
type notification struct {
	msg    string
	env    string
	envErr error
}

// TestNotifyReadyAfterSubnetFile runs the daemon the way flanneld.service
// does (Type=notify), in a network namespace of its own with an embedded
// etcd there, and checks that READY=1 arrives only once subnet.env is
// complete, as units ordered after flanneld (docker) rely on.
func TestNotifyReadyAfterSubnetFile(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: runs flanneld in a network namespace the test creates")
	}
	for _, tool := range []string{"ip", "iptables"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s (apt-get install iproute2 iptables)", tool)
		}
	}
	daemon := lab.BuildDaemon(t)

	// The host: lo for etcd, and ext0 with an address as the external
	// interface (a veth pair with both ends in the namespace). Nothing
	// outside this namespace is touched; the daemon's routes and iptables
	// rules go away with it.
	ns := nstest.New(t, "fldist").Name
	ipIn(t, ns, "link", "set", "lo", "up")
	ipIn(t, ns, "link", "add", "ext0", "type", "veth", "peer", "name", "ext0peer")
	ipIn(t, ns, "addr", "add", "192.0.2.10/24", "dev", "ext0")
	ipIn(t, ns, "link", "set", "ext0peer", "up")
	ipIn(t, ns, "link", "set", "ext0", "up")
	etcd := etcdtest.Start(t, etcdtest.WithNetNS(filepath.Join("/run/netns", ns)))

	dir := t.TempDir()
	subnetFile := filepath.Join(dir, "run", "flannel", "subnet.env")
	sock := filepath.Join(dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatalf("listening on the notify socket: %v", err)
	}
	notes := make(chan notification)
	stopReading := make(chan struct{})
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				return
			}
			// Look at the subnet file the moment the datagram is read.
			env, envErr := os.ReadFile(subnetFile)
			select {
			case notes <- notification{msg: string(buf[:n]), env: string(env), envErr: envErr}:
			case <-stopReading:
				return
			}
		}
	}()
	t.Cleanup(func() {
		close(stopReading)
		conn.Close()
		<-readerDone
	})

	logPath := filepath.Join(dir, "flanneld.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	cmd := exec.Command("ip", "netns", "exec", ns, daemon,
		"--etcd-endpoints", etcd.Endpoints()[0],
		"--iface", "ext0",
		"--subnet-file", subnetFile,
		"--ip-masq")
	cmd.Env = append(envWithout("FLANNELD_", "NOTIFY_SOCKET="), "NOTIFY_SOCKET="+sock)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting flanneld: %v", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		select {
		case <-exited:
			return
		default:
		}
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(stopTimeout):
			cmd.Process.Kill()
			<-exited
		}
	})
	failf := func(format string, args ...any) {
		t.Helper()
		log, _ := os.ReadFile(logPath)
		t.Fatalf(format+"\nflanneld log:\n%s", append(args, log)...)
	}

	// Without a network config there can be no lease, no subnet file and
	// no READY yet.
	select {
	case n := <-notes:
		failf("notification %q before the network config exists", n.msg)
	default:
	}
	if _, err := os.Stat(subnetFile); err == nil {
		failf("%s exists before the network config does", subnetFile)
	}
	ctx, cancel := context.WithTimeout(context.Background(), readyTimeout)
	defer cancel()
	if _, err := etcd.KeysAPI().Set(ctx, "/coreos.com/network/config", `{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}`, nil); err != nil {
		t.Fatalf("writing the network config: %v", err)
	}

	var ready notification
	for ready.msg == "" {
		select {
		case n := <-notes:
			t.Logf("notification %q", n.msg)
			if n.envErr != nil && !os.IsNotExist(n.envErr) {
				failf("reading %s: %v", subnetFile, n.envErr)
			}
			for _, line := range strings.Split(n.msg, "\n") {
				if line == "READY=1" {
					ready = n
				}
			}
		case <-exited:
			failf("flanneld exited with %v before READY=1", cmd.ProcessState)
		case <-ctx.Done():
			failf("no READY=1 within %v", readyTimeout)
		}
	}
	if ready.envErr != nil {
		failf("READY=1 arrived while %s could not be read: %v", subnetFile, ready.envErr)
	}
	m := regexp.MustCompile(`^FLANNEL_NETWORK=10\.5\.0\.0/16\nFLANNEL_SUBNET=10\.5\.(\d+)\.1/24\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ=true\n$`).FindStringSubmatch(ready.env)
	if m == nil {
		failf("when READY=1 arrived, %s held %q; want the complete file for a /24 of 10.5.0.0/16, MTU 1500, masquerading", subnetFile, ready.env)
	}
	third, _ := strconv.Atoi(m[1])
	if third < 1 || third > 255 {
		failf("FLANNEL_SUBNET 10.5.%d.1/24 is outside SubnetMin..SubnetMax", third)
	}

	// The lease behind the subnet file is ours in etcd.
	key := fmt.Sprintf("/coreos.com/network/subnets/10.5.%d.0-24", third)
	resp, err := etcd.KeysAPI().Get(ctx, key, nil)
	if err != nil {
		failf("reading the lease %s: %v", key, err)
	}
	var lease struct{ PublicIP, BackendType string }
	if err := json.Unmarshal([]byte(resp.Node.Value), &lease); err != nil || lease.PublicIP != "192.0.2.10" || lease.BackendType != "host-gw" {
		failf("lease %s = %s (%v); want PublicIP 192.0.2.10, BackendType host-gw", key, resp.Node.Value, err)
	}
	// The masquerade rules that --ip-masq promises are in place.
	out, err := exec.Command("ip", "netns", "exec", ns, "iptables", "-w", "-t", "nat", "-S", "FLANNEL-POSTRTG").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "MASQUERADE") {
		failf("iptables -t nat -S FLANNEL-POSTRTG in %s: %v\n%s", ns, err, out)
	}

	// What the docker drop-in makes of the daemon's own subnet file.
	optsFile := filepath.Join(dir, "docker_opts.env")
	if res := run(t, nil, "./"+script, "-f", subnetFile, "-d", optsFile); res.code != 0 {
		failf("%s on the daemon's subnet file: exit %d: %s", script, res.code, res.stderr)
	}
	want := fmt.Sprintf(`DOCKER_OPT_BIP="--bip=10.5.%d.1/24"
DOCKER_OPT_IPMASQ="--ip-masq=false"
DOCKER_OPT_MTU="--mtu=1500"
DOCKER_OPTS=" --bip=10.5.%d.1/24 --ip-masq=false --mtu=1500"
`, third, third)
	if got := readFile(t, optsFile); got != want {
		t.Errorf("%s on the daemon's subnet file wrote:\n%s\nwant:\n%s", script, got, want)
	}

	// systemd stops the service with SIGTERM; a clean stop is exit 0.
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(stopTimeout):
		failf("flanneld still running %v after SIGTERM", stopTimeout)
	}
	if code := cmd.ProcessState.ExitCode(); code != 0 {
		failf("flanneld exited with %d after SIGTERM, want 0", code)
	}
}
