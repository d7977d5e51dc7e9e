// Command flanneld gives this host a subnet of the overlay network kept in
// etcd and carries traffic to the other hosts' subnets. It is a drop-in for
// flannel's etcd-v2-era daemon: same flags, etcd layout and wire formats.
package main

import (
	"context"
	"errors"
	goflag "flag"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/spf13/pflag"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/agent"
	"github.com/flanneld-go/flanneld/backend"
	_ "github.com/flanneld-go/flanneld/backend/alloc"
	_ "github.com/flanneld-go/flanneld/backend/extension"
	_ "github.com/flanneld-go/flanneld/backend/hostgw"
	_ "github.com/flanneld-go/flanneld/backend/udp"
	_ "github.com/flanneld-go/flanneld/backend/vxlan"
	_ "github.com/flanneld-go/flanneld/backend/wireguard"
	"github.com/flanneld-go/flanneld/internal/metrics"
	"github.com/flanneld-go/flanneld/network"
	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/pkg/nlbatch"
	"github.com/flanneld-go/flanneld/probe"
	"github.com/flanneld-go/flanneld/subnet"
	"github.com/flanneld-go/flanneld/subnet/etcdapi"
)

// version is set at build time: -ldflags "-X main.version=...".
var version = "dev"

type flags struct {
	etcdEndpoints  string
	etcdPrefix     string
	etcdKeyfile    string
	etcdCertfile   string
	etcdCAFile     string
	etcdUsername   string
	etcdPassword   string
	etcdAPI        string
	iface          []string
	ifaceRegex     []string
	subnetFile     string
	publicIP       string
	publicIPv6     string
	renewMargin    int
	ipMasq         bool
	healthzIP      string
	healthzPort    int
	iptablesResync int
	routeResync    int
	nexthops       bool
	peerProbeRate  int
	check          bool
	version        bool
	kube           kubeFlags

	// flannel v0.28's interface, rule and route flags.
	ifaceCanReach            string
	ipMasqFullyRandomDisable bool
	iptablesForwardRules     bool
	ipBlackholeRoute         bool
}

func newFlagSet(f *flags) *pflag.FlagSet {
	fs := pflag.NewFlagSet("flanneld", pflag.ContinueOnError)
	fs.SortFlags = false
	fs.StringVar(&f.etcdEndpoints, "etcd-endpoints", "http://127.0.0.1:4001,http://127.0.0.1:2379", "a comma-delimited list of etcd endpoints")
	fs.StringVar(&f.etcdPrefix, "etcd-prefix", "/coreos.com/network", "etcd prefix")
	fs.StringVar(&f.etcdKeyfile, "etcd-keyfile", "", "SSL key file used to secure etcd communication")
	fs.StringVar(&f.etcdCertfile, "etcd-certfile", "", "SSL certification file used to secure etcd communication")
	fs.StringVar(&f.etcdCAFile, "etcd-cafile", "", "SSL Certificate Authority file used to secure etcd communication")
	fs.StringVar(&f.etcdUsername, "etcd-username", "", "username for BasicAuth to etcd")
	fs.StringVar(&f.etcdPassword, "etcd-password", "", "password for BasicAuth to etcd")
	fs.StringVar(&f.etcdAPI, "etcd-api", "auto", "etcd API holding the network: v2, v3, or auto (the config in v3 first, then in v2)")
	fs.StringArrayVar(&f.iface, "iface", nil, "interface to use (IP or name) for inter-host communication; may be repeated, tried in order")
	fs.StringArrayVar(&f.ifaceRegex, "iface-regex", nil, "regex matched against IPv4 addresses, then IPv6 addresses, then names to pick the interface; may be repeated")
	fs.StringVar(&f.ifaceCanReach, "iface-can-reach", "", "when --iface and --iface-regex find nothing (or are not given), use the interface and source address of the route to this IP address")
	fs.StringVar(&f.subnetFile, "subnet-file", "/run/flannel/subnet.env", "filename where env variables (subnet, MTU, ...) will be written to")
	fs.StringVar(&f.publicIP, "public-ip", "", "IP accessible by other nodes for inter-host communication (default: the interface's address)")
	fs.StringVar(&f.publicIPv6, "public-ipv6", "", "IPv6 address accessible by other nodes for inter-host communication, with EnableIPv6 (default: the interface's IPv6 address)")
	fs.IntVar(&f.renewMargin, "subnet-lease-renew-margin", 60, "subnet lease renewal margin, in minutes (1..1439)")
	fs.BoolVar(&f.ipMasq, "ip-masq", false, "setup IP masquerade rule for traffic destined outside of overlay network")
	fs.BoolVar(&f.ipMasqFullyRandomDisable, "ip-masq-fully-random-disable", false, "masquerade without --random-fully (nftables: fully-random), which is used by default where iptables has it")
	fs.BoolVar(&f.iptablesForwardRules, "iptables-forward-rules", true, "accept forwarded traffic of the network (FLANNEL-FWD chain; nftables: forward chain); false leaves the FORWARD chain to others")
	fs.BoolVar(&f.ipBlackholeRoute, "ip-blackhole-route", false, "keep a blackhole route for the own subnet, so traffic to its unused addresses is dropped instead of following the default route")
	fs.StringVar(&f.healthzIP, "healthz-ip", "0.0.0.0", "the IP address for healthz server to listen")
	fs.IntVar(&f.healthzPort, "healthz-port", 0, "the port for healthz server to listen (0 to disable)")
	fs.IntVar(&f.iptablesResync, "iptables-resync", 5, "resync period for iptables rules, in seconds")
	fs.IntVar(&f.routeResync, "route-resync", 10, "how often routes and other kernel entries are re-checked, in seconds")
	fs.BoolVar(&f.nexthops, "nexthop-objects", true, "install routes through kernel nexthop objects (ip route shows nhid): linear instead of quadratic in the number of hosts; plain routes when the kernel lacks them (before Linux 5.3) or with --nexthop-objects=false")
	fs.IntVar(&f.peerProbeRate, "peer-probe-rate", probe.DefaultRate, "most peer probes (ICMP echo through the overlay) sent per second; 0 turns probing off")
	fs.BoolVar(&f.check, "check", false, "check this host and probe the peers the store knows, print a report and exit 0 (all pass) or 1; takes no lease and changes nothing")
	fs.BoolVar(&f.version, "version", false, "print version and exit")
	addKubeFlags(fs, &f.kube)
	gofs := goflag.NewFlagSet("klog", goflag.ContinueOnError)
	klog.InitFlags(gofs)
	fs.AddGoFlagSet(gofs)
	return fs
}

// parseFlags parses args, then fills every flag not given on the command
// line from FLANNELD_<NAME> (upper case, '-' as '_'). Repeatable flags take a
// comma-separated list from the environment (--iface-regex takes one regex).
func parseFlags(args []string, getenv func(string) string) (*flags, error) {
	f := &flags{}
	fs := newFlagSet(f)
	if err := fs.Parse(args); err != nil {
		return nil, flagError(err)
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q: flanneld takes only flags", fs.Arg(0))
	}
	var err error
	fs.VisitAll(func(fl *pflag.Flag) {
		if err != nil || fl.Changed {
			return
		}
		name := "FLANNELD_" + strings.ToUpper(strings.ReplaceAll(fl.Name, "-", "_"))
		v := getenv(name)
		if v == "" {
			return
		}
		vals := []string{v}
		if fl.Name == "iface" {
			vals = strings.Split(v, ",")
		}
		for _, v := range vals {
			if e := fs.Set(fl.Name, strings.TrimSpace(v)); e != nil {
				err = fmt.Errorf("invalid value of %s: %v", name, flagError(e))
				return
			}
		}
	})
	if err != nil {
		return nil, err
	}
	if f.renewMargin < 1 || f.renewMargin > 1439 {
		return nil, fmt.Errorf("--subnet-lease-renew-margin %d is out of range: use 1..1439 minutes", f.renewMargin)
	}
	if f.iptablesResync < 1 {
		return nil, fmt.Errorf("--iptables-resync %d must be at least 1 second", f.iptablesResync)
	}
	if f.routeResync < 1 {
		return nil, fmt.Errorf("--route-resync %d must be at least 1 second", f.routeResync)
	}
	if f.peerProbeRate < 0 || f.peerProbeRate > 10000 {
		return nil, fmt.Errorf("--peer-probe-rate %d is out of range: use 0..10000 probes per second (0 turns probing off)", f.peerProbeRate)
	}
	if f.healthzPort < 0 || f.healthzPort > 65535 {
		return nil, fmt.Errorf("--healthz-port %d is out of range: use 0..65535 (0 turns it off)", f.healthzPort)
	}
	if f.healthzPort != 0 {
		if _, err := netip.ParseAddr(f.healthzIP); err != nil {
			return nil, fmt.Errorf("--healthz-ip %q is not an IP address", f.healthzIP)
		}
	}
	if f.publicIP != "" {
		if _, err := ip.ParseAddr(f.publicIP); err != nil {
			return nil, fmt.Errorf("--public-ip %q is not an IPv4 address", f.publicIP)
		}
	}
	if f.ifaceCanReach != "" {
		if _, err := netip.ParseAddr(f.ifaceCanReach); err != nil {
			return nil, fmt.Errorf("--iface-can-reach %q is not an IP address", f.ifaceCanReach)
		}
	}
	if f.publicIPv6 != "" {
		if _, err := ip.ParseAddr6(f.publicIPv6); err != nil {
			return nil, fmt.Errorf("--public-ipv6 %q is not an IPv6 address", f.publicIPv6)
		}
	}
	if (f.etcdCertfile == "") != (f.etcdKeyfile == "") {
		return nil, fmt.Errorf("--etcd-certfile and --etcd-keyfile go together: give both or neither")
	}
	if _, err := etcdapi.ParseAPI(f.etcdAPI); err != nil {
		return nil, err
	}
	if strings.Trim(f.etcdEndpoints, ", ") == "" {
		return nil, fmt.Errorf("--etcd-endpoints is empty: give a comma-separated list such as http://127.0.0.1:2379")
	}
	if !strings.HasPrefix(f.etcdPrefix, "/") {
		return nil, fmt.Errorf("--etcd-prefix %q is not an absolute key directory: give one such as /coreos.com/network", f.etcdPrefix)
	}
	if strings.TrimSpace(f.subnetFile) == "" {
		return nil, fmt.Errorf("--subnet-file is empty: give a path such as /run/flannel/subnet.env")
	}
	for _, name := range f.iface {
		if name == "" {
			return nil, fmt.Errorf("--iface is empty: give an interface name or IPv4 address, such as eth0 or 10.0.0.5")
		}
	}
	if err := f.kube.validate(); err != nil {
		return nil, err
	}
	for _, expr := range f.ifaceRegex {
		if _, err := regexp.Compile(expr); err != nil {
			return nil, fmt.Errorf("--iface-regex %q is not a valid regular expression: %v", expr, err)
		}
	}
	return f, nil
}

// flagError adds the remedy pflag leaves out: where to find the flags for
// an unknown one, and the expected form of a number or boolean (klog's Go
// flags say only "parse error" or strconv's words).
func flagError(err error) error {
	var unknown *pflag.NotExistError
	var invalid *pflag.InvalidValueError
	switch {
	case errors.As(err, &unknown):
		return fmt.Errorf("%w; run flanneld --help for the flags", err)
	case errors.As(err, &invalid):
		var want string
		switch invalid.GetFlag().Value.Type() {
		case "bool":
			want = "must be true or false"
		case "int", "uint64", "Level":
			want = "must be a whole number"
		default:
			return err
		}
		return fmt.Errorf("invalid argument %q for --%s: %s", invalid.GetValue(), invalid.GetFlag().Name, want)
	}
	return err
}

func main() {
	f, err := parseFlags(os.Args[1:], os.Getenv)
	if err == pflag.ErrHelp {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "flanneld:", err)
		os.Exit(2)
	}
	if f.version {
		fmt.Println(version)
		return
	}
	if f.check {
		ok, err := runCheck(f, os.Stdout)
		klog.Flush()
		if err != nil {
			fmt.Fprintln(os.Stderr, "flanneld --check:", err)
		}
		if !ok || err != nil {
			os.Exit(1)
		}
		return
	}
	if err := run(f); err != nil {
		klog.Flush()
		fmt.Fprintln(os.Stderr, "flanneld:", err)
		os.Exit(1)
	}
	klog.Flush()
}

func run(f *flags) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	log := klog.Background()
	log.Info("Starting flanneld", "version", version, "gogc", setGCPercent(os.LookupEnv))

	// The etcd round trip for the network config overlaps the interface
	// lookup; an error here is reported after the interface's, as before.
	var mgr, em subnet.Manager
	var mgrErr error
	if f.kube.subnetMgr {
		em, mgrErr = newKubeManager(ctx, &f.kube, log)
	} else {
		em, mgrErr = newManager(f, log)
	}
	if mgrErr == nil {
		mgr = prefetchConfig(ctx, em)
	}

	// One netlink socket for the daemon's life; a zero Handle would open
	// one per request.
	nl, err := nlbatch.NewHandle()
	if err != nil {
		return fmt.Errorf("opening netlink: %w", err)
	}
	defer nl.Close()

	nexthops := useNexthops(f.nexthops, nl.CheckNexthops, log)

	ext, err := chooseInterface(nl.Handle, f)
	if err != nil {
		return err
	}
	public, public6 := ext.Addr, ext.Addr6
	if f.publicIP != "" {
		public, _ = ip.ParseAddr(f.publicIP)
	}
	if f.publicIPv6 != "" {
		public6, _ = ip.ParseAddr6(f.publicIPv6)
	}
	log.Info("Using interface", "name", ext.Iface.Name, "addr", ext.Addr, "publicIP", public, "addr6", ext.Addr6, "publicIPv6", public6, "mtu", ext.Iface.MTU)

	if mgrErr != nil {
		return mgrErr
	}

	var ready atomic.Bool
	var notReady atomic.Pointer[string] // why not ready, once known
	health := newOverlayHealth(f, ext.Iface.Name, ext.Iface.MTU, log)
	if f.healthzPort != 0 {
		if err := serveHealthz(ctx, net.JoinHostPort(f.healthzIP, strconv.Itoa(f.healthzPort)), &ready, &notReady, health.routes); err != nil {
			return err
		}
	}
	health.start(ctx)

	ownNS := netns.None()
	return agent.Run(ctx, agent.Options{
		Manager:     mgr,
		Ext:         backend.ExternalInterface{Iface: ext.Iface, IfaceAddr: ext.Addr, PublicIP: public, IfaceAddrV6: ext.Addr6, PublicIPv6: public6, NoIPv6: ext.NoAddr6},
		Netlink:     nl,
		SubnetFile:  f.subnetFile,
		IPMasq:      f.ipMasq,
		RenewMargin: time.Duration(f.renewMargin) * time.Minute,
		RouteResync: time.Duration(f.routeResync) * time.Second,
		Nexthops:    nexthops,
		Rules: func(set agent.RuleSet) (agent.Rules, error) {
			k, err := network.New(network.Options{Network: set.Network, Lease: set.Lease, IPv6Network: set.IPv6Network, IPv6Lease: set.IPv6Lease,
				IPMasq: set.IPMasq, NFTables: set.NFTables, CleanupInRun: true,
				MasqRandomFully: !f.ipMasqFullyRandomDisable, NoForwardRules: !f.iptablesForwardRules,
				ResyncInterval: time.Duration(f.iptablesResync) * time.Second, Logger: log.WithName("rules")})
			if err != nil || !f.ipBlackholeRoute {
				return k, err
			}
			return withBlackhole(k, set, time.Duration(f.iptablesResync)*time.Second, log.WithName("blackhole")), nil
		},
		OnNotReady: func(reason string) { notReady.Store(&reason) },
		OnApply:    health.onApply,
		OnReady: func() {
			ready.Store(true)
			if _, err := daemon.SdNotify(false, daemon.SdNotifyReady); err != nil {
				log.Error(err, "Notifying systemd failed")
			}
		},
		Logger: &log,
		// Kernel events of the process's namespace, where nl programs.
		KernelEvents: &ownNS,
	})
}

// chooseInterface picks the external interface: --iface, then
// --iface-regex, then --iface-can-reach; with none of them, the default
// route's interface (flannel v0.28's order).
func chooseInterface(h *netlink.Handle, f *flags) (ip.Iface, error) {
	if f.ifaceCanReach == "" {
		return ip.ChooseInterface(h, f.iface, f.ifaceRegex)
	}
	dst, _ := netip.ParseAddr(f.ifaceCanReach)
	if len(f.iface) == 0 && len(f.ifaceRegex) == 0 {
		return ip.InterfaceToReach(h, dst)
	}
	ext, err := ip.ChooseInterface(h, f.iface, f.ifaceRegex)
	if err == nil {
		return ext, nil
	}
	ext, rerr := ip.InterfaceToReach(h, dst)
	if rerr != nil {
		return ip.Iface{}, fmt.Errorf("%w; %s", err, strings.TrimPrefix(rerr.Error(), ip.ErrNoInterface.Error()+": "))
	}
	return ext, nil
}

// blackholeRules keeps the forward and masquerade rules and the blackhole
// routes of the own subnets (--ip-blackhole-route), checked at the same
// interval.
type blackholeRules struct {
	*network.Keeper
	bh *network.Blackhole
}

// withBlackhole adds the blackhole routes of set's subnets to k. Their
// checks use a socket per request (a zero netlink handle): they run beside
// the backend's owner loop, every --iptables-resync.
func withBlackhole(k *network.Keeper, set agent.RuleSet, every time.Duration, log klog.Logger) agent.Rules {
	return &blackholeRules{Keeper: k, bh: network.NewBlackhole(nil, []netip.Prefix{set.Lease, set.IPv6Lease}, every, log)}
}

func (r *blackholeRules) Ensure(ctx context.Context) error {
	return errors.Join(r.Keeper.Ensure(ctx), r.bh.Ensure(ctx))
}

// Run keeps both in place until ctx ends.
func (r *blackholeRules) Run(ctx context.Context) error {
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.bh.Run(ctx)
	}()
	err := r.Keeper.Run(ctx)
	<-done
	return err
}

// useNexthops reports whether routes go through nexthop objects: when
// wanted and check (the kernel probe) succeeds. A kernel without them gets
// plain routes and one log line.
func useNexthops(want bool, check func() error, log klog.Logger) bool {
	if !want {
		return false
	}
	if err := check(); err != nil {
		log.Info("This kernel has no nexthop objects (Linux 5.3 or later); installing plain routes", "err", err)
		return false
	}
	return true
}

// newManager creates the etcd lease manager of the flags.
func newManager(f *flags, log klog.Logger) (*etcdapi.Manager, error) {
	var endpoints []string
	for _, e := range strings.Split(f.etcdEndpoints, ",") {
		if e = strings.TrimSpace(e); e != "" {
			endpoints = append(endpoints, e)
		}
	}
	return etcdapi.New(etcdapi.Options{
		API:       f.etcdAPI,
		Endpoints: endpoints,
		CertFile:  f.etcdCertfile,
		KeyFile:   f.etcdKeyfile,
		CAFile:    f.etcdCAFile,
		Username:  f.etcdUsername,
		Password:  f.etcdPassword,
		Prefix:    f.etcdPrefix,
		Logger:    log.WithName("etcd"),
	})
}

// earlyConfig is a lease manager whose network config is read ahead: the
// first GetNetworkConfig returns the result of the read prefetchConfig
// started; later calls go to the manager.
type earlyConfig struct {
	subnet.Manager
	done  chan struct{}
	cfg   *subnet.Config
	err   error
	taken atomic.Bool
}

// prefetchConfig starts m.GetNetworkConfig(ctx) at once.
func prefetchConfig(ctx context.Context, m subnet.Manager) *earlyConfig {
	e := &earlyConfig{Manager: m, done: make(chan struct{})}
	go func() {
		defer close(e.done)
		e.cfg, e.err = m.GetNetworkConfig(ctx)
	}()
	return e
}

func (e *earlyConfig) GetNetworkConfig(ctx context.Context) (*subnet.Config, error) {
	if e.taken.Swap(true) {
		return e.Manager.GetNetworkConfig(ctx)
	}
	select {
	case <-e.done:
		return e.cfg, e.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// serveHealthz serves /healthz (200 while running), /readyz (503 until
// subnet.env is written and the rules are installed, naming what failed
// last while the rules are retried), /metrics
// (Prometheus text format) and what routes adds until ctx ends.
func serveHealthz(ctx context.Context, addr string, ready *atomic.Bool, notReady *atomic.Pointer[string], routes func(*http.ServeMux)) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listening for healthz on %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.Handle("/metrics", metrics.Handler())
	if routes != nil {
		routes(mux)
	}
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !ready.Load() {
			reason := "lease, subnet file or rules not in place yet"
			if r := notReady.Load(); r != nil {
				reason = *r
			}
			http.Error(w, "not ready: "+reason, http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	return nil
}
