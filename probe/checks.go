package probe

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/pkg/nlbatch"
)

// Check is the outcome of one host check.
type Check struct {
	// Name is one of forwarding, forward-policy, overlap, port, mtu.
	Name string `json:"name"`
	OK   bool   `json:"ok"`
	// Detail says what was found.
	Detail string `json:"detail"`
	// Fix says what to do when it fails.
	Fix string `json:"fix,omitempty"`
}

// HostConfig is what the host checks look at.
type HostConfig struct {
	// Network and IPv6Network are the overlay networks (IPv6Network
	// invalid without EnableIPv6).
	Network, IPv6Network netip.Prefix
	// Backend and Port are the backend type and its UDP port (0: none).
	Backend string
	Port    int
	// Iface is the external interface's name and MTU.
	Iface string
	MTU   int
	// Own and Own6 are this node's subnets (invalid when unknown); Peers
	// are the other nodes' subnets: routes to them are flanneld's (sorted,
	// the checks read them as they are; else they sort a copy at each run).
	Own, Own6 netip.Prefix
	Peers     Subnets
	// Standalone is set for flanneld --check: a socket on the backend's
	// port held by a flanneld process is then the running daemon's.
	Standalone bool
}

// RunChecks runs every host check. It reads the host and changes nothing.
func RunChecks(ctx context.Context, h HostConfig) []Check {
	checks := []Check{checkForwarding(h)}
	checks = append(checks, checkForwardPolicy(ctx, h)...)
	checks = append(checks, checkOverlap(h), checkPort(h), checkMTU(h))
	return checks
}

// procSys reads a sysctl of the calling thread's network namespace.
func procSys(name string) (string, error) {
	b, err := os.ReadFile(filepath.Join("/proc/sys", strings.ReplaceAll(name, ".", "/")))
	return strings.TrimSpace(string(b)), err
}

func checkForwarding(h HostConfig) Check {
	c := Check{Name: "forwarding", OK: true}
	var off []string
	names := []string{"net.ipv4.ip_forward"}
	if h.IPv6Network.IsValid() {
		names = append(names, "net.ipv6.conf.all.forwarding")
	}
	for _, n := range names {
		v, err := procSys(n)
		if err != nil {
			return Check{Name: "forwarding", OK: true, Detail: "not checked: " + err.Error()}
		}
		if v != "1" {
			off = append(off, n)
		}
	}
	if len(off) == 0 {
		c.Detail = strings.Join(names, " and ") + " are on"
		if len(names) == 1 {
			c.Detail = names[0] + " is 1"
		}
		return c
	}
	c.OK = false
	c.Detail = strings.Join(off, " and ") + " off: this host does not forward the other hosts' traffic to its pods or containers"
	c.Fix = "sysctl -w " + strings.Join(off, "=1 ") + "=1, and make it last in /etc/sysctl.d/"
	return c
}

// iptablesSave is `iptables -S` (or ip6tables) of the filter table; a
// variable so tests of the parser need no iptables.
var iptablesSave = func(ctx context.Context, prog string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, prog, "-w", "5", "-t", "filter", "-S").Output()
	return string(out), err
}

func checkForwardPolicy(ctx context.Context, h HostConfig) []Check {
	var out []Check
	for _, fam := range []struct {
		prog string
		n    netip.Prefix
	}{{"iptables", h.Network}, {"ip6tables", h.IPv6Network}} {
		if !fam.n.IsValid() {
			continue
		}
		rules, err := iptablesSave(ctx, fam.prog)
		if err != nil {
			out = append(out, Check{Name: "forward-policy", OK: true, Detail: fmt.Sprintf("not checked: %s -S: %v", fam.prog, err)})
			continue
		}
		out = append(out, forwardPolicy(fam.prog, rules, fam.n))
	}
	return out
}

// forwardPolicy checks iptables -S output: a FORWARD policy of DROP needs
// a rule accepting traffic from or to the network in FORWARD or a chain
// it jumps to.
func forwardPolicy(prog, rules string, n netip.Prefix) Check {
	c := Check{Name: "forward-policy", OK: true}
	chains := map[string][][]string{}
	policy := "ACCEPT"
	for _, line := range strings.Split(rules, "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) >= 3 && f[0] == "-P" && f[1] == "FORWARD":
			policy = f[2]
		case len(f) >= 2 && f[0] == "-A":
			chains[f[1]] = append(chains[f[1]], f[2:])
		}
	}
	if policy != "DROP" {
		c.Detail = fmt.Sprintf("%s FORWARD policy is %s", prog, policy)
		return c
	}
	seen := map[string]bool{}
	var walk func(chain string) string
	walk = func(chain string) string {
		if seen[chain] {
			return ""
		}
		seen[chain] = true
		for _, r := range chains[chain] {
			target, net := "", false
			for i := 0; i+1 < len(r); i++ {
				switch r[i] {
				case "-j", "-g":
					target = r[i+1]
				case "-s", "-d":
					net = net || r[i+1] == n.String()
				}
			}
			if target == "ACCEPT" && net {
				return chain
			}
			if _, ok := chains[target]; ok && target != "" {
				if found := walk(target); found != "" {
					return found
				}
			}
		}
		return ""
	}
	if chain := walk("FORWARD"); chain != "" {
		c.Detail = fmt.Sprintf("%s FORWARD policy is DROP; chain %s accepts %s", prog, chain, n)
		return c
	}
	c.OK = false
	c.Detail = fmt.Sprintf("%s FORWARD policy is DROP and no rule accepts traffic from or to %s: traffic between the hosts' pods is dropped", prog, n)
	c.Fix = fmt.Sprintf("run flanneld with --iptables-forward-rules (the default), or add: %s -A FORWARD -s %s -j ACCEPT; %s -A FORWARD -d %s -j ACCEPT", prog, n, prog, n)
	return c
}

// ownDevice reports whether a device name is one of flanneld's
// (flannel.N, flannel-v6.N, flannel0, flannel-wg, ...).
func ownDevice(name string) bool { return strings.HasPrefix(name, "flannel") }

func checkOverlap(h HostConfig) Check {
	c := Check{Name: "overlap", OK: true}
	links, err := netlink.LinkList()
	if err != nil {
		return Check{Name: "overlap", OK: true, Detail: "not checked: " + err.Error()}
	}
	nh, err := nlbatch.NewHandle()
	if err != nil {
		return Check{Name: "overlap", OK: true, Detail: "not checked: " + err.Error()}
	}
	defer nh.Close()
	names := map[int]string{}
	for _, l := range links {
		names[l.Attrs().Index] = l.Attrs().Name
	}
	peers := h.Peers.sorted()
	var found []string
	for _, n := range []netip.Prefix{h.Network, h.IPv6Network} {
		if !n.IsValid() {
			continue
		}
		fam := netlink.FAMILY_V4
		if n.Addr().Is6() {
			fam = netlink.FAMILY_V6
		}
		// The main table holds a route per peer (host-gw, DirectRouting):
		// read it with the allocation-free dump, not a slice of them.
		list := nh.ListRoutes
		if fam == netlink.FAMILY_V6 {
			list = nh.ListRoutes6
		}
		err := list(func(r *nlbatch.Route) bool {
			dst := r.Dst
			if r.Table != unix.RT_TABLE_MAIN || !n.Overlaps(dst) || dst.Bits() < n.Bits() || ownDevice(names[r.LinkIndex]) || dst == h.Own || dst == h.Own6 || peers.Has(dst) {
				return true
			}
			found = append(found, fmt.Sprintf("route %s dev %s", dst, names[r.LinkIndex]))
			return true
		})
		if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
			return Check{Name: "overlap", OK: true, Detail: "not checked: " + err.Error()}
		}
		addrs, err := netlink.AddrList(nil, fam)
		if err != nil {
			return Check{Name: "overlap", OK: true, Detail: "not checked: " + err.Error()}
		}
		for _, a := range addrs {
			pa, ok := netip.AddrFromSlice(a.IP)
			if !ok || !n.Contains(pa.Unmap()) || ownDevice(names[a.LinkIndex]) || h.Own.Contains(pa.Unmap()) || h.Own6.Contains(pa.Unmap()) {
				continue
			}
			found = append(found, fmt.Sprintf("address %s on %s", a.IPNet, names[a.LinkIndex]))
		}
	}
	if len(found) == 0 {
		c.Detail = fmt.Sprintf("no route or address of another owner inside %s", h.Network)
		return c
	}
	c.OK = false
	c.Detail = fmt.Sprintf("%s overlap%s the network %s and %s not flanneld's (a docker bridge or another CNI on the same range?): traffic to those addresses does not reach the overlay",
		strings.Join(found, ", "), plural(len(found), "s", ""), h.Network, plural(len(found), "is", "are"))
	c.Fix = fmt.Sprintf("remove %s, or move the other network off %s (docker --bip to FLANNEL_SUBNET, or another range for the other CNI)", plural(len(found), "it", "them"), h.Network)
	return c
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// checkPort looks for a socket on the backend's UDP port that is not this
// daemon's: kernel sockets (a vxlan or WireGuard device) have no inode;
// sockets of this process are ours.
func checkPort(h HostConfig) Check {
	c := Check{Name: "port", OK: true}
	if h.Port == 0 {
		c.Detail = "the " + h.Backend + " backend uses no UDP port"
		return c
	}
	// Devices first: another vxlan device on the port is reported; an up
	// vxlan device of ours holds the port itself, so no process can, and
	// the sockets need no look (a kernel socket has no owner to find).
	var others []string
	ownDev := false
	if links, err := netlink.LinkList(); err == nil {
		for _, l := range links {
			if v, ok := l.(*netlink.Vxlan); ok && v.Port == h.Port {
				if !ownDevice(v.Name) {
					others = append(others, "vxlan device "+v.Name)
				} else if v.Flags&net.FlagUp != 0 {
					ownDev = true
				}
			}
		}
	}
	var inodes []uint64
	for _, f := range []string{"/proc/thread-self/net/udp", "/proc/thread-self/net/udp6"} {
		if ownDev {
			break
		}
		b, err := os.ReadFile(f)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			return Check{Name: "port", OK: true, Detail: "not checked: " + err.Error()}
		}
		inodes = append(inodes, udpInodes(b, h.Port)...)
	}
	own := socketOwners(inodes)
	for _, in := range inodes {
		// A socket no process holds is the kernel's (a device's).
		if o, ok := own[in]; ok && o.pid != os.Getpid() && (!h.Standalone || o.comm != "flanneld") {
			others = append(others, fmt.Sprintf("%s (pid %d)", o.comm, o.pid))
		}
	}
	if len(others) == 0 {
		c.Detail = fmt.Sprintf("UDP %d is free or held by flanneld", h.Port)
		return c
	}
	c.OK = false
	c.Detail = fmt.Sprintf("UDP %d, the %s backend's port, is held by %s: the backend cannot receive the other hosts' traffic", h.Port, h.Backend, strings.Join(others, ", "))
	c.Fix = fmt.Sprintf("stop what holds UDP %d, or give the backend another Port in the network config (on every host)", h.Port)
	return c
}

// udpInodes parses /proc/net/udp{,6} for the inodes of user sockets bound
// to port.
func udpInodes(b []byte, port int) []uint64 {
	var out []uint64
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Scan() // the header
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 10 {
			continue
		}
		i := strings.LastIndexByte(f[1], ':')
		if i < 0 {
			continue
		}
		p, err := strconv.ParseUint(f[1][i+1:], 16, 16)
		if err != nil || int(p) != port {
			continue
		}
		if inode, err := strconv.ParseUint(f[9], 10, 64); err == nil && inode != 0 {
			out = append(out, inode)
		}
	}
	return out
}

type owner struct {
	pid  int
	comm string
}

// socketOwners finds the processes holding the socket inodes: this
// process's first (the udp backend's own socket, at every resync), the
// others' only for what is left.
func socketOwners(inodes []uint64) map[uint64]owner {
	out := map[uint64]owner{}
	want := map[string]uint64{}
	for _, in := range inodes {
		want["socket:["+strconv.FormatUint(in, 10)+"]"] = in
	}
	scan := func(dir string, pid int) {
		fds, _ := os.ReadDir(filepath.Join(dir, "fd"))
		for _, fd := range fds {
			link, err := os.Readlink(filepath.Join(dir, "fd", fd.Name()))
			if in, ok := want[link]; err == nil && ok {
				comm, _ := os.ReadFile(filepath.Join(dir, "comm"))
				out[in] = owner{pid: pid, comm: strings.TrimSpace(string(comm))}
				delete(want, link)
			}
		}
	}
	if len(want) > 0 {
		scan("/proc/self", os.Getpid())
	}
	if len(want) == 0 {
		return out
	}
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		scan(filepath.Join("/proc", p.Name()), pid)
		if len(want) == 0 {
			break
		}
	}
	return out
}

// minMTU is the smallest overlay MTU: IPv4's 576, IPv6's 1280.
func minMTU(ipv6 bool) int {
	if ipv6 {
		return 1280
	}
	return 576
}

func checkMTU(h HostConfig) Check {
	c := Check{Name: "mtu", OK: true}
	if h.MTU == 0 {
		c.Detail = "not checked: external interface unknown"
		return c
	}
	over := Overhead(h.Backend)
	need := minMTU(h.IPv6Network.IsValid()) + over
	if h.MTU >= need {
		c.Detail = fmt.Sprintf("%s MTU %d: the overlay MTU is %d", h.Iface, h.MTU, h.MTU-over)
		return c
	}
	c.OK = false
	c.Detail = fmt.Sprintf("%s MTU %d is below the %d the %s backend needs (%d + %d bytes of encapsulation)", h.Iface, h.MTU, need, h.Backend, need-over, over)
	c.Fix = fmt.Sprintf("raise the MTU of %s to at least %d, or choose another interface with --iface", h.Iface, need)
	return c
}
