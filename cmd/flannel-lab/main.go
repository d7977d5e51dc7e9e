// Command flannel-lab is the driver of `make demo`: as root, it builds a
// namespaced lab (an embedded etcd and three host namespaces on a bridged
// LAN, see e2e/lab), writes the network config, runs the given flanneld in
// every host namespace, prints each host's subnet.env and the leases, gives
// each host's docker0 its overlay address and prints a cross-host ping
// matrix. It then tears everything down, or with -keep leaves the lab up
// until Ctrl-C (or `flannel-lab -teardown` from another terminal).
//
// It exits 1 if a daemon fails or any ping fails, 2 on a usage error.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"go.etcd.io/etcd/client/v2"

	"github.com/flanneld-go/flanneld/e2e/lab"
)

// namePrefix starts the demo's namespace names; -teardown removes them.
const namePrefix = "fdemo"

var errInterrupted = errors.New("interrupted")

// pidDir holds one file per kept demo: <lab name>.pid with the demo's pid.
const pidDir = "/run/flannel-lab"

type config struct {
	flanneld string
	backend  string
	network  string
	hosts    int
	keep     bool
	teardown bool
	ipMasq   bool
	verbose  int
	timeout  time.Duration
}

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	var c config
	fs := flag.NewFlagSet("flannel-lab", flag.ContinueOnError)
	fs.StringVar(&c.flanneld, "flanneld", "bin/flanneld", "path of the flanneld binary to run in each host namespace (make build)")
	fs.StringVar(&c.backend, "backend", "host-gw", "backend type written to the network config: host-gw, vxlan, udp or wireguard (each host daemon gets its own key file and /run/wireguard)")
	fs.StringVar(&c.network, "network", "10.5.0.0/16", "overlay network written to the network config")
	fs.IntVar(&c.hosts, "hosts", 3, "number of host namespaces")
	fs.BoolVar(&c.keep, "keep", false, "leave the lab up until Ctrl-C and print how to explore it")
	fs.BoolVar(&c.teardown, "teardown", false, "stop kept demos and delete every leftover demo namespace, then exit")
	fs.BoolVar(&c.ipMasq, "ip-masq", false, "pass --ip-masq to the daemons")
	fs.IntVar(&c.verbose, "v", 0, "daemon log verbosity (passed as -v)")
	fs.DurationVar(&c.timeout, "timeout", 60*time.Second, "how long to wait for each subnet.env and for the pings")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "flannel-lab: unexpected argument %q: it takes only flags (see -h)\n", fs.Arg(0))
		return 2
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "flannel-lab: must run as root (it creates network namespaces): use sudo")
		return 2
	}
	if c.teardown {
		if err := teardown(); err != nil {
			fmt.Fprintf(os.Stderr, "flannel-lab: teardown: %v\n", err)
			return 1
		}
		return 0
	}
	if _, err := netip.ParsePrefix(c.network); err != nil {
		fmt.Fprintf(os.Stderr, "flannel-lab: invalid -network %q: give an IPv4 CIDR such as 10.5.0.0/16\n", c.network)
		return 2
	}
	switch c.backend {
	case "host-gw", "vxlan", "udp", "wireguard":
	default:
		fmt.Fprintf(os.Stderr, "flannel-lab: unknown -backend %q: use host-gw, vxlan, udp or wireguard\n", c.backend)
		return 2
	}
	if _, err := os.Stat(c.flanneld); err != nil {
		fmt.Fprintf(os.Stderr, "flannel-lab: flanneld binary %s not found: build it first (make build) or pass -flanneld PATH\n", c.flanneld)
		return 2
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := demo(ctx, c); err != nil {
		fmt.Fprintf(os.Stderr, "flannel-lab: %v\n", err)
		return 1
	}
	return 0
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "flannel-lab: "+format+"\n", args...)
}

func demo(ctx context.Context, c config) (err error) {
	l, err := lab.New(lab.Options{
		Hosts:      c.hosts,
		DaemonPath: c.flanneld,
		NamePrefix: namePrefix,
		Logf:       logf,
	})
	if err != nil {
		return fmt.Errorf("building the lab: %w", err)
	}
	defer func() {
		logf("tearing down lab %s", l.Name())
		if cerr := l.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("tearing down: %w", cerr))
		}
	}()

	cfgJSON := fmt.Sprintf(`{"Network":%q,"Backend":{"Type":%q}}`, c.network, c.backend)
	if err := l.SetConfig(ctx, cfgJSON); err != nil {
		return err
	}
	logf("%s/config = %s", l.EtcdPrefix(), cfgJSON)

	extra := append([]string(nil), healthzArgs...)
	if c.ipMasq {
		extra = append(extra, "--ip-masq")
	}
	if c.verbose > 0 {
		extra = append(extra, "-v", strconv.Itoa(c.verbose))
	}
	for _, h := range l.Hosts() {
		if _, err := h.StartDaemon(extra...); err != nil {
			return err
		}
	}

	// Wait for every subnet.env and show it.
	envs := make([]lab.SubnetEnv, len(l.Hosts()))
	for i, h := range l.Hosts() {
		wctx, cancel := context.WithTimeout(ctx, c.timeout)
		env, err := h.WaitSubnetEnv(wctx)
		cancel()
		if ctx.Err() != nil {
			return errInterrupted
		}
		if err != nil {
			return err
		}
		envs[i] = env
		data, _ := os.ReadFile(h.SubnetFile)
		fmt.Printf("\n== %s (namespace %s, eth0 %s): %s\n%s", h.Name, h.NS, h.Addr, h.SubnetFile, data)
	}
	printLeases(ctx, l)

	// Overlay addresses on docker0, then the ping matrix.
	for i, h := range l.Hosts() {
		if err := h.SetBridgeAddr(envs[i].Subnet); err != nil {
			return err
		}
	}
	failed := pingMatrix(ctx, l, envs, c.timeout)
	failed += printPeers(ctx, l, c.timeout)
	if ctx.Err() != nil {
		return errInterrupted
	}
	for _, h := range l.Hosts() {
		if d := h.Daemon(); d != nil && d.Exited() {
			code, _ := d.Wait()
			fmt.Printf("\nflanneld on %s exited with code %d; end of its log:\n%s\n", h.Name, code, lastLines(d.Log(), 20))
			failed++
		}
	}

	if c.keep {
		keep(ctx, l)
	}
	if failed > 0 {
		if !c.keep {
			for _, h := range l.Hosts() {
				if d := h.Daemon(); d != nil {
					fmt.Printf("\n--- end of %s's flanneld log ---\n%s\n", h.Name, lastLines(d.Log(), 20))
				}
			}
		}
		return fmt.Errorf("%d check(s) failed", failed)
	}
	return nil
}

// printLeases shows the subnet leases the daemons wrote to etcd.
func printLeases(ctx context.Context, l *lab.Lab) {
	key := l.EtcdPrefix() + "/subnets"
	resp, err := l.KeysAPI().Get(ctx, key, &client.GetOptions{Recursive: true, Sort: true})
	if err != nil {
		fmt.Printf("\n(reading %s: %v)\n", key, err)
		return
	}
	fmt.Printf("\n== leases in etcd (%s)\n", key)
	for _, n := range resp.Node.Nodes {
		ttl := "no TTL"
		if n.TTL > 0 {
			ttl = fmt.Sprintf("TTL %ds", n.TTL)
		}
		fmt.Printf("%s  %s  (%s)\n", strings.TrimPrefix(n.Key, key+"/"), n.Value, ttl)
	}
}

// pingMatrix pings every host's overlay address from every other host's
// overlay address, all pairs at once, and prints the matrix. It returns
// the number of failed pairs.
func pingMatrix(ctx context.Context, l *lab.Lab, envs []lab.SubnetEnv, timeout time.Duration) int {
	hosts := l.Hosts()
	n := len(hosts)
	results := make([][]error, n)
	var wg sync.WaitGroup
	pctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for i := range hosts {
		results[i] = make([]error, n)
		for j := range hosts {
			if i == j {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				results[i][j] = hosts[i].WaitPing(pctx, envs[i].Subnet.Addr(), envs[j].Subnet.Addr())
			}()
		}
	}
	wg.Wait()
	if ctx.Err() != nil {
		return 0 // interrupted: the caller says so
	}

	fmt.Printf("\n== ping matrix: from each host's docker0 address (row) to each other host's (column)\n")
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 3, ' ', 0)
	header := []string{"from \\ to"}
	for j, h := range hosts {
		header = append(header, fmt.Sprintf("%s %s", h.Name, envs[j].Subnet.Addr()))
	}
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	failed := 0
	var details []string
	for i, h := range hosts {
		row := []string{fmt.Sprintf("%s %s", h.Name, envs[i].Subnet.Addr())}
		for j := range hosts {
			switch {
			case i == j:
				row = append(row, "-")
			case results[i][j] == nil:
				row = append(row, "ok")
			default:
				row = append(row, "FAIL")
				failed++
				details = append(details, fmt.Sprintf("%s -> %s: %v", h.Name, hosts[j].Name, results[i][j]))
			}
		}
		fmt.Fprintln(tw, strings.Join(row, "\t"))
	}
	tw.Flush()
	if failed == 0 {
		fmt.Printf("all %d pings ok\n", n*(n-1))
	} else {
		fmt.Printf("%d of %d pings failed:\n  %s\n", failed, n*(n-1), strings.Join(details, "\n  "))
	}
	return failed
}

// keep records the demo in pidDir, prints how to explore the lab and waits
// for Ctrl-C or SIGTERM (sent by `flannel-lab -teardown`).
func keep(ctx context.Context, l *lab.Lab) {
	pidFile := filepath.Join(pidDir, l.Name()+".pid")
	if err := os.MkdirAll(pidDir, 0o755); err == nil {
		if err := os.WriteFile(pidFile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
			logf("writing %s: %v", pidFile, err)
		}
		defer os.Remove(pidFile)
	}
	h1 := l.Host(1)
	other := l.Hosts()[len(l.Hosts())-1]
	fmt.Printf("\nThe lab stays up while this program runs (etcd lives in this process).\n")
	fmt.Printf("Namespaces: %s\n", strings.Join(l.Namespaces(), " "))
	fmt.Printf("Explore, from another terminal (as root):\n")
	ex := func(cmd, comment string) { fmt.Printf("  # %s\n  %s\n", comment, cmd) }
	ex(fmt.Sprintf("ip netns exec %s ip route", h1.NS), "routes the daemon installed")
	ex(fmt.Sprintf("ip netns exec %s ip -d link", h1.NS), "devices (docker0, flannel.1 or flannel0)")
	if env, err := other.ReadSubnetEnv(); err == nil {
		ex(fmt.Sprintf("ip netns exec %s ping -I %s %s", h1.NS, h1Addr(h1), env.Subnet.Addr()), other.Name+"'s docker0, from "+h1.Name+"'s")
	}
	ex(fmt.Sprintf("ip netns exec %s iptables-save", h1.NS), "the FLANNEL-* chains")
	if d := h1.Daemon(); d != nil {
		ex(fmt.Sprintf("nsenter -t %d -m -n wg show", d.Pid()), "WireGuard devices and peers (wireguard backend; wg is in wireguard-tools)")
	}
	ex(fmt.Sprintf("ip netns exec %s bash", h1.NS), "a shell on "+h1.Name)
	ex(fmt.Sprintf("ip netns exec %s curl -s '%s/v2/keys%s/subnets?recursive=true'", h1.NS, l.EtcdEndpoint(), l.EtcdPrefix()), "the leases (needs curl)")
	ex(fmt.Sprintf("cat %s/host*/subnet.env", l.Dir()), "what each daemon wrote")
	ex(fmt.Sprintf("tail -f %s/host*/flanneld.1.log", l.Dir()), "the daemons' logs")
	fmt.Printf("Tear down: press Ctrl-C here, or run `go run ./cmd/flannel-lab -teardown` (it stops this program).\n")
	<-ctx.Done()
	fmt.Println()
}

// teardown stops kept demos (SIGTERM to the pids recorded in pidDir, which
// then tear down their own lab) and deletes leftover demo namespaces with
// the processes in them.
func teardown() error {
	var errs []error
	entries, err := os.ReadDir(pidDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("listing %s: %w", pidDir, err))
	}
	for _, e := range entries {
		p := filepath.Join(pidDir, e.Name())
		if !strings.HasSuffix(e.Name(), ".pid") {
			continue
		}
		data, err := os.ReadFile(p)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
		if err != nil || !isDemo(pid) {
			os.Remove(p) // stale
			continue
		}
		logf("stopping kept demo (pid %d)", pid)
		if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
			errs = append(errs, fmt.Errorf("signalling pid %d: %w", pid, err))
			continue
		}
		deadline := time.Now().Add(45 * time.Second)
		for isDemo(pid) && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
		}
		if isDemo(pid) {
			errs = append(errs, fmt.Errorf("kept demo (pid %d) still running after 45s", pid))
		}
		os.Remove(p)
	}
	deleted, err := lab.Teardown(namePrefix)
	if err != nil {
		errs = append(errs, err)
	}
	sort.Strings(deleted)
	if len(deleted) > 0 {
		logf("deleted leftover namespaces: %s", strings.Join(deleted, " "))
	} else {
		logf("no leftover demo namespaces")
	}
	return errors.Join(errs...)
}

// isDemo reports whether pid is a running flannel-lab process.
func isDemo(pid int) bool {
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	argv0, _, _ := strings.Cut(string(cmdline), "\x00")
	return filepath.Base(argv0) == "flannel-lab"
}

// h1Addr is the docker0 address of h, or its eth0 address before it has one.
func h1Addr(h *lab.Host) netip.Addr {
	if env, err := h.ReadSubnetEnv(); err == nil {
		return env.Subnet.Addr()
	}
	return h.Addr
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
