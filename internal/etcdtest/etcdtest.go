// Package etcdtest runs a real etcd server (v3 API, and v2 unless WithoutV2), for
// tests and for the namespaced lab: a single member (Start, New) or a
// cluster of several (StartCluster, NewCluster). A server keeps its data in
// a temporary directory, listens on loopback (or on a given address,
// optionally inside a network namespace) and logs nothing. Stopping a
// server closes every client connection at once, as the death of the
// member would.
package etcdtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"go.etcd.io/etcd/client/v2"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// readyTimeout bounds how long a start may take before it is an error.
const readyTimeout = 60 * time.Second

// ErrStopped is returned by operations that need a running server.
var ErrStopped = errors.New("etcdtest: server is stopped")

// Option configures a Server.
type Option func(*options)

type options struct {
	addr       netip.Addr
	clientPort int
	peerPort   int
	nsPath     string
	tls        bool
	parentDir  string
	noV2       bool
}

// member is what a server knows of its cluster; the zero value is a
// cluster of one.
type member struct {
	name           string // member name (default "etcdtest")
	initialCluster string // name=peerURL,... (default: just this member)
	token          string // initial cluster token (default "etcdtest")
	tickMs         uint   // heartbeat interval (default 10)
	electionMs     uint   // election timeout (default 50)
}

// WithTLS serves clients over TLS and requires a client certificate signed by
// a CA generated for this server. The PEM files are available from
// Server.TLS; the Server's own client helpers use them.
func WithTLS() Option { return func(o *options) { o.tls = true } }

// WithListen makes the server listen on addr with the given client and peer
// ports instead of 127.0.0.1 and two free ports. A port of 0 picks a free one.
func WithListen(addr netip.Addr, clientPort, peerPort int) Option {
	return func(o *options) { o.addr, o.clientPort, o.peerPort = addr, clientPort, peerPort }
}

// WithNetNS creates the server's listening sockets inside the network
// namespace bound at nsPath (e.g. /run/netns/NAME), so the server is only
// reachable from there. The Server's client helpers dial from inside it too.
// With the default listen address 127.0.0.1, bring lo up in that namespace.
func WithNetNS(nsPath string) Option { return func(o *options) { o.nsPath = nsPath } }

// WithParentDir creates the server's directory (data and certificates)
// inside dir instead of the system temporary directory.
func WithParentDir(dir string) Option { return func(o *options) { o.parentDir = dir } }

// Server is an embedded etcd server. Its methods are safe for concurrent use.
type Server struct {
	opts      options
	member    member
	dir       string  // removed by Close
	clientURL url.URL // the door clients use
	// backendURL is etcd's own client listener behind the door, with the
	// same scheme.
	backendURL url.URL
	peerURL    url.URL
	// etcdNS and etcdAddr are where etcd itself (backend and peer
	// listeners) runs: for a single server those of the options; for a
	// cluster member the caller's namespace and 127.0.0.1, because etcd
	// dials its peers from goroutines on any thread, which are never in
	// another namespace.
	etcdNS    string
	etcdAddr  netip.Addr
	tlsFiles  *TLSFiles
	transport *http.Transport
	client    client.Client

	mu     sync.Mutex
	etcd   *embed.Etcd // nil while stopped
	door   *door       // nil while stopped
	closed bool
}

// TB is the part of testing.TB that Start and StartCluster use: a
// *testing.T or *testing.B. The package names the methods instead of
// importing testing, so that programs built on New (cmd/flannel-lab, through
// e2e/lab) do not link the testing package.
type TB interface {
	Helper()
	Errorf(format string, args ...any)
	Fatalf(format string, args ...any)
	Cleanup(func())
}

// Start starts a server for the test and stops it (removing its data) when
// the test ends. It fails the test if the server does not start.
func Start(t TB, opts ...Option) *Server {
	t.Helper()
	s, err := New(opts...)
	if err != nil {
		t.Fatalf("starting embedded etcd: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("closing embedded etcd: %v", err)
		}
	})
	return s
}

// New starts a server and waits until it serves requests. The caller must
// call Close.
func New(opts ...Option) (*Server, error) {
	o, err := parseOptions(opts)
	if err != nil {
		return nil, err
	}
	s, err := newServer(o, member{})
	if err != nil {
		return nil, err
	}
	if err := s.init(); err != nil {
		os.RemoveAll(s.dir)
		return nil, err
	}
	return s, nil
}

func parseOptions(opts []Option) (options, error) {
	o := options{addr: netip.AddrFrom4([4]byte{127, 0, 0, 1})}
	for _, opt := range opts {
		opt(&o)
	}
	if !o.addr.IsValid() {
		return o, fmt.Errorf("etcdtest: invalid listen address")
	}
	return o, nil
}

// newServer makes the server's directory, certificates and client
// transport; it starts nothing. On error nothing is left behind.
func newServer(o options, m member) (*Server, error) {
	if m.name == "" {
		m.name = "etcdtest"
	}
	if m.token == "" {
		m.token = "etcdtest"
	}
	if m.tickMs == 0 {
		// A single member elects itself after the first election timeout;
		// keep it short so the server is ready in about a tenth of a second.
		m.tickMs, m.electionMs = 10, 50
	}
	dir, err := os.MkdirTemp(o.parentDir, "etcdtest-")
	if err != nil {
		return nil, fmt.Errorf("creating etcd directory: %w", err)
	}
	s := &Server{opts: o, member: m, dir: dir, etcdNS: o.nsPath, etcdAddr: o.addr}
	if err := s.prepare(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	return s, nil
}

// prepare generates the certificates (WithTLS) and the client transport.
func (s *Server) prepare() error {
	if s.opts.tls {
		ips := []net.IP{net.IPv4(127, 0, 0, 1), s.opts.addr.AsSlice()}
		f, err := writePKI(filepath.Join(s.dir, "tls"), ips)
		if err != nil {
			return fmt.Errorf("generating test certificates: %w", err)
		}
		s.tlsFiles = f
	}
	s.transport = &http.Transport{
		Proxy:               nil, // never route test traffic through an environment proxy
		DialContext:         DialContextIn(s.opts.nsPath),
		TLSHandshakeTimeout: 10 * time.Second,
		MaxIdleConnsPerHost: 16,
	}
	if s.tlsFiles != nil {
		tc, err := s.tlsFiles.ClientConfig()
		if err != nil {
			return err
		}
		s.transport.TLSClientConfig = tc
	}
	return nil
}

// init picks the ports, starts the single member and makes its client.
func (s *Server) init() error {
	// Free ports are picked by binding and releasing them; another process
	// may grab one in between, so retry a few times on EADDRINUSE.
	var err error
	for attempt := 0; attempt < 5; attempt++ {
		if err = s.pickPorts(); err != nil {
			return err
		}
		err = s.start()
		if err == nil || !errors.Is(err, syscall.EADDRINUSE) {
			break
		}
		if rmErr := os.RemoveAll(s.dataDir()); rmErr != nil {
			return fmt.Errorf("removing etcd data after failed start: %w", rmErr)
		}
	}
	if err != nil {
		return err
	}
	return s.newClient()
}

// pickPorts sets the URLs: the client and peer ports of WithListen (free
// ones where 0) and a free port for etcd's own client listener.
func (s *Server) pickPorts() error {
	ports, err := FreePorts(s.opts.nsPath, s.opts.addr, 3)
	if err != nil {
		return err
	}
	cp, pp := s.opts.clientPort, s.opts.peerPort
	if cp == 0 {
		cp = ports[0]
	}
	if pp == 0 {
		pp = ports[1]
	}
	s.setPorts(cp, pp, ports[2])
	return nil
}

// setPorts sets the client (door), peer and backend URLs.
func (s *Server) setPorts(cp, pp, bp int) {
	scheme := "http"
	if s.opts.tls {
		scheme = "https"
	}
	host := func(a netip.Addr, port int) string { return net.JoinHostPort(a.String(), strconv.Itoa(port)) }
	s.clientURL = url.URL{Scheme: scheme, Host: host(s.opts.addr, cp)}
	s.backendURL = url.URL{Scheme: scheme, Host: host(s.etcdAddr, bp)}
	s.peerURL = url.URL{Scheme: "http", Host: host(s.etcdAddr, pp)}
}

// newClient makes the v2 client of the server's own endpoint.
func (s *Server) newClient() error {
	c, err := client.New(client.Config{Endpoints: s.Endpoints(), Transport: s.transport})
	if err != nil {
		s.Stop()
		return fmt.Errorf("creating etcd v2 client: %w", err)
	}
	s.client = c
	return nil
}

func (s *Server) dataDir() string { return filepath.Join(s.dir, "data") }

// start runs etcd with the fixed URLs, waits until it is ready and opens
// the door; the caller holds no lock or s.mu.
func (s *Server) start() error {
	e, err := s.startEtcd()
	if err != nil {
		return err
	}
	return s.started(e)
}

// startEtcd starts etcd on the backend URL and returns it without waiting
// for it to be ready (a member of a new cluster is ready only once a
// quorum of members runs).
func (s *Server) startEtcd() (*embed.Etcd, error) {
	cfg := embed.NewConfig()
	cfg.Name = s.member.name
	cfg.Dir = s.dataDir()
	cfg.EnableV2 = !s.opts.noV2
	cfg.ListenClientUrls = []url.URL{s.backendURL}
	cfg.AdvertiseClientUrls = []url.URL{s.clientURL}
	cfg.ListenPeerUrls = []url.URL{s.peerURL}
	cfg.AdvertisePeerUrls = []url.URL{s.peerURL}
	cfg.InitialCluster = s.member.initialCluster
	if cfg.InitialCluster == "" {
		cfg.InitialCluster = cfg.Name + "=" + s.peerURL.String()
	}
	cfg.InitialClusterToken = s.member.token
	// The gateway would dial the client URL from the root namespace.
	cfg.EnableGRPCGateway = false
	cfg.TickMs = s.member.tickMs
	cfg.ElectionMs = s.member.electionMs
	cfg.UnsafeNoFsync = true // test data; a clean stop still persists it
	cfg.Logger = "zap"
	cfg.LogLevel = "error"
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	if s.tlsFiles != nil {
		cfg.ClientTLSInfo.CertFile = s.tlsFiles.ServerCert
		cfg.ClientTLSInfo.KeyFile = s.tlsFiles.ServerKey
		cfg.ClientTLSInfo.TrustedCAFile = s.tlsFiles.CAFile
		cfg.ClientTLSInfo.ClientCertAuth = true
	}

	var e *embed.Etcd
	err := InNetNS(s.etcdNS, func() error {
		var err error
		e, err = embed.StartEtcd(cfg)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("starting etcd on %s: %w", s.clientURL.String(), err)
	}
	return e, nil
}

// started waits until e is ready, opens the door in front of it and
// records both. On error e is closed.
func (s *Server) started(e *embed.Etcd) error {
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return fmt.Errorf("starting etcd on %s: %w", s.clientURL.String(), err)
	case <-time.After(readyTimeout):
		e.Close()
		return fmt.Errorf("starting etcd on %s: not ready after %v", s.clientURL.String(), readyTimeout)
	}
	d, err := openDoor(s.opts.nsPath, s.clientURL.Host, s.etcdNS, s.backendURL.Host)
	if err != nil {
		e.Close()
		return fmt.Errorf("starting etcd on %s: %w", s.clientURL.String(), err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed { // Close ran while we were starting
		d.close()
		e.Close()
		return ErrStopped
	}
	s.etcd, s.door = e, d
	return nil
}

// Endpoints returns the client URL(s) of the server, e.g.
// ["http://127.0.0.1:40123"]. They stay the same across Restart.
func (s *Server) Endpoints() []string { return []string{s.clientURL.String()} }

// TLS returns the generated PEM files, or nil without WithTLS.
func (s *Server) TLS() *TLSFiles { return s.tlsFiles }

// Transport returns the HTTP transport the Server's client uses: it dials
// inside the server's namespace (WithNetNS) and presents the client
// certificate (WithTLS).
func (s *Server) Transport() *http.Transport { return s.transport }

// DialContext dials addr from inside the server's namespace (or the caller's
// namespace without WithNetNS).
func (s *Server) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	return s.transport.DialContext(ctx, network, addr)
}

// Client returns an etcd v2 client connected to the server.
func (s *Server) Client() client.Client { return s.client }

// KeysAPI returns an etcd v2 keys API connected to the server.
func (s *Server) KeysAPI() client.KeysAPI { return client.NewKeysAPI(s.client) }

// Running reports whether the server is serving.
func (s *Server) Running() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.etcd != nil
}

// IsLeader reports whether the server runs and is its cluster's raft
// leader (a single server is its own leader once ready).
func (s *Server) IsLeader() bool {
	s.mu.Lock()
	e := s.etcd
	s.mu.Unlock()
	return e != nil && e.Server.Leader() == e.Server.ID()
}

// Stop stops the server, keeping its data and ports for Restart. As when
// the member dies, every client connection is closed at once (a pending
// watch ends with an error) and new ones are refused until Restart.
// Stopping a stopped server does nothing.
func (s *Server) Stop() {
	s.mu.Lock()
	e, d := s.etcd, s.door
	s.etcd, s.door = nil, nil
	s.mu.Unlock()
	if d != nil {
		d.close()
	}
	if e != nil {
		// A dying member hands nothing over: stop raft before Close, which
		// would first try to pass the leadership on (and wait up to the
		// request timeout for members that are stopping too).
		e.Server.HardStop()
		e.Close()
	}
	s.transport.CloseIdleConnections()
}

// Restart stops the server if it is running and starts it again on the same
// address, ports and data directory.
func (s *Server) Restart() error {
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return ErrStopped
	}
	s.Stop()
	var err error
	// The old listeners are closed synchronously, but be patient with a
	// port that is briefly still held.
	for attempt := 0; attempt < 20; attempt++ {
		if err = s.start(); err == nil || !errors.Is(err, syscall.EADDRINUSE) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("restarting etcd: %w", err)
	}
	return nil
}

// Freeze cuts the server off as a network partition does: connections stay
// open and new ones are accepted, but no byte passes until Thaw (clients
// wait for their own timeouts). Restart ends it.
func (s *Server) Freeze() { s.freeze(true) }

// Thaw ends Freeze: the bytes held pass on.
func (s *Server) Thaw() { s.freeze(false) }

func (s *Server) freeze(on bool) {
	s.mu.Lock()
	d := s.door
	s.mu.Unlock()
	if d != nil {
		d.freeze(on)
	}
}

// Wipe stops the server, deletes its data and starts it again, empty, on
// the same address and ports: an etcd whose data was lost and that was
// started afresh.
func (s *Server) Wipe() error {
	s.Stop()
	if err := os.RemoveAll(s.dataDir()); err != nil {
		return fmt.Errorf("wiping etcd data: %w", err)
	}
	return s.Restart()
}

// Backup stops the server, copies its data directory to dir (which must
// not exist) and starts it again: an offline backup.
func (s *Server) Backup(dir string) error {
	s.Stop()
	if err := os.CopyFS(dir, os.DirFS(s.dataDir())); err != nil {
		return fmt.Errorf("backing up etcd data: %w", err)
	}
	return s.Restart()
}

// RestoreBackup stops the server, replaces its data with the backup Backup
// wrote to dir and starts it again: the store goes back to the state (and
// index) it had then, as after etcd's documented disaster recovery.
func (s *Server) RestoreBackup(dir string) error {
	s.Stop()
	if err := os.RemoveAll(s.dataDir()); err != nil {
		return fmt.Errorf("restoring etcd data: %w", err)
	}
	if err := os.CopyFS(s.dataDir(), os.DirFS(dir)); err != nil {
		return fmt.Errorf("restoring etcd data: %w", err)
	}
	return s.Restart()
}

// Close stops the server and removes its data. It is idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	s.Stop()
	if err := os.RemoveAll(s.dir); err != nil {
		return fmt.Errorf("removing etcd directory: %w", err)
	}
	return nil
}
