package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/flanneld-go/flanneld/e2e/lab"
	"github.com/flanneld-go/flanneld/internal/kubetest"
)

// kubeLab is a lab whose daemons run with --kube-subnet-mgr against a real
// kube-apiserver listening on the LAN namespace's address (and its etcd on
// that namespace's loopback): nothing leaves the lab's namespaces.
type kubeLab struct {
	*lab.Lab
	api   *kubetest.Server
	admin kubernetes.Interface
	args  []string // the daemons' kube flags
}

const annotationPrefix = "flannel.alpha.coreos.com/"

// newKubeLab builds a lab of n hosts and the API server, writes config as
// the daemons' --net-config-path, and registers host i as Node "host<i>"
// with podCIDR 10.5.<i>.0/24, as a kubelet and kube-controller-manager
// would. The daemons find their node through NODE_NAME.
func newKubeLab(t *testing.T, n int, config string) *kubeLab {
	t.Helper()
	return newKubeLabWith(t, newLab(t, n, ""), config, func(i int) []netip.Prefix {
		return []netip.Prefix{netip.MustParsePrefix(fmt.Sprintf("10.5.%d.0/24", i))}
	})
}

// newKubeLabWith is newKubeLab on the lab l, host i (1-based) getting the
// podCIDRs podCIDRs(i).
func newKubeLabWith(t *testing.T, l *lab.Lab, config string, podCIDRs func(i int) []netip.Prefix) *kubeLab {
	t.Helper()
	s, err := kubetest.New(kubetest.WithNetNS(filepath.Join("/run/netns", l.LANNamespace()), l.EtcdAddr()))
	if err != nil {
		t.Fatal(err)
	}
	// Registered after the lab's cleanups, so it runs before them: the
	// API server goes before its namespace does.
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("stopping kube-apiserver: %v", err)
		}
	})
	k := &kubeLab{Lab: l, api: s, admin: s.Admin(t)}
	conf := filepath.Join(l.Dir(), "net-conf.json")
	kubeconfig := filepath.Join(l.Dir(), "kubeconfig")
	if err := os.WriteFile(conf, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	// The daemons run as flannel's service account with exactly the RBAC
	// of dist/kube-flannel.yml.
	if err := s.Apply(context.Background(), "../dist/kube-flannel.yml", false, "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"); err != nil {
		t.Fatal(err)
	}
	if err := s.WriteKubeconfig(kubeconfig, s.FlannelToken); err != nil {
		t.Fatal(err)
	}
	k.args = []string{"--kube-subnet-mgr", "--kubeconfig-file", kubeconfig, "--net-config-path", conf}
	for i, h := range l.Hosts() {
		k.registerNode(t, h, podCIDRs(i+1)...)
		h.DaemonEnv = []string{"NODE_NAME=" + h.Name}
	}
	return k
}

// registerNode creates h's Node as a kubelet does (addresses, Ready), then
// sets its podCIDR as kube-controller-manager does.
func (k *kubeLab) registerNode(t *testing.T, h *lab.Host, podCIDRs ...netip.Prefix) {
	t.Helper()
	ctx := context.Background()
	n := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: h.Name, Labels: map[string]string{
		"kubernetes.io/hostname": h.Name, "kubernetes.io/os": "linux"}}}
	n, err := k.admin.CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	n.Status = v1.NodeStatus{
		Addresses:  []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: h.Addr.String()}, {Type: v1.NodeHostName, Address: h.Name}},
		Conditions: []v1.NodeCondition{{Type: v1.NodeReady, Status: v1.ConditionTrue, Reason: "KubeletReady", LastHeartbeatTime: metav1.Now(), LastTransitionTime: metav1.Now()}},
	}
	if n, err = k.admin.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, p := range podCIDRs {
		n.Spec.PodCIDRs = append(n.Spec.PodCIDRs, p.String())
	}
	n.Spec.PodCIDR = n.Spec.PodCIDRs[0]
	if _, err := k.admin.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// overlayRouteTo reports whether h has a route to dst.
func overlayRouteTo(h *lab.Host, dst netip.Prefix) (bool, error) {
	rs, err := overlayRoutes(h)
	return slices.ContainsFunc(rs, func(r route) bool { return r.Dst == dst }), err
}

// TestKube runs three hosts with --kube-subnet-mgr on each backend: each
// daemon's subnet is its node's podCIDR and is published on its Node;
// every overlay address reaches every other (6/6 pairs); a restarted
// daemon leaves the routes in place while down and works on; a deleted
// node's routes go.
func TestKube(t *testing.T) {
	t.Parallel()
	for _, backend := range []string{"vxlan", "host-gw", "udp"} {
		t.Run(backend, func(t *testing.T) {
			testKube(t, backend)
		})
	}
}

func testKube(t *testing.T, backend string) {
	needRoot(t)
	k := newKubeLab(t, 3, `{"Network":"10.5.0.0/16","Backend":{"Type":"`+backend+`"}}`)
	ctx := testCtx(t, converge)
	hosts := k.Hosts()
	envs := startAll(t, k.Lab, k.args...)
	wantType := backend
	if backend == "udp" {
		wantType = "" // flannel's udp publishes no backend type
	}
	for i, h := range hosts {
		want := netip.MustParsePrefix(fmt.Sprintf("10.5.%d.1/24", i+1))
		if envs[i].Subnet != want || envs[i].Network != network {
			t.Errorf("%s subnet.env: FLANNEL_SUBNET=%s FLANNEL_NETWORK=%s, want %s in %s (the podCIDR)", h.Name, envs[i].Subnet, envs[i].Network, want, network)
		}
		n, err := k.admin.CoreV1().Nodes().Get(ctx, h.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if n.Annotations[annotationPrefix+"public-ip"] != h.Addr.String() || n.Annotations[annotationPrefix+"kube-subnet-manager"] != "true" ||
			n.Annotations[annotationPrefix+"backend-type"] != wantType {
			t.Errorf("%s annotations = %v, want public-ip %s, backend-type %q, kube-subnet-manager true", h.Name, n.Annotations, h.Addr, wantType)
		}
	}
	for i, h := range hosts {
		if err := h.SetBridgeAddr(envs[i].Subnet); err != nil {
			t.Fatal(err)
		}
	}
	pingAll(t, hosts, envs)
	if t.Failed() {
		return
	}

	// A daemon restart keeps the routes (the kernel state stays while it
	// is down) and the daemon picks up where it was.
	h1 := hosts[0]
	before, err := overlayRoutes(h1)
	if err != nil {
		t.Fatal(err)
	}
	if code := stop(t, h1.Daemon()); code != 0 {
		t.Errorf("%s daemon exited %d on SIGTERM, want 0", h1.Name, code)
	}
	// udp's flannel0 is a TUN device that lives only as long as the
	// daemon holds it open; routes of the other backends stay.
	if after, err := overlayRoutes(h1); backend != "udp" && (err != nil || !slices.Equal(after, before)) {
		t.Errorf("%s routes with the daemon stopped = %v (%v), want %v", h1.Name, after, err, before)
	}
	startDaemon(t, h1, k.args...)
	waitEnv(t, h1)
	pingAll(t, hosts, envs)

	// Node 3 is deleted: the others drop its routes (udp has none per
	// node: flannel0 carries the whole Network).
	if backend == "udp" {
		return
	}
	gone := envs[2].Subnet.Masked()
	if err := k.admin.CoreV1().Nodes().Delete(ctx, hosts[2].Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, h := range hosts[:2] {
		eventually(t, "route to "+gone.String()+" gone on "+h.Name, func() error {
			has, err := overlayRouteTo(h, gone)
			if err == nil && has {
				err = fmt.Errorf("%s still routes %s", h.Name, gone)
			}
			return err
		})
	}
	if err := hosts[0].WaitPing(ctx, envs[0].Subnet.Addr(), envs[1].Subnet.Addr()); err != nil {
		t.Errorf("host1 -> host2 after host3 left: %v", err)
	}
}

// TestKubeBadStart: a daemon with no NODE_NAME (nor POD_*) exits with one
// line saying so; one whose podCIDR lies outside Network logs a line naming
// both and publishes nothing.
func TestKubeBadStart(t *testing.T) {
	t.Parallel()
	needRoot(t)
	k := newKubeLab(t, 2, `{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}`)
	ctx := testCtx(t, converge)
	h1, h2 := k.Host(1), k.Host(2)
	h1.DaemonEnv = nil
	d := startDaemon(t, h1, k.args...)
	code := waitExit(t, d)
	checkFailedStart(ctx, t, k.Lab, h1, code, d.Log(), []string{"NODE_NAME", "POD_NAME"})

	if err := k.admin.CoreV1().Nodes().Delete(ctx, h2.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	k.registerNode(t, h2, netip.MustParsePrefix("10.6.2.0/24"))
	d = startDaemon(t, h2, k.args...)
	eventually(t, "the outside-Network error in the log of "+h2.Name, func() error {
		log := d.Log()
		for _, s := range []string{"10.6.2.0/24", "10.5.0.0/16", "--cluster-cidr"} {
			if !strings.Contains(log, s) {
				return fmt.Errorf("log does not name %s yet", s)
			}
		}
		return nil
	})
	d.Signal(syscall.SIGTERM)
	waitExit(t, d)
	if _, err := os.Stat(h2.SubnetFile); err == nil {
		t.Errorf("%s wrote subnet.env with a podCIDR outside Network", h2.Name)
	}
}

// TestKubePodName: a daemon with only POD_NAME and POD_NAMESPACE (as the
// DaemonSet's downward API gives them) finds its node through its pod.
func TestKubePodName(t *testing.T) {
	t.Parallel()
	needRoot(t)
	k := newKubeLab(t, 1, `{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}`)
	h := k.Host(1)
	pod := &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "kube-flannel-ds-abcde", Namespace: kubetest.FlannelNamespace},
		Spec: v1.PodSpec{NodeName: h.Name, HostNetwork: true, ServiceAccountName: kubetest.FlannelServiceAccount,
			Containers: []v1.Container{{Name: "kube-flannel", Image: "flanneld:latest"}}},
	}
	if _, err := k.admin.CoreV1().Pods(pod.Namespace).Create(context.Background(), pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	h.DaemonEnv = []string{"POD_NAME=" + pod.Name, "POD_NAMESPACE=" + pod.Namespace}
	startDaemon(t, h, k.args...)
	if env := waitEnv(t, h); env.Subnet != netip.MustParsePrefix("10.5.1.1/24") {
		t.Errorf("FLANNEL_SUBNET = %s, want 10.5.1.1/24 (the podCIDR of %s)", env.Subnet, h.Name)
	}
}

// TestKubeDualStack: three dual-stack hosts on vxlan with IPv4 and IPv6
// podCIDRs; each publishes both families and every overlay address reaches
// every other over IPv4 and IPv6.
func TestKubeDualStack(t *testing.T) {
	t.Parallel()
	needRoot(t)
	bin := lab.BuildDaemon(t)
	l := lab.Start(t, lab.Options{Hosts: 3, DaemonPath: bin, LAN6: netip.MustParsePrefix("fd5e::/64")})
	t.Cleanup(func() { stopAll(t, l) })
	k := newKubeLabWith(t, l, `{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"vxlan"}}`,
		func(i int) []netip.Prefix {
			return []netip.Prefix{netip.MustParsePrefix(fmt.Sprintf("10.5.%d.0/24", i)), netip.MustParsePrefix(fmt.Sprintf("fc00:0:0:%d::/64", i))}
		})
	ctx := testCtx(t, converge)
	hosts := k.Hosts()
	envs := startAll(t, k.Lab, k.args...)
	subnets6 := make([]netip.Prefix, len(hosts))
	for i, h := range hosts {
		want6 := netip.MustParsePrefix(fmt.Sprintf("fc00:0:0:%d::1/64", i+1))
		if got := envs[i].Vars["FLANNEL_IPV6_SUBNET"]; got != want6.String() {
			t.Errorf("%s FLANNEL_IPV6_SUBNET = %q, want %s", h.Name, got, want6)
		}
		subnets6[i] = want6
		n, err := k.admin.CoreV1().Nodes().Get(ctx, h.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if n.Annotations[annotationPrefix+"public-ipv6"] != h.Addr6.String() || n.Annotations[annotationPrefix+"backend-v6-data"] == "" {
			t.Errorf("%s annotations = %v, want public-ipv6 %s and backend-v6-data", h.Name, n.Annotations, h.Addr6)
		}
		if err := h.SetBridgeAddr(envs[i].Subnet); err != nil {
			t.Fatal(err)
		}
		if err := h.SetBridgeAddr(want6); err != nil {
			t.Fatal(err)
		}
	}
	pingAll(t, hosts, envs)
	pairs := 0
	for i, from := range hosts {
		for j := range hosts {
			if i == j {
				continue
			}
			if err := from.WaitPing(ctx, subnets6[i].Addr(), subnets6[j].Addr()); err != nil {
				t.Errorf("overlay ping -6 %s -> %s: %v", from.Name, hosts[j].Name, err)
				continue
			}
			pairs++
		}
	}
	t.Logf("overlay IPv6 pings: %d/%d pairs", pairs, len(hosts)*(len(hosts)-1))
}
