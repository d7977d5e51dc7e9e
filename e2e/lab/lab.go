// Package lab builds a namespaced test network for end-to-end tests and the
// demo: a LAN namespace holding a bridge and an embedded etcd, and N host
// namespaces, each with a veth eth0 plugged into the LAN bridge and an empty
// docker0 bridge for the host's overlay address. Addresses exist only inside
// these namespaces; the caller's namespace gets no address, link or route.
// The lab runs the flanneld binary inside the host namespaces.
//
// Layout (defaults): LAN 10.250.0.0/24, etcd at 10.250.0.1:2379 (client)
// and :2380 (peer) inside the LAN namespace, host i (1-based) at
// 10.250.0.(10+i)/24 on its eth0, ip_forward=1 in every host namespace.
// With Options.LAN6 (e.g. fd5e::/64) the LAN is dual stack: the LAN bridge
// gets the prefix's first address and host i its (10+i)th on eth0, with
// duplicate address detection off and IPv6 forwarding on in every host.
package lab

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/client/v2"

	"github.com/flanneld-go/flanneld/internal/etcdtest"
)

const (
	// DefaultNamePrefix starts the namespace names of labs built by tests.
	DefaultNamePrefix = "flab"
	// DefaultEtcdPrefix is the daemon's default etcd prefix.
	DefaultEtcdPrefix = "/coreos.com/network"
	// EtcdClientPort and EtcdPeerPort are the embedded etcd's ports on the LAN.
	EtcdClientPort = 2379
	EtcdPeerPort   = 2380
	// BridgeName is the per-host bridge that takes the overlay address.
	BridgeName = "docker0"
	// ExternalIface is the host's LAN interface (the daemon's --iface).
	ExternalIface = "eth0"
	// lanBridge is the bridge in the LAN namespace.
	lanBridge = "br0"
	// maxHosts keeps host addresses (.11 upwards) inside a /24.
	maxHosts = 200
)

// DefaultLAN is the LAN prefix used when Options.LAN is not set.
var DefaultLAN = netip.MustParsePrefix("10.250.0.0/24")

// ErrClosed is returned by operations on a closed lab.
var ErrClosed = errors.New("lab: closed")

// Options configure a lab. The zero value builds three hosts.
type Options struct {
	// Hosts is the number of host namespaces (default 3, at most 200).
	Hosts int
	// DaemonPath is the flanneld binary StartDaemon runs. It may be empty
	// for a lab that starts no daemon.
	DaemonPath string
	// EtcdPrefix is passed as --etcd-prefix and used by SetConfig
	// (default /coreos.com/network).
	EtcdPrefix string
	// LAN is the underlay prefix, IPv4, /24 or shorter (default
	// 10.250.0.0/24). etcd takes the first address, host i the (10+i)th.
	LAN netip.Prefix
	// LAN6, if set, is an IPv6 underlay prefix (/120 or shorter, e.g.
	// fd5e::/64) on the same LAN: the LAN bridge takes its first address,
	// host i its (10+i)th (Host.Addr6), so that daemons find a global IPv6
	// address on eth0. Unset: the LAN is IPv4 only.
	LAN6 netip.Prefix
	// NamePrefix starts every namespace name (default "flab"). Names are
	// <NamePrefix>-<pid>-<n>-lan and <NamePrefix>-<pid>-<n>-host<i>.
	NamePrefix string
	// Dir holds per-host subnet files, daemon logs and etcd's data.
	// Default: a new directory <tmp>/<lab name>-<random> that Close (or
	// Teardown, after a crash) removes.
	Dir string
	// Logf receives progress and diagnostics; nil discards them.
	Logf func(format string, args ...any)
	// EtcdBinary, when set, is an etcd server binary (see internal/etcdbin)
	// the lab runs in the LAN namespace instead of the embedded etcd; Etcd
	// and KeysAPI are then nil, SetConfig writes with the v3 API.
	EtcdBinary string
}

// Lab is a running namespaced network. Close it when done.
type Lab struct {
	opts     Options
	name     string
	lanNS    string
	etcdAddr netip.Addr
	dir      string
	ownDir   bool
	hosts    []*Host
	etcd     *etcdtest.Server
	extEtcd  *externalEtcd

	mu       sync.Mutex
	made     []string // namespaces created, in order
	closed   bool
	closeErr error
}

var labCounter atomic.Int64

// TB is the part of testing.TB that Start and BuildDaemon use: a *testing.T
// or *testing.B. The package names the methods instead of importing testing,
// so that cmd/flannel-lab, a shipped program built on New, does not link the
// testing package.
type TB interface {
	Helper()
	Skip(args ...any)
	TempDir() string
	Logf(format string, args ...any)
	Errorf(format string, args ...any)
	Fatalf(format string, args ...any)
	Failed() bool
	Cleanup(func())
}

// Start builds a lab for the test and closes it when the test ends, logging
// the daemons' logs if the test failed. It skips the test when not root.
func Start(t TB, opts Options) *Lab {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("the namespaced lab needs root (it creates network namespaces)")
	}
	if opts.Dir == "" {
		opts.Dir = t.TempDir()
	}
	if opts.Logf == nil {
		opts.Logf = t.Logf
	}
	l, err := New(opts)
	if err != nil {
		t.Fatalf("building lab: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			l.dumpLogs(t.Logf)
		}
		if err := l.Close(); err != nil {
			t.Errorf("closing lab: %v", err)
		}
	})
	return l
}

// New builds a lab. On error everything already made is removed again.
func New(opts Options) (*Lab, error) {
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("the namespaced lab needs root: run as root (it creates network namespaces)")
	}
	if opts.Hosts == 0 {
		opts.Hosts = 3
	}
	if opts.Hosts < 1 || opts.Hosts > maxHosts {
		return nil, fmt.Errorf("lab: %d hosts requested; use 1 to %d", opts.Hosts, maxHosts)
	}
	if opts.EtcdPrefix == "" {
		opts.EtcdPrefix = DefaultEtcdPrefix
	}
	if !opts.LAN.IsValid() {
		opts.LAN = DefaultLAN
	}
	if !opts.LAN.Addr().Is4() || opts.LAN.Bits() > 24 {
		return nil, fmt.Errorf("lab: LAN %s must be an IPv4 prefix of /24 or shorter", opts.LAN)
	}
	opts.LAN = opts.LAN.Masked()
	if opts.LAN6.IsValid() && (!opts.LAN6.Addr().Is6() || opts.LAN6.Addr().Is4In6() || opts.LAN6.Bits() > 120) {
		return nil, fmt.Errorf("lab: LAN6 %s must be an IPv6 prefix of /120 or shorter, such as fd5e::/64", opts.LAN6)
	}
	opts.LAN6 = opts.LAN6.Masked()
	if opts.NamePrefix == "" {
		opts.NamePrefix = DefaultNamePrefix
	}
	if strings.ContainsAny(opts.NamePrefix, "/ \t\n") {
		return nil, fmt.Errorf("lab: name prefix %q must not contain '/' or spaces", opts.NamePrefix)
	}
	if opts.DaemonPath != "" {
		p, err := filepath.Abs(opts.DaemonPath)
		if err != nil {
			return nil, fmt.Errorf("resolving daemon path: %w", err)
		}
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("daemon binary %s: %w (build it first: go build -o %s .)", p, err, p)
		}
		opts.DaemonPath = p
	}
	if opts.Logf == nil {
		opts.Logf = func(string, ...any) {}
	}
	if err := ensureTools(opts.Logf); err != nil {
		return nil, err
	}

	name := fmt.Sprintf("%s-%d-%d", opts.NamePrefix, os.Getpid(), labCounter.Add(1))
	l := &Lab{
		opts:     opts,
		name:     name,
		lanNS:    name + "-lan",
		etcdAddr: opts.LAN.Addr().Next(),
		dir:      opts.Dir,
	}
	if l.dir == "" {
		d, err := os.MkdirTemp("", name+"-")
		if err != nil {
			return nil, fmt.Errorf("creating lab directory: %w", err)
		}
		l.dir, l.ownDir = d, true
	}
	if err := l.build(); err != nil {
		if cerr := l.Close(); cerr != nil {
			err = errors.Join(err, cerr)
		}
		return nil, err
	}
	return l, nil
}

// build creates the namespaces, links, addresses and etcd.
func (l *Lab) build() error {
	begin := time.Now()
	if err := l.addNS(l.lanNS); err != nil {
		return err
	}
	lanPfx := l.opts.LAN.Bits()
	if err := l.noDAD(l.lanNS); err != nil {
		return err
	}
	lanCmds := [][]string{
		{"-n", l.lanNS, "link", "set", "lo", "up"},
		{"-n", l.lanNS, "link", "add", lanBridge, "type", "bridge"},
		{"-n", l.lanNS, "addr", "add", prefixString(l.etcdAddr, lanPfx), "dev", lanBridge},
	}
	if l.opts.LAN6.IsValid() {
		lanCmds = append(lanCmds, []string{"-n", l.lanNS, "addr", "add", prefixString(l.opts.LAN6.Addr().Next(), l.opts.LAN6.Bits()), "dev", lanBridge, "nodad"})
	}
	lanCmds = append(lanCmds, []string{"-n", l.lanNS, "link", "set", lanBridge, "up"})
	for _, args := range lanCmds {
		if err := ipCmd(args...); err != nil {
			return err
		}
	}
	addr6 := l.opts.LAN6.Addr().Next()
	for range 9 {
		addr6 = addr6.Next()
	}

	addr := l.etcdAddr
	for i := 0; i < 9; i++ {
		addr = addr.Next()
	}
	for i := 1; i <= l.opts.Hosts; i++ {
		addr = addr.Next()
		if !l.opts.LAN.Contains(addr) || addr == broadcast(l.opts.LAN) {
			return fmt.Errorf("lab: LAN %s has no room for host %d", l.opts.LAN, i)
		}
		h := &Host{
			Name: "host" + strconv.Itoa(i),
			NS:   fmt.Sprintf("%s-host%d", l.name, i),
			Addr: addr,
			lab:  l,
		}
		if l.opts.LAN6.IsValid() {
			addr6 = addr6.Next()
			if !l.opts.LAN6.Contains(addr6) {
				return fmt.Errorf("lab: LAN6 %s has no room for host %d", l.opts.LAN6, i)
			}
			h.Addr6 = addr6
		}
		h.dir = filepath.Join(l.dir, h.Name)
		h.SubnetFile = filepath.Join(h.dir, "subnet.env")
		h.KeyFile = filepath.Join(h.dir, "wgkey")
		if err := os.MkdirAll(h.dir, 0o755); err != nil {
			return fmt.Errorf("creating host directory: %w", err)
		}
		if err := l.addNS(h.NS); err != nil {
			return err
		}
		if err := l.noDAD(h.NS); err != nil {
			return err
		}
		lanEnd := "h" + strconv.Itoa(i)
		cmds := [][]string{
			{"-n", h.NS, "link", "set", "lo", "up"},
			// Both ends are created directly in their namespaces.
			{"link", "add", "name", ExternalIface, "netns", h.NS, "type", "veth", "peer", "name", lanEnd, "netns", l.lanNS},
			{"-n", l.lanNS, "link", "set", lanEnd, "master", lanBridge, "up"},
			{"-n", h.NS, "addr", "add", prefixString(addr, lanPfx), "dev", ExternalIface},
		}
		if h.Addr6.IsValid() {
			cmds = append(cmds, []string{"-n", h.NS, "addr", "add", prefixString(h.Addr6, l.opts.LAN6.Bits()), "dev", ExternalIface, "nodad"})
		}
		cmds = append(cmds,
			[]string{"-n", h.NS, "link", "set", ExternalIface, "up"},
			[]string{"-n", h.NS, "link", "add", BridgeName, "type", "bridge"},
			[]string{"-n", h.NS, "link", "set", BridgeName, "up"},
		)
		for _, args := range cmds {
			if err := ipCmd(args...); err != nil {
				return err
			}
		}
		forward := "echo 1 > /proc/sys/net/ipv4/ip_forward"
		if h.Addr6.IsValid() {
			forward += " && echo 1 > /proc/sys/net/ipv6/conf/all/forwarding"
		}
		if _, err := h.Exec(context.Background(), "sh", "-c", forward); err != nil {
			return fmt.Errorf("enabling forwarding on %s: %w", h.Name, err)
		}
		l.hosts = append(l.hosts, h)
	}

	if l.opts.EtcdBinary != "" {
		e, err := l.startExternalEtcd(l.opts.EtcdBinary)
		if err != nil {
			return err
		}
		l.mu.Lock()
		l.extEtcd = e
		l.mu.Unlock()
		l.opts.Logf("lab %s: %d hosts on %s, etcd %s (%s), built in %v",
			l.name, len(l.hosts), l.opts.LAN, l.EtcdEndpoint(), l.opts.EtcdBinary, time.Since(begin).Round(time.Millisecond))
		return nil
	}
	srv, err := etcdtest.New(
		etcdtest.WithNetNS(nsPath(l.lanNS)),
		etcdtest.WithListen(l.etcdAddr, EtcdClientPort, EtcdPeerPort),
		etcdtest.WithParentDir(l.dir),
	)
	if err != nil {
		return fmt.Errorf("starting etcd in %s: %w", l.lanNS, err)
	}
	l.mu.Lock()
	l.etcd = srv
	l.mu.Unlock()
	l.opts.Logf("lab %s: %d hosts on %s, etcd %s, built in %v",
		l.name, len(l.hosts), l.opts.LAN, l.EtcdEndpoint(), time.Since(begin).Round(time.Millisecond))
	return nil
}

// noDAD turns IPv6 duplicate address detection off in ns, for the links
// made after it: their link-local addresses (neighbour discovery speaks from
// them) are usable at once rather than a second or two later. Only with
// LAN6.
func (l *Lab) noDAD(ns string) error {
	if !l.opts.LAN6.IsValid() {
		return nil
	}
	out, err := exec.Command("ip", "netns", "exec", ns, "sh", "-c",
		"echo 0 > /proc/sys/net/ipv6/conf/all/accept_dad && echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad").CombinedOutput()
	if err != nil {
		return fmt.Errorf("turning IPv6 DAD off in %s: %w: %s", ns, err, strings.TrimSpace(string(out)))
	}
	return nil
}

func (l *Lab) addNS(ns string) error {
	if err := ipCmd("netns", "add", ns); err != nil {
		return err
	}
	l.mu.Lock()
	l.made = append(l.made, ns)
	l.mu.Unlock()
	return nil
}

// Name is the lab's unique name, the common start of its namespace names.
func (l *Lab) Name() string { return l.name }

// LANNamespace is the name of the namespace holding the LAN bridge and etcd.
func (l *Lab) LANNamespace() string { return l.lanNS }

// Namespaces lists every namespace of the lab: the LAN, then the hosts.
func (l *Lab) Namespaces() []string {
	ns := []string{l.lanNS}
	for _, h := range l.hosts {
		ns = append(ns, h.NS)
	}
	return ns
}

// Hosts returns the hosts in order (host1 first).
func (l *Lab) Hosts() []*Host { return l.hosts }

// Host returns host i, 1-based like the names (Host(1) is "host1").
func (l *Lab) Host(i int) *Host { return l.hosts[i-1] }

// Dir is the directory holding the per-host subnet files and logs.
func (l *Lab) Dir() string { return l.dir }

// EtcdPrefix is the etcd prefix passed to the daemons.
func (l *Lab) EtcdPrefix() string { return l.opts.EtcdPrefix }

// LAN6 is the IPv6 underlay prefix (invalid for an IPv4-only lab).
func (l *Lab) LAN6() netip.Prefix { return l.opts.LAN6 }

// EtcdAddr is etcd's address on the LAN.
func (l *Lab) EtcdAddr() netip.Addr { return l.etcdAddr }

// EtcdEndpoint is the URL the daemons use, e.g. http://10.250.0.1:2379.
func (l *Lab) EtcdEndpoint() string {
	return fmt.Sprintf("http://%s:%d", l.etcdAddr, EtcdClientPort)
}

// Etcd is the embedded etcd server (e.g. to Stop and Restart it). Its
// client helpers dial from inside the LAN namespace.
func (l *Lab) Etcd() *etcdtest.Server { return l.etcd }

// KeysAPI is a v2 keys API connected to the lab's etcd from inside the LAN
// namespace.
func (l *Lab) KeysAPI() client.KeysAPI {
	if l.etcd == nil {
		return nil
	}
	return l.etcd.KeysAPI()
}

// SetConfig writes the network config JSON to <prefix>/config.
func (l *Lab) SetConfig(ctx context.Context, configJSON string) error {
	key := l.opts.EtcdPrefix + "/config"
	if l.opts.EtcdBinary != "" {
		return l.setConfigV3(ctx, key, configJSON)
	}
	if _, err := l.KeysAPI().Set(ctx, key, configJSON, nil); err != nil {
		return fmt.Errorf("writing %s: %w", key, err)
	}
	return nil
}

// Close stops every daemon (SIGTERM, then SIGKILL), stops etcd, deletes
// every namespace the lab made (with the links in them) and removes the
// lab's own directory. It is idempotent and tolerates a lab that was only
// partly built or already torn down by Teardown.
func (l *Lab) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return l.closeErr
	}
	l.closed = true
	made := l.made
	srv := l.etcd
	ext := l.extEtcd
	l.mu.Unlock()

	var errs []error
	var (
		wg    sync.WaitGroup
		errMu sync.Mutex
	)
	for _, h := range l.hosts {
		for _, d := range h.allDaemons() {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if _, err := d.Stop(sigTerm); err != nil {
					errMu.Lock()
					errs = append(errs, err)
					errMu.Unlock()
				}
			}()
		}
	}
	wg.Wait()
	if srv != nil {
		if err := srv.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	ext.stop()
	for i := len(made) - 1; i >= 0; i-- {
		if err := deleteNS(made[i]); err != nil {
			errs = append(errs, err)
		}
	}
	if l.ownDir {
		if err := os.RemoveAll(l.dir); err != nil {
			errs = append(errs, fmt.Errorf("removing lab directory: %w", err))
		}
	}
	err := errors.Join(errs...)
	l.mu.Lock()
	l.closeErr = err
	l.mu.Unlock()
	return err
}

func (l *Lab) isClosed() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.closed
}

// dumpLogs writes the tail of every daemon log through logf.
func (l *Lab) dumpLogs(logf func(string, ...any)) {
	for _, h := range l.hosts {
		for _, d := range h.allDaemons() {
			logf("--- %s flanneld log %s (last 60 lines) ---\n%s", h.Name, d.LogPath, tail(d.Log(), 60))
		}
	}
}

// nsPath is where ip netns binds a named namespace.
func nsPath(ns string) string { return filepath.Join("/run/netns", ns) }

// deleteNS removes a named namespace; a missing one is not an error.
func deleteNS(ns string) error {
	if _, err := os.Stat(nsPath(ns)); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return ipCmd("netns", "del", ns)
}

// ipCmd runs the ip command with args.
func ipCmd(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("running ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func prefixString(a netip.Addr, bits int) string {
	return netip.PrefixFrom(a, bits).String()
}

// broadcast is the last address of p (IPv4).
func broadcast(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	v |= host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}
