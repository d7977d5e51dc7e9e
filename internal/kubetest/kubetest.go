// Package kubetest runs a real kube-apiserver for tests: built from the Go
// module proxy (see Binary), backed by an embedded etcd (internal/etcdtest),
// listening only on loopback or on an address inside a given network
// namespace, with static tokens for an administrator and for flannel's
// service account.
package kubetest

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/flanneld-go/flanneld/internal/etcdtest"
)

// The identity behind FlannelToken: the service account of
// dist/kube-flannel.yml, as the API server names it.
const (
	FlannelNamespace      = "kube-flannel"
	FlannelServiceAccount = "flannel"
	FlannelUser           = "system:serviceaccount:" + FlannelNamespace + ":" + FlannelServiceAccount
)

// readyTimeout bounds the wait for /readyz (the first start creates the
// bootstrap RBAC roles; a loaded machine under -race is slow).
const readyTimeout = 2 * time.Minute

// Option configures a Server.
type Option func(*options)

type options struct {
	nsPath string
	addr   netip.Addr
}

// WithNetNS runs etcd and the API server inside the network namespace bound
// at nsPath, the API server listening on addr there (etcd on that
// namespace's loopback, which must be up). The Server's clients dial from
// inside it.
func WithNetNS(nsPath string, addr netip.Addr) Option {
	return func(o *options) { o.nsPath, o.addr = nsPath, addr }
}

// Server is a running kube-apiserver and its etcd.
type Server struct {
	// URL is the API server's address, e.g. https://127.0.0.1:43121.
	URL string
	// CA is the PEM of the API server's self-signed serving certificate
	// chain, to verify it with.
	CA []byte
	// AdminToken authenticates as a member of system:masters.
	AdminToken string
	// FlannelToken authenticates as FlannelUser (groups
	// system:serviceaccounts and system:serviceaccounts:kube-flannel), with
	// no permissions until a binding grants them.
	FlannelToken string

	nsPath string
	dir    string
	bin    string
	args   []string
	etcd   *etcdtest.Server
	cmd    *exec.Cmd
	done   chan struct{}
	log    *os.File

	closeOnce sync.Once
	closeErr  error
}

// Start starts a server for the test and stops it when the test ends. It
// fails the test if the binary cannot be built or the server does not
// become ready.
func Start(t testing.TB, opts ...Option) *Server {
	t.Helper()
	s, err := New(opts...)
	if err != nil {
		t.Fatalf("starting kube-apiserver: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("stopping kube-apiserver: %v", err)
		}
	})
	return s
}

// New builds (if needed) and starts a kube-apiserver and waits until it is
// ready. The caller must call Close.
func New(opts ...Option) (_ *Server, err error) {
	o := options{addr: netip.AddrFrom4([4]byte{127, 0, 0, 1})}
	for _, opt := range opts {
		opt(&o)
	}
	bin, err := Binary()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "kubetest-")
	if err != nil {
		return nil, err
	}
	s := &Server{nsPath: o.nsPath, dir: dir}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()

	var etcdOpts []etcdtest.Option
	if o.nsPath != "" {
		etcdOpts = append(etcdOpts, etcdtest.WithNetNS(o.nsPath))
	}
	if s.etcd, err = etcdtest.New(append(etcdOpts, etcdtest.WithParentDir(dir))...); err != nil {
		return nil, fmt.Errorf("starting etcd for kube-apiserver: %w", err)
	}
	if err := s.writeFiles(); err != nil {
		return nil, err
	}
	ports, err := etcdtest.FreePorts(o.nsPath, o.addr, 1)
	if err != nil {
		return nil, fmt.Errorf("kube-apiserver: %w", err)
	}
	hostPort := net.JoinHostPort(o.addr.String(), strconv.Itoa(ports[0]))
	s.URL = "https://" + hostPort
	if s.log, err = os.Create(filepath.Join(dir, "kube-apiserver.log")); err != nil {
		return nil, err
	}
	s.bin = bin
	s.args = []string{
		"--etcd-servers=" + s.etcd.Endpoints()[0],
		"--cert-dir=" + filepath.Join(dir, "certs"),
		"--secure-port=" + strconv.Itoa(ports[0]),
		"--bind-address=" + o.addr.String(),
		"--advertise-address=" + o.addr.String(),
		"--service-cluster-ip-range=10.96.0.0/16",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file=" + filepath.Join(dir, "sa.key"),
		"--service-account-signing-key-file=" + filepath.Join(dir, "sa.key"),
		"--token-auth-file=" + filepath.Join(dir, "tokens.csv"),
		"--authorization-mode=RBAC",
		"--endpoint-reconciler-type=none",
		"--disable-admission-plugins=ServiceAccount",
		"--allow-privileged=true",
		"--profiling=false",
		"--enable-priority-and-fairness=false",
	}
	if err := s.start(); err != nil {
		return nil, err
	}
	return s, nil
}

// start runs the API server process and waits until it is ready.
func (s *Server) start() error {
	cmd := exec.Command(s.bin, s.args...)
	cmd.Stdout, cmd.Stderr = s.log, s.log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := etcdtest.InNetNS(s.nsPath, cmd.Start); err != nil {
		return fmt.Errorf("starting %s: %w", s.bin, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	s.cmd, s.done = cmd, done
	return s.waitReady()
}

// stop ends the API server process (SIGTERM, then SIGKILL after 15 s).
func (s *Server) stop() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(15 * time.Second):
		s.cmd.Process.Kill()
		<-s.done
	}
}

// Restart kills the API server process and starts it again on the same
// address, data and credentials, as after a crash: clients see their
// connections and watches cut, then refused until it is back.
func (s *Server) Restart() error {
	s.Stop()
	return s.Start()
}

// Stop kills the API server process, as a crash or a control-plane upgrade
// does: clients see their connections and watches cut, then refused until
// Start. Its data (in etcd) stays.
func (s *Server) Stop() {
	if s.cmd != nil && s.cmd.Process != nil {
		s.cmd.Process.Kill()
		<-s.done
	}
}

// Start starts the stopped API server again on the same address, data and
// credentials, and returns when it is ready.
func (s *Server) Start() error { return s.start() }

// writeFiles writes the token file and the service account key.
func (s *Server) writeFiles() error {
	s.AdminToken, s.FlannelToken = randomToken(), randomToken()
	tokens := fmt.Sprintf("%s,admin,admin-uid,\"system:masters\"\n%s,%s,flannel-uid,\"system:serviceaccounts,system:serviceaccounts:%s\"\n",
		s.AdminToken, s.FlannelToken, FlannelUser, FlannelNamespace)
	if err := os.WriteFile(filepath.Join(s.dir, "tokens.csv"), []byte(tokens), 0o600); err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(s.dir, "sa.key"), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600)
}

func randomToken() string {
	b := make([]byte, 16)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// waitReady polls /readyz until it answers 200, then reads the serving
// certificate the server generated.
func (s *Server) waitReady() error {
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext:     etcdtest.DialContextIn(s.nsPath),
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, // only to poll readiness; clients verify CA
	}}
	defer hc.CloseIdleConnections()
	deadline := time.Now().Add(readyTimeout)
	var last string
	for time.Now().Before(deadline) {
		select {
		case <-s.done:
			return fmt.Errorf("kube-apiserver exited: %s", lastLines(s.Log(), 20))
		case <-time.After(200 * time.Millisecond):
		}
		req, _ := http.NewRequest(http.MethodGet, s.URL+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+s.AdminToken)
		resp, err := hc.Do(req)
		if err != nil {
			last = err.Error()
			continue
		}
		var body bytes.Buffer
		body.ReadFrom(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			ca, err := os.ReadFile(filepath.Join(s.dir, "certs", "apiserver.crt"))
			if err != nil {
				return fmt.Errorf("reading kube-apiserver's certificate: %w", err)
			}
			s.CA = ca
			return nil
		}
		last = fmt.Sprintf("%s: %s", resp.Status, lastLines(body.String(), 5))
	}
	return fmt.Errorf("kube-apiserver not ready after %v (last: %s); log: %s", readyTimeout, last, lastLines(s.Log(), 20))
}

// Config returns a client config for the server that authenticates with
// token (AdminToken, FlannelToken or another).
func (s *Server) Config(token string) *rest.Config {
	c := &rest.Config{
		Host:            s.URL,
		BearerToken:     token,
		TLSClientConfig: rest.TLSClientConfig{CAData: s.CA},
		QPS:             -1, // tests create many objects; no client-side throttling
	}
	if s.nsPath != "" {
		c.Dial = etcdtest.DialContextIn(s.nsPath)
	}
	return c
}

// Client returns a clientset authenticated with token.
func (s *Server) Client(token string) (kubernetes.Interface, error) {
	return kubernetes.NewForConfig(s.Config(token))
}

// Admin returns a clientset with AdminToken, failing the test on error.
func (s *Server) Admin(t testing.TB) kubernetes.Interface {
	t.Helper()
	c, err := s.Client(s.AdminToken)
	if err != nil {
		t.Fatalf("creating admin client: %v", err)
	}
	return c
}

// WriteKubeconfig writes a kubeconfig file for the server and token to path
// (mode 0600), as a daemon reads it with --kubeconfig-file.
func (s *Server) WriteKubeconfig(path, token string) error {
	caPath := path + ".ca.crt"
	if err := os.WriteFile(caPath, s.CA, 0o644); err != nil {
		return err
	}
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: test
  user:
    token: %s
contexts:
- name: test
  context:
    cluster: test
    user: test
current-context: test
`, s.URL, caPath, token)
	return os.WriteFile(path, []byte(kc), 0o600)
}

// Pid is the API server's process id.
func (s *Server) Pid() int { return s.cmd.Process.Pid }

// Log returns what the API server has printed so far.
func (s *Server) Log() string {
	b, _ := os.ReadFile(filepath.Join(s.dir, "kube-apiserver.log"))
	return string(b)
}

// Close stops the API server and etcd and removes their files. It is
// idempotent.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		var errs []error
		s.stop()
		if s.log != nil {
			s.log.Close()
		}
		if s.etcd != nil {
			errs = append(errs, s.etcd.Close())
		}
		errs = append(errs, os.RemoveAll(s.dir))
		s.closeErr = errors.Join(errs...)
	})
	return s.closeErr
}
