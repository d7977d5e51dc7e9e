package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"regexp"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/flanneld-go/flanneld/e2e/lab"
)

// streamDuration is how long each TCP stream of the throughput benchmark
// runs.
const streamDuration = 4 * time.Second

// tputTarget is one data path of the throughput benchmark: two hosts of a
// lab, the overlay addresses of their bridges, and the processes that carry
// the traffic (the daemons, or the stock wireguard-go pair) whose CPU time
// is counted.
type tputTarget struct {
	name     string
	from, to *lab.Host
	src, dst netip.Addr
	pids     []int
	sum, cpu float64 // Gbit/s summed over runs; data-path CPU seconds
	total    float64 // data-path plus this process's CPU seconds
	bytes    float64
}

// ourPair builds a two-host lab on backend with our daemons and returns it
// as a target once the hosts ping.
func ourPair(b *testing.B, backend string) *tputTarget {
	l := newLab(b, 2, fmt.Sprintf(`{"Network":"10.5.0.0/16","Backend":{"Type":%q}}`, backend))
	envs := startAll(b, l)
	hosts := l.Hosts()
	for i, h := range hosts {
		if err := h.SetBridgeAddr(envs[i].Subnet); err != nil {
			b.Fatal(err)
		}
	}
	ctx := testCtx(b, converge)
	if err := hosts[0].WaitPing(ctx, envs[0].Subnet.Addr(), envs[1].Subnet.Addr()); err != nil {
		b.Fatal(err)
	}
	return &tputTarget{name: backend, from: hosts[0], to: hosts[1], src: envs[0].Subnet.Addr(), dst: envs[1].Subnet.Addr(),
		pids: []int{hosts[0].Daemon().Pid(), hosts[1].Daemon().Pid()}}
}

// stockPair builds a two-host lab with no daemon: each host runs the stock
// wireguard-go, configured by hand with wg(8) as flannel would (address,
// Network route, MTU eth0 - 80, one peer).
func stockPair(b *testing.B) *tputTarget {
	l := newLab(b, 2, "")
	hosts := l.Hosts()
	var ws [2]*stockWG
	var keys [2]wgtypes.Key
	subs := [2]netip.Prefix{netip.MustParsePrefix("10.5.1.0/24"), netip.MustParsePrefix("10.5.2.0/24")}
	for i, h := range hosts {
		k, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			b.Fatal(err)
		}
		keys[i] = k
		if err := os.WriteFile(h.KeyFile, []byte(k.String()), 0o400); err != nil {
			b.Fatal(err)
		}
		ws[i] = startStockWG(b, h, l.Dir())
		ws[i].wg(b, "set", "flannel-wg", "private-key", h.KeyFile, "listen-port", "51820")
		mtu, err := linkMTU(h, "eth0")
		if err != nil {
			b.Fatal(err)
		}
		hostIP(b, h, "link", "set", "flannel-wg", "mtu", strconv.Itoa(mtu-80))
		hostIP(b, h, "addr", "add", subs[i].Addr().String()+"/32", "dev", "flannel-wg")
		hostIP(b, h, "link", "set", "flannel-wg", "up")
		hostIP(b, h, "route", "add", "10.5.0.0/16", "dev", "flannel-wg", "scope", "link")
		if err := h.SetBridgeAddr(netip.PrefixFrom(subs[i].Addr().Next(), 24)); err != nil {
			b.Fatal(err)
		}
	}
	for i := range hosts {
		o := 1 - i
		ws[i].wg(b, "set", "flannel-wg", "peer", keys[o].PublicKey().String(),
			"endpoint", hosts[o].Addr.String()+":51820", "allowed-ips", subs[o].String())
	}
	src, dst := subs[0].Addr().Next(), subs[1].Addr().Next()
	if err := hosts[0].WaitPing(testCtx(b, converge), src, dst); err != nil {
		b.Fatal(err)
	}
	return &tputTarget{name: "stock-wireguard-go", from: hosts[0], to: hosts[1], src: src, dst: dst,
		pids: []int{ws[0].cmd.Process.Pid, ws[1].cmd.Process.Pid}}
}

// selfCPU is this process's user plus system CPU time, in seconds.
func selfCPU() float64 {
	var ru unix.Rusage
	_ = unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Sec+ru.Stime.Sec) + float64(ru.Utime.Usec+ru.Stime.Usec)/1e6
}

func pidsCPU(b *testing.B, pids []int) float64 {
	var s time.Duration
	for _, p := range pids {
		c, err := cpuTime(p)
		if err != nil {
			b.Fatal(err)
		}
		s += c
	}
	return s.Seconds()
}

// stream sends one TCP stream of d from t.src (in t.from's namespace) to
// t.dst (in t.to's) and returns the bytes received and the time taken.
func (t *tputTarget) stream(b *testing.B, d time.Duration) (int64, time.Duration) {
	ln, err := inNamespace(t.to.NS, func() (net.Listener, error) {
		return net.Listen("tcp", netip.AddrPortFrom(t.dst, 5201).String())
	})
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	got := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- -1
			return
		}
		defer c.Close()
		n, _ := io.Copy(io.Discard, c)
		got <- n
	}()
	c, err := inNamespace(t.from.NS, func() (net.Conn, error) {
		dl := net.Dialer{LocalAddr: &net.TCPAddr{IP: t.src.AsSlice()}, Timeout: 5 * time.Second}
		return dl.Dial("tcp", netip.AddrPortFrom(t.dst, 5201).String())
	})
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 256<<10)
	start := time.Now()
	for time.Since(start) < d {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	c.Close()
	n := <-got
	return n, time.Since(start)
}

// BenchmarkWireGuardThroughput runs, in one run, a TCP stream between two
// namespaced hosts over our wireguard backend (userspace wireguard-go in the
// daemon here), our udp and vxlan backends, and a pair of stock
// wireguard-go processes configured by hand. It reports Gbit/s for each,
// the ratio wireguard / stock, and CPU seconds per GB moved: of the data
// path processes (the two daemons, the two wireguard-go; vxlan's work is
// the kernel's) and of those plus this process (the TCP sender and
// receiver, and the kernel work charged to them). With -benchtime=Nx the
// targets take turns N times, each run starting with the next one.
func BenchmarkWireGuardThroughput(b *testing.B) {
	needWG(b)
	targets := []*tputTarget{ourPair(b, "wireguard"), stockPair(b), ourPair(b, "udp"), ourPair(b, "vxlan")}
	b.ResetTimer()
	for i := range b.N {
		// Each run starts with the next target, so that with -benchtime
		// 4x each takes each place in the order once.
		for j := range targets {
			t := targets[(i+j)%len(targets)]
			c0, s0 := pidsCPU(b, t.pids), selfCPU()
			n, el := t.stream(b, streamDuration)
			c1, s1 := pidsCPU(b, t.pids), selfCPU()
			t.sum += float64(n) * 8 / el.Seconds() / 1e9
			t.cpu += c1 - c0
			t.total += c1 - c0 + s1 - s0
			t.bytes += float64(n)
		}
	}
	b.StopTimer()
	for _, t := range targets {
		gb := t.bytes / 1e9
		b.ReportMetric(t.sum/float64(b.N), t.name+"-Gbit/s")
		b.ReportMetric(t.cpu/gb, t.name+"-datapath-cpu-s/GB")
		b.ReportMetric(t.total/gb, t.name+"-total-cpu-s/GB")
	}
	b.ReportMetric(targets[0].sum/targets[1].sum, "wireguard/stock")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkWireGuardRestartWindow measures what a restart of the daemon
// does to traffic in userspace mode: host1 pings host2's bridge every
// 20 ms while host2's daemon is stopped (SIGTERM; wireguard-go and its TUN
// go with the process, the route through it too) and started again. It
// reports the replies lost times the interval, for pings towards the
// restarted host and from it.
func BenchmarkWireGuardRestartWindow(b *testing.B) {
	needWG(b)
	l := newLab(b, 2, wgConfig)
	envs := startAll(b, l)
	hosts := l.Hosts()
	setBridgesB(b, hosts, envs)
	ctx := testCtx(b, 10*converge)
	if err := hosts[0].WaitPing(ctx, envs[0].Subnet.Addr(), envs[1].Subnet.Addr()); err != nil {
		b.Fatal(err)
	}
	const interval = 20 * time.Millisecond
	var to, from time.Duration
	b.ResetTimer()
	for range b.N {
		for _, dir := range []string{"to", "from"} {
			pinger, target, src, dst := hosts[0], hosts[1], envs[0].Subnet.Addr(), envs[1].Subnet.Addr()
			if dir == "from" {
				pinger, src, dst = hosts[1], envs[1].Subnet.Addr(), envs[0].Subnet.Addr()
			}
			lost := pingAcrossRestart(b, ctx, pinger, target, src, dst, interval)
			if dir == "to" {
				to += lost
			} else {
				from += lost
			}
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(to.Milliseconds())/float64(b.N), "to-restarted-ms")
	b.ReportMetric(float64(from.Milliseconds())/float64(b.N), "from-restarted-ms")
	b.ReportMetric(0, "ns/op")
}

var pingStats = regexp.MustCompile(`(\d+) packets transmitted, (\d+) received`)

// pingAcrossRestart pings dst from src on pinger every interval for 30 s,
// restarting target's daemon 1 s in, and returns the replies lost times
// the interval.
func pingAcrossRestart(b *testing.B, ctx context.Context, pinger, target *lab.Host, src, dst netip.Addr, interval time.Duration) time.Duration {
	const span = 30 * time.Second
	count := int(span / interval)
	out := make(chan string, 1)
	go func() {
		o, _ := pinger.Exec(ctx, "ping", "-n", "-q", "-i", fmt.Sprint(interval.Seconds()), "-W", "1", "-c", strconv.Itoa(count), "-I", src.String(), dst.String())
		out <- o
	}()
	time.Sleep(time.Second)
	if code := stop(b, target.Daemon()); code != 0 {
		b.Fatalf("exit code %d", code)
	}
	startDaemon(b, target)
	waitEnv(b, target)
	o := <-out
	m := pingStats.FindStringSubmatch(o)
	if m == nil {
		b.Fatalf("ping output: %s", o)
	}
	sent, _ := strconv.Atoi(m[1])
	recv, _ := strconv.Atoi(m[2])
	b.Logf("%s -> %s across %s's restart: %d sent, %d received", pinger.Name, dst, target.Name, sent, recv)
	return time.Duration(sent-recv) * interval
}

func setBridgesB(b *testing.B, hosts []*lab.Host, envs []lab.SubnetEnv) {
	for i, h := range hosts {
		if err := h.SetBridgeAddr(envs[i].Subnet); err != nil {
			b.Fatal(err)
		}
	}
}
