package lab

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"

	"github.com/flanneld-go/flanneld/internal/etcdtest"
)

// externalEtcd is an etcd server binary (Options.EtcdBinary) running as its
// own process in the LAN namespace: etcd 3.6 and later, which have no v2
// API and cannot be embedded next to the 3.5 server the other tests use.
type externalEtcd struct {
	cmd     *exec.Cmd
	done    chan struct{}
	logPath string
}

// startExternalEtcd runs bin in the LAN namespace on the lab's etcd address
// and ports, with its data and log in the lab directory, and waits until it
// answers.
func (l *Lab) startExternalEtcd(bin string) (*externalEtcd, error) {
	client := fmt.Sprintf("http://%s:%d", l.etcdAddr, EtcdClientPort)
	peer := fmt.Sprintf("http://%s:%d", l.etcdAddr, EtcdPeerPort)
	dir := filepath.Join(l.dir, "etcd")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating etcd directory: %w", err)
	}
	logPath := filepath.Join(dir, "etcd.log")
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return nil, fmt.Errorf("creating etcd log: %w", err)
	}
	defer logFile.Close()
	cmd := exec.Command("ip", "netns", "exec", l.lanNS, bin,
		"--name", "lab",
		"--data-dir", filepath.Join(dir, "data"),
		"--listen-client-urls", client, "--advertise-client-urls", client,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
		"--initial-cluster", "lab="+peer,
		"--log-level", "warn")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")} // no ETCD_* of the caller
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", bin, err)
	}
	e := &externalEtcd{cmd: cmd, done: make(chan struct{}), logPath: logPath}
	go func() { cmd.Wait(); close(e.done) }()

	c, err := l.V3Client()
	if err != nil {
		e.stop()
		return nil, err
	}
	defer c.Close()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := c.Get(ctx, "health")
		cancel()
		if err == nil {
			return e, nil
		}
		select {
		case <-e.done:
			log, _ := os.ReadFile(logPath)
			return nil, fmt.Errorf("etcd %s exited at start: %s", bin, tail(string(log), 20))
		default:
		}
		if time.Now().After(deadline) {
			e.stop()
			return nil, fmt.Errorf("etcd %s not answering on %s after 30 s: %w", bin, client, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// stop ends the process: SIGTERM, then SIGKILL after 10 s.
func (e *externalEtcd) stop() error {
	if e == nil {
		return nil
	}
	e.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-e.done:
	case <-time.After(10 * time.Second):
		e.cmd.Process.Kill()
		<-e.done
	}
	return nil
}

// V3Client returns an etcd v3 client of the lab's etcd (embedded or
// external) that dials from inside the LAN namespace. Close it when done.
func (l *Lab) V3Client() (*clientv3.Client, error) {
	dial := etcdtest.DialContextIn(nsPath(l.lanNS))
	c, err := clientv3.New(clientv3.Config{
		Endpoints: []string{l.EtcdEndpoint()},
		Logger:    zap.NewNop(),
		DialOptions: []grpc.DialOption{
			grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
				return dial(ctx, "tcp", addr)
			}),
			// Reconnect within a second of a restarted etcd, not after
			// gRPC's default back-off of up to two minutes.
			grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second}}),
		},
	})
	if err != nil {
		return nil, fmt.Errorf("creating etcd v3 client: %w", err)
	}
	return c, nil
}

// setConfigV3 writes the config with the v3 API (an etcd without v2).
func (l *Lab) setConfigV3(ctx context.Context, key, configJSON string) error {
	c, err := l.V3Client()
	if err != nil {
		return err
	}
	defer c.Close()
	if _, err := c.Put(ctx, key, configJSON); err != nil {
		return fmt.Errorf("writing %s: %w", key, err)
	}
	return nil
}
