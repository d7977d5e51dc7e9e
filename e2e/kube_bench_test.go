package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/flanneld-go/flanneld/e2e/lab"
	"github.com/flanneld-go/flanneld/internal/kubetest"
)

// envBenchKubeNodes sets the node counts of BenchmarkKubeStart.
const envBenchKubeNodes = "FLANNEL_BENCH_KUBE_NODES"

// BenchmarkKubeStart measures a daemon with --kube-subnet-mgr starting on
// a host with an empty kernel while the API server holds N other flannel
// nodes (vxlan, each with a kubelet-sized status): the time from starting
// the process until all N routes, neighbours and fdb entries are in, and
// the daemon's memory then. list-ms is the API server's own time to list
// the nodes (protobuf, one request, from the benchmark): the floor of any
// start. after-list-ms is the time from the daemon's "Listed the nodes" log
// line (its informer has every node) until the kernel holds every entry.
func BenchmarkKubeStart(b *testing.B) {
	needRoot(b)
	for _, n := range envInts(b, envBenchKubeNodes, benchMaxLeases, 5000) {
		b.Run(fmt.Sprintf("vxlan/nodes=%d", n), func(b *testing.B) {
			bin := lab.BuildDaemon(b)
			l := lab.Start(b, lab.Options{Hosts: 1, DaemonPath: bin, LAN: benchLAN, Logf: func(string, ...any) {}})
			b.Cleanup(func() { stopAll(b, l) })
			s, err := kubetest.New(kubetest.WithNetNS(filepath.Join("/run/netns", l.LANNamespace()), l.EtcdAddr()))
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { s.Close() })
			admin, err := kubernetes.NewForConfig(s.Config(s.AdminToken))
			if err != nil {
				b.Fatal(err)
			}
			h := l.Host(1)
			conf, kubeconfig := filepath.Join(l.Dir(), "net-conf.json"), filepath.Join(l.Dir(), "kubeconfig")
			if err := os.WriteFile(conf, []byte(benchConfig("vxlan")), 0o644); err != nil {
				b.Fatal(err)
			}
			if err := s.WriteKubeconfig(kubeconfig, s.AdminToken); err != nil {
				b.Fatal(err)
			}
			h.DaemonEnv = []string{"NODE_NAME=" + h.Name}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
			defer cancel()
			own := benchNode(h.Name, netip.MustParsePrefix("10.255.255.0/24"), h.Addr, nil)
			if _, err := admin.CoreV1().Nodes().Create(ctx, own, metav1.CreateOptions{}); err != nil {
				b.Fatal(err)
			}
			began := time.Now()
			if err := createBenchNodes(ctx, admin, n); err != nil {
				b.Fatal(err)
			}
			b.Logf("created %d nodes in %v", n, time.Since(began).Round(time.Millisecond))

			pcfg := s.Config(s.AdminToken)
			pcfg.ContentType = "application/vnd.kubernetes.protobuf"
			pcfg.AcceptContentTypes = pcfg.ContentType
			lister, err := kubernetes.NewForConfig(pcfg)
			if err != nil {
				b.Fatal(err)
			}
			kc := newKernelCounter(b, h, "vxlan")
			args := []string{"--kube-subnet-mgr", "--kubeconfig-file", kubeconfig, "--net-config-path", conf}
			var times, firsts, lists, afterList []time.Duration
			var mem memory
			for b.Loop() {
				b.StopTimer()
				kc.clearKernel(b, h)
				t0 := time.Now()
				nl, err := lister.CoreV1().Nodes().List(ctx, metav1.ListOptions{ResourceVersion: "0"})
				if err != nil || len(nl.Items) != n+1 {
					b.Fatalf("listing nodes: %d, %v", len(nl.Items), err)
				}
				lists = append(lists, time.Since(t0))
				nl = nil
				b.StartTimer()
				begin := time.Now()
				d := startDaemon(b, h, args...)
				done, first := kc.waitCount(b, d, n, nil)
				b.StopTimer()
				times = append(times, done.Sub(begin))
				firsts = append(firsts, first.Sub(begin))
				listed, err := logTime(d.Log(), `"Listed the nodes"`, begin)
				if err != nil {
					b.Fatal(err)
				}
				afterList = append(afterList, done.Sub(listed))
				if mem == (memory{}) { // the first daemon: settling takes memorySettle
					mem = settledMemory(b, h, d)
				}
				if code := stop(b, d); code != 0 {
					b.Fatalf("flanneld exited with %d after SIGTERM; log:\n%s", code, tailLines(d.Log(), 30))
				}
				b.StartTimer()
			}
			b.ReportMetric(ms(median(times)), "converge-ms")
			b.ReportMetric(ms(median(firsts)), "first-route-ms")
			b.ReportMetric(ms(median(afterList)), "after-list-ms")
			b.ReportMetric(ms(median(lists)), "list-ms")
			mem.report(b)
		})
	}
}

// logTime is the klog timestamp of the first line of log containing what,
// on the day of ref (klog writes local wall-clock time to the microsecond).
func logTime(log, what string, ref time.Time) (time.Time, error) {
	for _, line := range strings.Split(log, "\n") {
		if !strings.Contains(line, what) || len(line) < 21 {
			continue
		}
		// I1201 15:20:40.867528 ...
		t, err := time.ParseInLocation("15:04:05.000000", line[6:21], time.Local)
		if err != nil {
			return time.Time{}, fmt.Errorf("parsing the time of %q: %w", line, err)
		}
		y, mo, d := ref.Date()
		return time.Date(y, mo, d, t.Hour(), t.Minute(), t.Second(), t.Nanosecond(), time.Local), nil
	}
	return time.Time{}, fmt.Errorf("no log line with %s in:\n%s", what, tailLines(log, 20))
}

// benchNode is a Node as a kubelet registers it (addresses, capacity,
// conditions, a few dozen images, node info) with podCIDR set and, when
// annotations is not nil, a flannel node's annotations.
func benchNode(name string, podCIDR netip.Prefix, addr netip.Addr, annotations map[string]string) *v1.Node {
	now := metav1.Now()
	n := &v1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: annotations, Labels: map[string]string{
			"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
			"node.kubernetes.io/instance-type": "m5.large", "topology.kubernetes.io/zone": "zone-a"}},
		Spec: v1.NodeSpec{PodCIDR: podCIDR.String(), PodCIDRs: []string{podCIDR.String()}},
		Status: v1.NodeStatus{
			Addresses: []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: addr.String()}, {Type: v1.NodeHostName, Address: name}},
			Capacity: v1.ResourceList{v1.ResourceCPU: resource.MustParse("2"), v1.ResourceMemory: resource.MustParse("8Gi"),
				v1.ResourcePods: resource.MustParse("110")},
			NodeInfo: v1.NodeSystemInfo{KernelVersion: "6.1.0-18-amd64", OSImage: "Debian GNU/Linux 12 (bookworm)",
				ContainerRuntimeVersion: "containerd://1.7.13", KubeletVersion: kubetest.Version, OperatingSystem: "linux", Architecture: "amd64"},
		},
	}
	for _, c := range []v1.NodeConditionType{v1.NodeMemoryPressure, v1.NodeDiskPressure, v1.NodePIDPressure, v1.NodeReady} {
		st := v1.ConditionFalse
		if c == v1.NodeReady {
			st = v1.ConditionTrue
		}
		n.Status.Conditions = append(n.Status.Conditions, v1.NodeCondition{Type: c, Status: st, Reason: "Kubelet" + string(c),
			Message: "kubelet reports " + string(c), LastHeartbeatTime: now, LastTransitionTime: now})
	}
	for i := range 30 {
		n.Status.Images = append(n.Status.Images, v1.ContainerImage{
			Names:     []string{fmt.Sprintf("registry.example/team/app-%d@sha256:%064x", i, i), fmt.Sprintf("registry.example/team/app-%d:v1.%d", i, i)},
			SizeBytes: int64(10_000_000 + i)})
	}
	return n
}

// createBenchNodes creates n flannel vxlan nodes with the subnets and
// addresses of fakeLease, 32 at a time.
func createBenchNodes(ctx context.Context, c kubernetes.Interface, n int) error {
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				k := uint32(i + 1)
				sn := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(k >> 8), byte(k), 0}), 24)
				pub := netip.AddrFrom4([4]byte{172, 17 + byte(k>>16), byte(k >> 8), byte(k)})
				node := benchNode(fmt.Sprintf("node-%05d", i), sn, pub, map[string]string{
					annotationPrefix + "backend-type":        "vxlan",
					annotationPrefix + "backend-data":        fmt.Sprintf(`{"VNI":1,"VtepMAC":"0e:00:00:%02x:%02x:%02x"}`, byte(k>>16), byte(k>>8), byte(k)),
					annotationPrefix + "public-ip":           pub.String(),
					annotationPrefix + "kube-subnet-manager": "true",
				})
				if _, err := c.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil {
					errs <- fmt.Errorf("creating node %s: %w", node.Name, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	return <-errs
}
