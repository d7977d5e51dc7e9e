package udp

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/subnet"
)

// benchStreamDuration is how long each TCP stream of the benchmark runs.
const benchStreamDuration = 3 * time.Second

// addVXLAN gives host x a kernel vxlan device (VNI 42, port 8472) with
// overlayAddr/24, flooding to the peer's external address.
func addVXLAN(tb testing.TB, x *labHost, overlayAddr string, peer *labHost) {
	tb.Helper()
	vx := &netlink.Vxlan{
		LinkAttrs:    netlink.LinkAttrs{Name: "vxbench", MTU: x.ext.MTU - 50},
		VxlanId:      42,
		VtepDevIndex: x.ext.Index,
		SrcAddr:      ip.IP(x.addr),
		Port:         8472,
		Learning:     false,
	}
	if err := x.NL.LinkAdd(vx); err != nil {
		tb.Fatalf("creating vxlan in %s: %v", x.Name, err)
	}
	l, err := x.NL.LinkByName("vxbench")
	if err != nil {
		tb.Fatalf("finding vxlan in %s: %v", x.Name, err)
	}
	a, _ := netlink.ParseAddr(overlayAddr + "/24")
	if err := x.NL.AddrAdd(l, a); err != nil {
		tb.Fatalf("addressing vxlan in %s: %v", x.Name, err)
	}
	if err := x.NL.NeighAppend(&netlink.Neigh{
		LinkIndex:    l.Attrs().Index,
		Family:       unix.AF_BRIDGE,
		Flags:        netlink.NTF_SELF,
		State:        netlink.NUD_PERMANENT,
		HardwareAddr: net.HardwareAddr{0, 0, 0, 0, 0, 0},
		IP:           ip.IP(peer.addr),
	}); err != nil {
		tb.Fatalf("adding the flood entry in %s: %v", x.Name, err)
	}
	if err := x.NL.LinkSetUp(l); err != nil {
		tb.Fatalf("setting vxlan up in %s: %v", x.Name, err)
	}
}

func cpuSeconds() float64 {
	var ru unix.Rusage
	_ = unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Sec+ru.Stime.Sec) + float64(ru.Utime.Usec+ru.Stime.Usec)/1e6
}

// benchLab builds the lab of the throughput benchmarks: udp backends in
// two namespaces (overlay 10.5.1.0 -> 10.5.2.0) and a kernel vxlan pair
// (10.6.1.1 -> 10.6.1.2) over the same veth underlay (10.250.8.1 -> .2).
func benchLab(b *testing.B) (a, bh *labHost, ba, bb *Backend) {
	needRoot(b)
	a, bh = newLab(b)
	// FLUDP_BENCH_BACKEND overrides the Backend block, e.g. to measure
	// with an offload off: {"Type":"udp","UDPGRO":false}.
	cfg := labConfig(b, os.Getenv("FLUDP_BENCH_BACKEND"))
	ba = a.startBackend(b, cfg)
	bb = bh.startBackend(b, cfg)
	la, lb := a.lease("10.5.1.0/24"), bh.lease("10.5.2.0/24")
	if err := ba.Apply(b.Context(), la, []subnet.Lease{lb}); err != nil {
		b.Fatal(err)
	}
	if err := bb.Apply(b.Context(), lb, []subnet.Lease{la}); err != nil {
		b.Fatal(err)
	}
	addVXLAN(b, a, "10.6.1.1", bh)
	addVXLAN(b, bh, "10.6.1.2", a)
	return a, bh, ba, bb
}

// BenchmarkTCPThroughput runs, in the same lab and the same run, one TCP
// stream of benchStreamDuration over the udp backend, over a kernel vxlan
// pair and over the raw veth underlay, and reports Gbit/s for each, the
// ratio udp/vxlan, the process CPU seconds per GB moved over udp and
// vxlan, and the process's heap allocations per GB for each. The stream is
// Go (sender and receiver in this process), so the CPU figures include it.
// With -benchtime=Nx the targets take turns N times.
func BenchmarkTCPThroughput(b *testing.B) {
	a, bh, ba, bb := benchLab(b)
	type target struct {
		name   string
		dst    string
		sum    float64 // Gbit/s summed over b.N
		cpu    float64 // CPU seconds
		gb     float64 // GB moved
		allocs uint64  // heap allocations of the whole process
	}
	targets := []*target{
		{name: "udp", dst: "10.5.2.0"},
		{name: "vxlan", dst: "10.6.1.2"},
		{name: "underlay", dst: bh.addr.String()},
	}
	// FLUDP_BENCH_ONLY=udp (for profiling) runs one target only.
	if only := os.Getenv("FLUDP_BENCH_ONLY"); only != "" {
		targets = slices.DeleteFunc(targets, func(tg *target) bool { return tg.name != only })
		if len(targets) == 0 {
			b.Fatalf("FLUDP_BENCH_ONLY=%s: no such target (udp, vxlan, underlay)", only)
		}
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for _, tg := range targets {
			var m0, m1 runtime.MemStats
			runtime.ReadMemStats(&m0)
			c0 := cpuSeconds()
			r, err := tcpStream(b, a, bh, tg.dst, 0, benchStreamDuration, false)
			if err != nil {
				b.Fatalf("%s stream: %v", tg.name, err)
			}
			tg.cpu += cpuSeconds() - c0
			runtime.ReadMemStats(&m1)
			tg.allocs += m1.Mallocs - m0.Mallocs
			tg.gb += float64(r.bytes) / 1e9
			tg.sum += float64(r.bytes) * 8 / r.elapsed.Seconds() / 1e9
		}
	}
	b.StopTimer()
	for _, tg := range targets {
		b.ReportMetric(tg.sum/float64(b.N), tg.name+"-Gbit/s")
	}
	for _, tg := range targets {
		b.ReportMetric(float64(tg.allocs)/tg.gb, tg.name+"-allocs/GB")
	}
	if len(targets) == 3 {
		b.ReportMetric(targets[0].sum/targets[1].sum, "udp/vxlan")
		b.ReportMetric(targets[0].cpu/targets[0].gb, "udp-cpu-s/GB")
		b.ReportMetric(targets[1].cpu/targets[1].gb, "vxlan-cpu-s/GB")
	}
	b.ReportMetric(0, "ns/op")
	b.Logf("udp backend A: %+v", ba.Stats())
	b.Logf("udp backend B: %+v", bb.Stats())
}

// BenchmarkIperf3 is BenchmarkTCPThroughput with iperf3 (one stream,
// benchStreamDuration) as the traffic, so that only the backend runs in
// this process: udp-cpu-s/GB is the backend's own CPU. It skips when
// iperf3 is not installed.
func BenchmarkIperf3(b *testing.B) {
	if _, err := exec.LookPath("iperf3"); err != nil {
		b.Skip("skipping: iperf3 is not installed (apt-get install iperf3)")
	}
	a, bh, _, _ := benchLab(b)
	targets := []struct {
		name, dst string
		sum, gb   float64
		cpu       float64
	}{{name: "udp", dst: "10.5.2.0"}, {name: "vxlan", dst: "10.6.1.2"}, {name: "underlay", dst: bh.addr.String()}}
	if only := os.Getenv("FLUDP_BENCH_ONLY"); only != "" {
		targets = slices.DeleteFunc(targets, func(tg struct {
			name, dst string
			sum, gb   float64
			cpu       float64
		}) bool {
			return tg.name != only
		})
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for k := range targets {
			tg := &targets[k]
			ctx, cancel := context.WithTimeout(b.Context(), benchStreamDuration+30*time.Second)
			srv := bh.Command(ctx, "iperf3", "-s", "-1", "-B", tg.dst, "-p", "5299")
			if err := srv.Start(); err != nil {
				cancel()
				b.Fatalf("starting iperf3 -s: %v", err)
			}
			type report struct {
				Error string `json:"error"`
				End   struct {
					SumReceived struct {
						Bytes         float64 `json:"bytes"`
						BitsPerSecond float64 `json:"bits_per_second"`
					} `json:"sum_received"`
				} `json:"end"`
			}
			var (
				out []byte
				err error
				res report
			)
			c0 := cpuSeconds()
			for try := 0; try < 50; try++ { // the server needs a moment to listen
				out, err = a.Command(ctx, "iperf3", "-c", tg.dst, "-p", "5299",
					"-t", fmt.Sprint(int(benchStreamDuration.Seconds())), "-J").Output()
				res = report{}
				if err == nil {
					err = json.Unmarshal(out, &res)
				}
				if err == nil && res.Error == "" && res.End.SumReceived.Bytes > 0 {
					break
				}
				if err == nil {
					err = fmt.Errorf("iperf3: %q", res.Error)
				}
				time.Sleep(100 * time.Millisecond)
			}
			tg.cpu += cpuSeconds() - c0
			_ = srv.Wait()
			cancel()
			if err != nil {
				b.Fatalf("iperf3 over %s: %v\n%s", tg.name, err, out)
			}
			tg.sum += res.End.SumReceived.BitsPerSecond / 1e9
			tg.gb += res.End.SumReceived.Bytes / 1e9
		}
	}
	b.StopTimer()
	for _, tg := range targets {
		b.ReportMetric(tg.sum/float64(b.N), tg.name+"-Gbit/s")
	}
	if len(targets) == 3 {
		b.ReportMetric(targets[0].sum/targets[1].sum, "udp/vxlan")
		b.ReportMetric(targets[0].cpu/targets[0].gb, "udp-backend-cpu-s/GB")
	}
	b.ReportMetric(0, "ns/op")
}
