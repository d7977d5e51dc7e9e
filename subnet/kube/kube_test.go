package kube

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/flanneld-go/flanneld/internal/kubetest"
	"github.com/flanneld-go/flanneld/subnet"
)

// One API server for the package: each test uses its own node names and
// its own annotation prefix, so that its watch sees only its own leases.
var (
	apiOnce sync.Once
	api     *kubetest.Server
	apiErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if api != nil {
		api.Close()
	}
	os.Exit(code)
}

func apiServer(t *testing.T) *kubetest.Server {
	t.Helper()
	apiOnce.Do(func() { api, apiErr = kubetest.New() })
	if apiErr != nil {
		t.Fatalf("starting kube-apiserver: %v", apiErr)
	}
	return api
}

var prefixSeq atomic.Int32

// testPrefix is an annotation prefix no other test uses.
func testPrefix(t *testing.T) string {
	return fmt.Sprintf("t%d.flannel.test", prefixSeq.Add(1))
}

// logLines collects a logger's lines.
type logLines struct {
	mu    sync.Mutex
	lines []string
}

func (l *logLines) logger() *logr.Logger {
	lg := funcr.New(func(prefix, args string) {
		l.mu.Lock()
		l.lines = append(l.lines, prefix+" "+args)
		l.mu.Unlock()
	}, funcr.Options{Verbosity: 1})
	return &lg
}

func (l *logLines) count(substr string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, s := range l.lines {
		if strings.Contains(s, substr) {
			n++
		}
	}
	return n
}

const netConf = `{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}`

// writeAtomic replaces path with text as a ConfigMap volume does: the
// reader sees the old or the new content, never a partial one.
func writeAtomic(t *testing.T, path, text string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func writeConf(t *testing.T, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "net-conf.json")
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

type fixture struct {
	t      *testing.T
	admin  kubernetes.Interface // for the test's own changes
	cfg    *rest.Config         // the admin's, for managers
	prefix string
	path   string
	logs   *logLines
}

func newFixture(t *testing.T) *fixture {
	s := apiServer(t)
	return &fixture{t: t, admin: s.Admin(t), cfg: s.Config(s.AdminToken), prefix: testPrefix(t), path: writeConf(t, netConf), logs: &logLines{}}
}

func (f *fixture) manager(cfg *rest.Config, node string) *Manager {
	f.t.Helper()
	m, err := New(Options{Config: cfg, NodeName: node, NetConfigPath: f.path, AnnotationPrefix: f.prefix,
		PollInterval: 50 * time.Millisecond, ConfigInterval: 50 * time.Millisecond, Logger: f.logs.logger()})
	if err != nil {
		f.t.Fatal(err)
	}
	return m
}

func (f *fixture) key(name string) string { return f.prefix + "/" + name }

// createNode creates a node as a kubelet registers it (with some status),
// with podCIDR set as kube-controller-manager would ("" for none).
func (f *fixture) createNode(name, podCIDR string, annotations map[string]string) *v1.Node {
	f.t.Helper()
	n := &v1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: annotations, Labels: map[string]string{"kubernetes.io/hostname": name}},
		Spec:       v1.NodeSpec{PodCIDR: podCIDR},
	}
	if podCIDR != "" {
		n.Spec.PodCIDRs = []string{podCIDR}
	}
	n, err := f.admin.CoreV1().Nodes().Create(context.Background(), n, metav1.CreateOptions{})
	if err != nil {
		f.t.Fatalf("creating node %s: %v", name, err)
	}
	f.t.Cleanup(func() { f.admin.CoreV1().Nodes().Delete(context.Background(), name, metav1.DeleteOptions{}) })
	return n
}

// leaseNode creates a node that another flannel published.
func (f *fixture) leaseNode(name, podCIDR, publicIP string) {
	f.t.Helper()
	f.createNode(name, podCIDR, map[string]string{
		f.key("kube-subnet-manager"): "true",
		f.key("backend-type"):        "vxlan",
		f.key("backend-data"):        `{"VNI":1,"VtepMAC":"82:4b:b6:2f:54:4e"}`,
		f.key("public-ip"):           publicIP,
	})
}

func (f *fixture) getNode(name string) *v1.Node {
	f.t.Helper()
	n, err := f.admin.CoreV1().Nodes().Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		f.t.Fatal(err)
	}
	return n
}

func (f *fixture) updateNode(name string, change func(*v1.Node)) {
	f.t.Helper()
	n := f.getNode(name)
	change(n)
	if _, err := f.admin.CoreV1().Nodes().Update(context.Background(), n, metav1.UpdateOptions{}); err != nil {
		f.t.Fatalf("updating node %s: %v", name, err)
	}
}

func vxlanAttrs(pub string) subnet.LeaseAttrs {
	return subnet.LeaseAttrs{PublicIP: netip.MustParseAddr(pub), BackendType: "vxlan",
		BackendData: []byte(`{"VNI":1,"VtepMAC":"26:ad:3e:11:22:33"}`)}
}

func mustConfig(t *testing.T) *subnet.Config {
	cfg, err := subnet.ParseConfig([]byte(netConf))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestAcquireLeaseWaitsForPodCIDRThenPublishes(t *testing.T) {
	f := newFixture(t)
	f.createNode("wait-node", "", nil)
	m := f.manager(f.cfg, "wait-node")

	type result struct {
		l   *subnet.Lease
		err error
	}
	done := make(chan result, 1)
	go func() {
		l, err := m.AcquireLease(context.Background(), mustConfig(t), vxlanAttrs("192.168.8.101"), subnet.Lease{})
		done <- result{l, err}
	}()
	waitFor(t, "the podCIDR wait log line", func() bool { return f.logs.count("Waiting for the node's podCIDR") > 0 })
	time.Sleep(200 * time.Millisecond) // several polls
	select {
	case r := <-done:
		t.Fatalf("AcquireLease returned before the podCIDR was set: %v, %v", r.l, r.err)
	default:
	}
	if n := f.logs.count("Waiting for the node's podCIDR"); n != 1 {
		t.Errorf("the wait was logged %d times, want once", n)
	}

	f.updateNode("wait-node", func(n *v1.Node) {
		n.Spec.PodCIDR, n.Spec.PodCIDRs = "10.5.34.0/24", []string{"10.5.34.0/24"}
	})
	var r result
	select {
	case r = <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("AcquireLease did not return after the podCIDR was set")
	}
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.l.Subnet != netip.MustParsePrefix("10.5.34.0/24") || r.l.Attrs.PublicIP != netip.MustParseAddr("192.168.8.101") || !r.l.Reservation() {
		t.Errorf("lease = %+v, want 10.5.34.0/24 for 192.168.8.101 with no expiry", r.l)
	}

	n := f.getNode("wait-node")
	got := map[string]string{}
	for k, v := range n.Annotations {
		if strings.HasPrefix(k, f.prefix+"/") {
			got[k] = v
		}
	}
	want := map[string]string{
		f.key("backend-type"):        "vxlan",
		f.key("backend-data"):        `{"VNI":1,"VtepMAC":"26:ad:3e:11:22:33"}`,
		f.key("public-ip"):           "192.168.8.101",
		f.key("kube-subnet-manager"): "true",
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("annotations = %v, want exactly %v", got, want)
	}
	var cond *v1.NodeCondition
	for i := range n.Status.Conditions {
		if n.Status.Conditions[i].Type == v1.NodeNetworkUnavailable {
			cond = &n.Status.Conditions[i]
		}
	}
	if cond == nil || cond.Status != v1.ConditionFalse || cond.Reason != "FlannelIsUp" || cond.Message != "Flannel is running on this node" {
		t.Errorf("NetworkUnavailable condition = %+v, want False/FlannelIsUp", cond)
	}
	if n.Spec.PodCIDR != "10.5.34.0/24" || n.Labels["kubernetes.io/hostname"] != "wait-node" {
		t.Errorf("the status patch changed the node's spec or labels: %+v %v", n.Spec, n.Labels)
	}
}

func TestAcquireLeaseUDPAnnotations(t *testing.T) {
	f := newFixture(t)
	f.createNode("udp-node", "10.5.7.0/24", nil)
	m := f.manager(f.cfg, "udp-node")
	attrs := subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("192.168.8.7")}
	if _, err := m.AcquireLease(context.Background(), mustConfig(t), attrs, subnet.Lease{}); err != nil {
		t.Fatal(err)
	}
	n := f.getNode("udp-node")
	if v, ok := n.Annotations[f.key("backend-type")]; !ok || v != "" {
		t.Errorf("backend-type = %q (present %v), want the empty string as flannel's udp writes", v, ok)
	}
	if v := n.Annotations[f.key("backend-data")]; v != "null" {
		t.Errorf("backend-data = %q, want null", v)
	}
}

func TestAcquireLeasePublicIPOverwrite(t *testing.T) {
	f := newFixture(t)
	f.createNode("ow-node", "10.5.9.0/24", map[string]string{f.key("public-ip-overwrite"): "203.0.113.9"})
	m := f.manager(f.cfg, "ow-node")
	l, err := m.AcquireLease(context.Background(), mustConfig(t), vxlanAttrs("192.168.8.9"), subnet.Lease{})
	if err != nil {
		t.Fatal(err)
	}
	if l.Attrs.PublicIP != netip.MustParseAddr("203.0.113.9") {
		t.Errorf("lease PublicIP = %v, want the overwrite 203.0.113.9", l.Attrs.PublicIP)
	}
	if v := f.getNode("ow-node").Annotations[f.key("public-ip")]; v != "203.0.113.9" {
		t.Errorf("public-ip annotation = %q, want 203.0.113.9", v)
	}

	f.createNode("ow-bad", "10.5.10.0/24", map[string]string{f.key("public-ip-overwrite"): "not-an-ip"})
	_, err = f.manager(f.cfg, "ow-bad").AcquireLease(context.Background(), mustConfig(t), vxlanAttrs("192.168.8.10"), subnet.Lease{})
	if err == nil || !strings.Contains(err.Error(), "public-ip-overwrite") || !strings.Contains(err.Error(), "not-an-ip") {
		t.Errorf("bad overwrite: err = %v, want one naming the annotation and its value", err)
	}
}

func TestAcquireLeasePodCIDROutsideNetwork(t *testing.T) {
	f := newFixture(t)
	f.createNode("out-node", "10.6.1.0/24", nil)
	m := f.manager(f.cfg, "out-node")
	_, err := m.AcquireLease(context.Background(), mustConfig(t), vxlanAttrs("192.168.8.11"), subnet.Lease{})
	if !errors.Is(err, ErrPodCIDROutsideNetwork) || !errors.Is(err, subnet.ErrInvalidConfig) {
		t.Fatalf("err = %v, want ErrPodCIDROutsideNetwork and ErrInvalidConfig", err)
	}
	for _, s := range []string{"out-node", "10.6.1.0/24", "10.5.0.0/16", f.path, "--cluster-cidr"} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not name %s", err, s)
		}
	}
	if _, ok := f.getNode("out-node").Annotations[f.key("kube-subnet-manager")]; ok {
		t.Error("a refused lease was published")
	}
}

func TestAcquireLeaseMissingNode(t *testing.T) {
	f := newFixture(t)
	_, err := f.manager(f.cfg, "no-such-node").AcquireLease(context.Background(), mustConfig(t), vxlanAttrs("192.168.8.12"), subnet.Lease{})
	if err == nil || !strings.Contains(err.Error(), "no-such-node") || !strings.Contains(err.Error(), "NODE_NAME") {
		t.Errorf("err = %v, want one naming the node and NODE_NAME", err)
	}
}

func TestRenewLease(t *testing.T) {
	f := newFixture(t)
	f.createNode("renew-node", "10.5.12.0/24", nil)
	m := f.manager(f.cfg, "renew-node")
	ctx := context.Background()
	l, err := m.AcquireLease(ctx, mustConfig(t), vxlanAttrs("192.168.8.12"), subnet.Lease{})
	if err != nil {
		t.Fatal(err)
	}
	// An admin strips the annotations: renewal puts them back.
	f.updateNode("renew-node", func(n *v1.Node) { delete(n.Annotations, f.key("public-ip")) })
	if err := m.RenewLease(ctx, l); err != nil {
		t.Fatal(err)
	}
	if v := f.getNode("renew-node").Annotations[f.key("public-ip")]; v != "192.168.8.12" {
		t.Errorf("after renewal public-ip = %q, want 192.168.8.12", v)
	}
	if err := f.admin.CoreV1().Nodes().Delete(ctx, "renew-node", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := m.RenewLease(ctx, l); !errors.Is(err, subnet.ErrLeaseLost) {
		t.Errorf("renewal of a deleted node: err = %v, want ErrLeaseLost", err)
	}
}

// startWatch starts WatchLeases and returns its channel and a stop func.
func startWatch(t *testing.T, m *Manager) (<-chan []subnet.Event, func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	events := make(chan []subnet.Event)
	errc := make(chan error, 1)
	go func() { errc <- m.WatchLeases(ctx, events) }()
	stop := func() {
		cancel()
		if err := <-errc; !errors.Is(err, context.Canceled) {
			t.Errorf("WatchLeases returned %v, want context.Canceled", err)
		}
	}
	t.Cleanup(func() {
		select {
		case <-ctx.Done():
		default:
			stop()
		}
	})
	return events, stop
}

func next(t *testing.T, events <-chan []subnet.Event) []subnet.Event {
	t.Helper()
	select {
	case b := <-events:
		return b
	case <-time.After(30 * time.Second):
		t.Fatal("no lease event within 30 s")
		return nil
	}
}

func describe(batch []subnet.Event) string {
	var s []string
	for _, e := range batch {
		s = append(s, fmt.Sprintf("%v %v %v %s %s", e.Type, e.Lease.Subnet, e.Lease.Attrs.PublicIP, e.Lease.Attrs.BackendType, e.Lease.Attrs.BackendData))
	}
	return strings.Join(s, "; ")
}

func TestWatchLeasesEmptyFirstBatch(t *testing.T) {
	f := newFixture(t)
	events, _ := startWatch(t, f.manager(f.cfg, "me"))
	if b := next(t, events); b == nil || len(b) != 0 {
		t.Errorf("first batch = %v (nil %v), want an empty batch", describe(b), b == nil)
	}
}

func TestWatchLeases(t *testing.T) {
	f := newFixture(t)
	f.leaseNode("w-a", "10.5.1.0/24", "192.168.8.1")
	f.createNode("w-bare", "10.5.2.0/24", nil) // no annotations at all
	f.createNode("w-nocidr", "", map[string]string{f.key("kube-subnet-manager"): "true", f.key("public-ip"): "192.168.8.3"})
	f.createNode("w-bad", "10.5.4.0/24", map[string]string{f.key("kube-subnet-manager"): "true", f.key("public-ip"): "nonsense"})
	f.createNode("w-other", "10.5.5.0/24", map[string]string{"flannel.alpha.coreos.com/kube-subnet-manager": "true",
		"flannel.alpha.coreos.com/public-ip": "192.168.8.5"}) // another prefix

	events, stop := startWatch(t, f.manager(f.cfg, "me"))
	if got, want := describe(next(t, events)), `added 10.5.1.0/24 192.168.8.1 vxlan {"VNI":1,"VtepMAC":"82:4b:b6:2f:54:4e"}`; got != want {
		t.Fatalf("first batch = %s, want %s", got, want)
	}
	if n := f.logs.count(`"peer"="w-bad"`); n != 1 {
		t.Errorf("the bad node was logged %d times, want once", n)
	}

	f.leaseNode("w-d", "10.5.6.0/24", "192.168.8.6")
	if got, want := describe(next(t, events)), `added 10.5.6.0/24 192.168.8.6 vxlan {"VNI":1,"VtepMAC":"82:4b:b6:2f:54:4e"}`; got != want {
		t.Errorf("after adding w-d: %s, want %s", got, want)
	}

	// A change that is not of the lease sends nothing; the next event is
	// the public-ip change.
	f.updateNode("w-a", func(n *v1.Node) { n.Labels["role"] = "x" })
	f.updateNode("w-a", func(n *v1.Node) { n.Annotations[f.key("public-ip")] = "192.168.8.21" })
	if got, want := describe(next(t, events)), `added 10.5.1.0/24 192.168.8.21 vxlan {"VNI":1,"VtepMAC":"82:4b:b6:2f:54:4e"}`; got != want {
		t.Errorf("after changing w-a's public-ip: %s, want %s", got, want)
	}

	// The bad node becomes good: Added; updated again with the same
	// problem-free lease: nothing.
	f.updateNode("w-bad", func(n *v1.Node) { n.Annotations[f.key("public-ip")] = "192.168.8.4" })
	if got, want := describe(next(t, events)), `added 10.5.4.0/24 192.168.8.4  `; got != want {
		t.Errorf("after fixing w-bad: %s, want %s", got, want)
	}

	if err := f.admin.CoreV1().Nodes().Delete(context.Background(), "w-a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if got, want := describe(next(t, events)), `removed 10.5.1.0/24 192.168.8.21 vxlan {"VNI":1,"VtepMAC":"82:4b:b6:2f:54:4e"}`; got != want {
		t.Errorf("after deleting w-a: %s, want %s", got, want)
	}

	// Unmarking a node removes its lease.
	f.updateNode("w-d", func(n *v1.Node) { delete(n.Annotations, f.key("kube-subnet-manager")) })
	if got, want := describe(next(t, events)), `removed 10.5.6.0/24 192.168.8.6 vxlan {"VNI":1,"VtepMAC":"82:4b:b6:2f:54:4e"}`; got != want {
		t.Errorf("after unmarking w-d: %s, want %s", got, want)
	}
	stop()
	// Nothing of the watch runs on: no informer, reflector or watcher.
	waitFor(t, "the watch's goroutines to end", func() bool {
		buf := make([]byte, 1<<20)
		stacks := string(buf[:runtime.Stack(buf, true)])
		return !strings.Contains(stacks, "client-go/tools/cache.") && !strings.Contains(stacks, "subnet/kube.(*Manager).WatchLeases")
	})
}

func TestWatchLeasesSeesOwnAcquire(t *testing.T) {
	f := newFixture(t)
	f.createNode("own", "10.5.40.0/24", nil)
	m := f.manager(f.cfg, "own")
	events, _ := startWatch(t, m)
	if b := next(t, events); len(b) != 0 {
		t.Fatalf("first batch = %s, want empty", describe(b))
	}
	if _, err := m.AcquireLease(context.Background(), mustConfig(t), vxlanAttrs("192.168.8.40"), subnet.Lease{}); err != nil {
		t.Fatal(err)
	}
	if got, want := describe(next(t, events)), `added 10.5.40.0/24 192.168.8.40 vxlan {"VNI":1,"VtepMAC":"26:ad:3e:11:22:33"}`; got != want {
		t.Errorf("after acquiring: %s, want %s", got, want)
	}
}

func TestNodeName(t *testing.T) {
	s := apiServer(t)
	admin := s.Admin(t)
	cfg := s.Config(s.AdminToken)
	ctx := context.Background()
	env := func(kv ...string) func(string) string {
		m := map[string]string{}
		for i := 0; i < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return func(k string) string { return m[k] }
	}
	if n, err := NodeName(ctx, cfg, env("NODE_NAME", "n1", "POD_NAME", "x")); err != nil || n != "n1" {
		t.Errorf("NODE_NAME: %q, %v", n, err)
	}
	if _, err := NodeName(ctx, cfg, env()); !errors.Is(err, ErrNoNodeName) {
		t.Errorf("no env: err = %v, want ErrNoNodeName", err)
	}
	if _, err := NodeName(ctx, cfg, env("POD_NAME", "p")); err == nil || !strings.Contains(err.Error(), "POD_NAMESPACE") {
		t.Errorf("POD_NAME alone: err = %v, want one naming POD_NAMESPACE", err)
	}

	ns := fmt.Sprintf("nodename-test-%d", prefixSeq.Add(1))
	if _, err := admin.CoreV1().Namespaces().Create(ctx, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pod := &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "flannel-abc", Namespace: ns},
		Spec: v1.PodSpec{NodeName: "pod-node", HostNetwork: true,
			Containers: []v1.Container{{Name: "c", Image: "flanneld:latest"}}},
	}
	if _, err := admin.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if n, err := NodeName(ctx, cfg, env("POD_NAME", "flannel-abc", "POD_NAMESPACE", ns)); err != nil || n != "pod-node" {
		t.Errorf("POD_NAME path: %q, %v; want pod-node", n, err)
	}
	if _, err := NodeName(ctx, cfg, env("POD_NAME", "missing", "POD_NAMESPACE", ns)); err == nil || !strings.Contains(err.Error(), ns+"/missing") {
		t.Errorf("missing pod: err = %v, want one naming it", err)
	}
}

func TestNetworkConfigFile(t *testing.T) {
	f := newFixture(t)
	m := f.manager(f.cfg, "cfg-node")
	ctx := context.Background()
	cfg, err := m.GetNetworkConfig(ctx)
	if err != nil || cfg.Network != netip.MustParsePrefix("10.5.0.0/16") || cfg.BackendType != "vxlan" {
		t.Fatalf("GetNetworkConfig = %+v, %v", cfg, err)
	}
	if err := os.WriteFile(f.path, []byte(`{"Network":"10.5.0.0/16","SubnetLen":31}`), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = m.GetNetworkConfig(ctx)
	if !errors.Is(err, subnet.ErrInvalidConfig) || !strings.Contains(err.Error(), f.path) || !strings.Contains(err.Error(), "SubnetLen") {
		t.Errorf("invalid file: err = %v, want ErrInvalidConfig naming %s and SubnetLen", err, f.path)
	}

	// A missing file is waited for, logged once.
	missing := filepath.Join(t.TempDir(), "later.json")
	m2, _ := New(Options{Config: f.cfg, NodeName: "cfg-node", NetConfigPath: missing, PollInterval: 20 * time.Millisecond, Logger: f.logs.logger()})
	done := make(chan error, 1)
	go func() { _, err := m2.GetNetworkConfig(ctx); done <- err }()
	waitFor(t, "the missing-file log line", func() bool { return f.logs.count(missing) > 0 })
	writeAtomic(t, missing, netConf)
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("after the file appeared: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("GetNetworkConfig did not return after the file appeared")
	}
	if n := f.logs.count(missing); n != 1 {
		t.Errorf("the missing file was logged %d times, want once", n)
	}
}

func TestWatchConfig(t *testing.T) {
	f := newFixture(t)
	m := f.manager(f.cfg, "cfg-node")
	ctx, cancel := context.WithCancel(context.Background())
	updates := make(chan subnet.ConfigUpdate)
	errc := make(chan error, 1)
	go func() { errc <- m.WatchConfig(ctx, updates) }()
	recv := func() subnet.ConfigUpdate {
		t.Helper()
		select {
		case u := <-updates:
			return u
		case <-time.After(10 * time.Second):
			t.Fatal("no config update")
			return subnet.ConfigUpdate{}
		}
	}
	if u := recv(); u.Err != nil || u.Config.Network != netip.MustParsePrefix("10.5.0.0/16") {
		t.Fatalf("first update = %+v", u)
	}
	writeAtomic(t, f.path, `{"Network":"10.7.0.0/16"}`)
	if u := recv(); u.Err != nil || u.Config.Network != netip.MustParsePrefix("10.7.0.0/16") {
		t.Errorf("after a change = %+v", u)
	}
	writeAtomic(t, f.path, `{"Network":"bogus"}`)
	if u := recv(); !errors.Is(u.Err, subnet.ErrInvalidConfig) || !strings.Contains(u.Err.Error(), f.path) {
		t.Errorf("after an invalid write = %+v", u)
	}
	os.Remove(f.path)
	if u := recv(); !errors.Is(u.Err, subnet.ErrConfigMissing) || !strings.Contains(u.Err.Error(), f.path) {
		t.Errorf("after removal = %+v", u)
	}
	// Unchanged: nothing more within several intervals.
	select {
	case u := <-updates:
		t.Errorf("update without a change: %+v", u)
	case <-time.After(300 * time.Millisecond):
	}
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Errorf("WatchConfig returned %v", err)
	}
}

func TestAnnotationPrefix(t *testing.T) {
	for _, tc := range []struct{ prefix, key, err string }{
		{"flannel.alpha.coreos.com", "flannel.alpha.coreos.com/public-ip", ""},
		{"example.com/net", "example.com/net-public-ip", ""},
		{"example.com/", "example.com/public-ip", ""},
		{"a/b/c", "", "more than one slash"},
		{"bad_prefix!", "", "does not make valid annotation keys"},
	} {
		a, err := newAnnotations(tc.prefix)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q: err = %v, want %q", tc.prefix, err, tc.err)
			}
			continue
		}
		if err != nil || a.publicIP != tc.key {
			t.Errorf("%q: public-ip key %q, %v; want %q", tc.prefix, a.publicIP, err, tc.key)
		}
	}
}

// TestWatchLeasesAcrossRestart: the API server restarts (its watches end,
// connections are refused for a while); the watch carries on and reports
// what changed meanwhile and after.
func TestWatchLeasesAcrossRestart(t *testing.T) {
	s := kubetest.Start(t) // its own server: the others' tests keep theirs
	f := &fixture{t: t, admin: s.Admin(t), cfg: s.Config(s.AdminToken), prefix: testPrefix(t), path: writeConf(t, netConf), logs: &logLines{}}
	f.leaseNode("r-a", "10.5.61.0/24", "192.168.8.61")
	events, _ := startWatch(t, f.manager(f.cfg, "me"))
	if got, want := describe(next(t, events)), `added 10.5.61.0/24 192.168.8.61 vxlan {"VNI":1,"VtepMAC":"82:4b:b6:2f:54:4e"}`; got != want {
		t.Fatalf("first batch = %s, want %s", got, want)
	}
	if err := s.Restart(); err != nil {
		t.Fatal(err)
	}
	f.leaseNode("r-b", "10.5.62.0/24", "192.168.8.62")
	if got, want := describe(next(t, events)), `added 10.5.62.0/24 192.168.8.62 vxlan {"VNI":1,"VtepMAC":"82:4b:b6:2f:54:4e"}`; got != want {
		t.Errorf("after the restart: %s, want %s", got, want)
	}
}

const dualConf = `{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"vxlan"}}`

func TestAcquireLeaseDualStack(t *testing.T) {
	f := newFixture(t)
	writeAtomic(t, f.path, dualConf)
	m := f.manager(f.cfg, "dual-node")
	cfg, err := m.GetNetworkConfig(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	f.createNode("dual-node", "", nil)
	attrs := vxlanAttrs("192.168.8.70")
	attrs.PublicIPv6, attrs.BackendV6Data = netip.MustParseAddr("fd00::70"), []byte(`{"VNI":1,"VtepMAC":"26:ad:3e:11:22:34"}`)
	done := make(chan error, 1)
	var l *subnet.Lease
	go func() {
		var err error
		l, err = m.AcquireLease(context.Background(), cfg, attrs, subnet.Lease{})
		done <- err
	}()
	waitFor(t, "the wait for the podCIDRs", func() bool { return f.logs.count("Waiting for the node's podCIDR") > 0 })
	f.updateNode("dual-node", func(n *v1.Node) {
		n.Spec.PodCIDR, n.Spec.PodCIDRs = "10.5.70.0/24", []string{"10.5.70.0/24", "fc00:0:0:46::/64"}
	})
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if l.Subnet != netip.MustParsePrefix("10.5.70.0/24") || l.IPv6Subnet != netip.MustParsePrefix("fc00:0:0:46::/64") {
		t.Errorf("lease = %v and %v, want both podCIDRs", l.Subnet, l.IPv6Subnet)
	}
	want := map[string]string{
		f.key("backend-type"):        "vxlan",
		f.key("backend-data"):        `{"VNI":1,"VtepMAC":"26:ad:3e:11:22:33"}`,
		f.key("backend-v6-data"):     `{"VNI":1,"VtepMAC":"26:ad:3e:11:22:34"}`,
		f.key("public-ip"):           "192.168.8.70",
		f.key("public-ipv6"):         "fd00::70",
		f.key("kube-subnet-manager"): "true",
	}
	if got := f.ownAnnotations("dual-node"); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("annotations = %v, want exactly %v", got, want)
	}

	// IPv6 only: no IPv4 annotations.
	writeAtomic(t, f.path, `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"vxlan"}}`)
	if cfg, err = m.GetNetworkConfig(context.Background()); err != nil {
		t.Fatal(err)
	}
	f.createNode("v6-node", "fc00:0:0:47::/64", nil)
	m6 := f.manager(f.cfg, "v6-node")
	attrs.PublicIP, attrs.BackendData = netip.IPv4Unspecified(), nil
	if l, err = m6.AcquireLease(context.Background(), cfg, attrs, subnet.Lease{}); err != nil {
		t.Fatal(err)
	}
	if l.Subnet.IsValid() || l.IPv6Subnet != netip.MustParsePrefix("fc00:0:0:47::/64") {
		t.Errorf("IPv6-only lease = %v and %v", l.Subnet, l.IPv6Subnet)
	}
	want = map[string]string{
		f.key("backend-type"):        "vxlan",
		f.key("backend-v6-data"):     `{"VNI":1,"VtepMAC":"26:ad:3e:11:22:34"}`,
		f.key("public-ipv6"):         "fd00::70",
		f.key("kube-subnet-manager"): "true",
	}
	if got := f.ownAnnotations("v6-node"); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("IPv6-only annotations = %v, want exactly %v", got, want)
	}

	f.createNode("v6-out", "fd99::/64", nil)
	_, err = f.manager(f.cfg, "v6-out").AcquireLease(context.Background(), cfg, attrs, subnet.Lease{})
	if !errors.Is(err, ErrPodCIDROutsideNetwork) || !strings.Contains(err.Error(), "fd99::/64") || !strings.Contains(err.Error(), "fc00::/48") {
		t.Errorf("IPv6 podCIDR outside IPv6Network: err = %v", err)
	}
}

func TestWatchLeasesDualStack(t *testing.T) {
	f := newFixture(t)
	f.createNode("d-a", "", map[string]string{
		f.key("kube-subnet-manager"): "true",
		f.key("backend-type"):        "vxlan",
		f.key("backend-data"):        `{"VtepMAC":"82:4b:b6:2f:54:4e"}`,
		f.key("backend-v6-data"):     `{"VtepMAC":"82:4b:b6:2f:54:4f"}`,
		f.key("public-ip"):           "192.168.8.80",
		f.key("public-ipv6"):         "fd00::80",
	})
	f.updateNode("d-a", func(n *v1.Node) {
		n.Spec.PodCIDR, n.Spec.PodCIDRs = "10.5.80.0/24", []string{"10.5.80.0/24", "fc00:0:0:50::/64"}
	})
	f.createNode("d-6", "", map[string]string{
		f.key("kube-subnet-manager"): "true",
		f.key("backend-type"):        "vxlan",
		f.key("backend-v6-data"):     `{"VtepMAC":"82:4b:b6:2f:54:50"}`,
		f.key("public-ipv6"):         "fd00::81",
	})
	f.updateNode("d-6", func(n *v1.Node) { n.Spec.PodCIDR, n.Spec.PodCIDRs = "fc00:0:0:51::/64", []string{"fc00:0:0:51::/64"} })
	events, _ := startWatch(t, f.manager(f.cfg, "me"))
	got := map[string]subnet.Lease{}
	for _, e := range next(t, events) {
		got[e.Lease.Key().String()] = e.Lease
	}
	a, six := got["10.5.80.0/24"], got["fc00:0:0:51::/64"]
	if len(got) != 2 || a.IPv6Subnet != netip.MustParsePrefix("fc00:0:0:50::/64") || a.Attrs.PublicIPv6 != netip.MustParseAddr("fd00::80") ||
		string(a.Attrs.BackendV6Data) != `{"VtepMAC":"82:4b:b6:2f:54:4f"}` || a.Attrs.PublicIP != netip.MustParseAddr("192.168.8.80") {
		t.Errorf("dual-stack lease = %+v (all: %v)", a, got)
	}
	if six.Subnet.IsValid() || six.Attrs.PublicIPv6 != netip.MustParseAddr("fd00::81") || six.Attrs.PublicIP != netip.IPv4Unspecified() {
		t.Errorf("IPv6-only lease = %+v", six)
	}
}

// ownAnnotations are node's annotations of the fixture's prefix.
func (f *fixture) ownAnnotations(node string) map[string]string {
	got := map[string]string{}
	for k, v := range f.getNode(node).Annotations {
		if strings.HasPrefix(k, f.prefix+"/") {
			got[k] = v
		}
	}
	return got
}

// TestKeepNetworkUnavailable (--set-node-network-unavailable=false): the
// status patch publishes the annotations and leaves a NetworkUnavailable
// condition another component set (here True, as a cloud route controller
// leaves it) as it was, on acquire and on a renewal that republishes.
func TestKeepNetworkUnavailable(t *testing.T) {
	f := newFixture(t)
	f.createNode("keep-node", "10.5.11.0/24", nil)
	set := metav1.NewTime(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC))
	theirs := v1.NodeCondition{Type: v1.NodeNetworkUnavailable, Status: v1.ConditionTrue, Reason: "NoRouteCreated",
		Message: "set by someone else", LastTransitionTime: set, LastHeartbeatTime: set}
	n := f.getNode("keep-node")
	n.Status.Conditions = []v1.NodeCondition{theirs}
	if _, err := f.admin.CoreV1().Nodes().UpdateStatus(context.Background(), n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	m, err := New(Options{Config: f.cfg, NodeName: "keep-node", NetConfigPath: f.path, AnnotationPrefix: f.prefix,
		PollInterval: 50 * time.Millisecond, Logger: f.logs.logger(), KeepNetworkUnavailable: true})
	if err != nil {
		t.Fatal(err)
	}
	check := func(when string) {
		t.Helper()
		n := f.getNode("keep-node")
		if n.Annotations[f.key("public-ip")] != "192.168.8.11" {
			t.Errorf("%s: annotations not published: %v", when, n.Annotations)
		}
		if len(n.Status.Conditions) != 1 || !n.Status.Conditions[0].LastTransitionTime.Equal(&set) ||
			n.Status.Conditions[0].Status != v1.ConditionTrue || n.Status.Conditions[0].Reason != "NoRouteCreated" {
			t.Errorf("%s: conditions = %+v, want only the one set before, untouched", when, n.Status.Conditions)
		}
	}
	l, err := m.AcquireLease(context.Background(), mustConfig(t), vxlanAttrs("192.168.8.11"), subnet.Lease{})
	if err != nil {
		t.Fatal(err)
	}
	check("after AcquireLease")
	f.updateNode("keep-node", func(n *v1.Node) { delete(n.Annotations, f.key("public-ip")) })
	if err := m.RenewLease(context.Background(), l); err != nil {
		t.Fatal(err)
	}
	check("after RenewLease republished")

	// The default sets it False, over the same condition.
	m2 := f.manager(f.cfg, "keep-node")
	if _, err := m2.AcquireLease(context.Background(), mustConfig(t), vxlanAttrs("192.168.8.11"), subnet.Lease{}); err != nil {
		t.Fatal(err)
	}
	if c := f.getNode("keep-node").Status.Conditions; len(c) != 1 || c[0].Status != v1.ConditionFalse || c[0].Reason != "FlannelIsUp" {
		t.Errorf("default manager: conditions = %+v, want NetworkUnavailable False/FlannelIsUp", c)
	}
}
