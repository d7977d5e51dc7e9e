package kube

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"testing"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/flanneld-go/flanneld/internal/kubetest"
	"github.com/flanneld-go/flanneld/subnet"
)

const manifestPath = "../../dist/kube-flannel.yml"

// manifest returns the objects of dist/kube-flannel.yml.
func manifest(t *testing.T) []*unstructured.Unstructured {
	t.Helper()
	objs, err := kubetest.ReadManifest(manifestPath)
	if err != nil {
		t.Fatal(err)
	}
	return objs
}

func objectsOfKind(objs []*unstructured.Unstructured, kinds ...string) []*unstructured.Unstructured {
	var out []*unstructured.Unstructured
	for _, o := range objs {
		if slices.Contains(kinds, o.GetKind()) {
			out = append(out, o)
		}
	}
	return out
}

// TestManifestDryRun: the whole manifest is accepted by the API server
// (server-side apply, dry run) once its namespace exists.
func TestManifestDryRun(t *testing.T) {
	s := apiServer(t)
	ctx := context.Background()
	objs := manifest(t)
	kinds := map[string]int{}
	for _, o := range objs {
		kinds[o.GetKind()]++
	}
	for _, k := range []string{"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"} {
		if kinds[k] != 1 {
			t.Errorf("the manifest has %d %s objects, want 1", kinds[k], k)
		}
	}
	if err := s.Apply(ctx, manifestPath, false, "Namespace"); err != nil {
		t.Fatal(err)
	}
	if err := s.Apply(ctx, manifestPath, true); err != nil {
		t.Errorf("dry-run apply rejected: %v", err)
	}
	// The ConfigMap's net-conf.json is a valid network config.
	cm := objectsOfKind(objs, "ConfigMap")[0]
	conf, _, _ := unstructured.NestedString(cm.Object, "data", "net-conf.json")
	if _, err := subnet.ParseConfig([]byte(conf)); err != nil {
		t.Errorf("net-conf.json of the ConfigMap: %v", err)
	}
	if cni, _, _ := unstructured.NestedString(cm.Object, "data", "cni-conf.json"); !bytes.Contains([]byte(cni), []byte(`"type": "flannel"`)) {
		t.Errorf("cni-conf.json does not use the flannel CNI plugin: %s", cni)
	}
}

// TestRBAC runs the manager with a token bound to exactly the ClusterRole of
// dist/kube-flannel.yml (applied from the file): it finds its node through
// its pod, waits for and publishes its lease and watches the others; and it
// cannot do more than that.
func TestRBAC(t *testing.T) {
	s := apiServer(t)
	ctx := context.Background()
	if err := s.Apply(ctx, manifestPath, false, "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"); err != nil {
		t.Fatal(err)
	}
	f := newFixture(t)
	f.createNode("rbac-node", "10.5.50.0/24", nil)
	f.leaseNode("rbac-peer", "10.5.51.0/24", "192.168.8.51")
	pod := &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("kube-flannel-ds-%d", prefixSeq.Add(1)), Namespace: kubetest.FlannelNamespace},
		Spec: v1.PodSpec{NodeName: "rbac-node", HostNetwork: true, ServiceAccountName: kubetest.FlannelServiceAccount,
			Containers: []v1.Container{{Name: "kube-flannel", Image: "flanneld:latest"}}},
	}
	if _, err := f.admin.CoreV1().Pods(kubetest.FlannelNamespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		f.admin.CoreV1().Pods(kubetest.FlannelNamespace).Delete(context.Background(), pod.Name, *metav1.NewDeleteOptions(0))
	})

	flannel, err := s.Client(s.FlannelToken)
	if err != nil {
		t.Fatal(err)
	}
	flannelCfg := s.Config(s.FlannelToken)
	name, err := NodeName(ctx, flannelCfg, func(k string) string {
		return map[string]string{"POD_NAME": pod.Name, "POD_NAMESPACE": pod.Namespace}[k]
	})
	if err != nil || name != "rbac-node" {
		t.Fatalf("NodeName as flannel: %q, %v", name, err)
	}
	m := f.manager(flannelCfg, name)
	l, err := m.AcquireLease(ctx, mustConfig(t), vxlanAttrs("192.168.8.50"), subnet.Lease{})
	if err != nil {
		t.Fatalf("AcquireLease as flannel: %v", err)
	}
	if err := m.RenewLease(ctx, l); err != nil {
		t.Errorf("RenewLease as flannel: %v", err)
	}
	events, _ := startWatch(t, m)
	got := describe(next(t, events))
	want := `added 10.5.50.0/24 192.168.8.50 vxlan {"VNI":1,"VtepMAC":"26:ad:3e:11:22:33"}; added 10.5.51.0/24 192.168.8.51 vxlan {"VNI":1,"VtepMAC":"82:4b:b6:2f:54:4e"}`
	want2 := `added 10.5.51.0/24 192.168.8.51 vxlan {"VNI":1,"VtepMAC":"82:4b:b6:2f:54:4e"}; added 10.5.50.0/24 192.168.8.50 vxlan {"VNI":1,"VtepMAC":"26:ad:3e:11:22:33"}`
	if got != want && got != want2 {
		t.Errorf("first batch as flannel = %s, want both leases", got)
	}

	// No more than the role: no update of a node's spec, no node
	// deletion, no reading of secrets or of other namespaces' pods' lists.
	forbidden := map[string]error{}
	n, _ := flannel.CoreV1().Nodes().Get(ctx, "rbac-peer", metav1.GetOptions{})
	if n != nil {
		_, forbidden["update node"] = flannel.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{})
	}
	forbidden["delete node"] = flannel.CoreV1().Nodes().Delete(ctx, "rbac-peer", metav1.DeleteOptions{})
	_, forbidden["list pods"] = flannel.CoreV1().Pods(kubetest.FlannelNamespace).List(ctx, metav1.ListOptions{})
	_, forbidden["list secrets"] = flannel.CoreV1().Secrets(kubetest.FlannelNamespace).List(ctx, metav1.ListOptions{})
	_, forbidden["patch node"] = flannel.CoreV1().Nodes().Patch(ctx, "rbac-peer", "application/strategic-merge-patch+json",
		[]byte(`{"metadata":{"labels":{"x":"y"}}}`), metav1.PatchOptions{})
	for what, err := range forbidden {
		if !apierrors.IsForbidden(err) {
			t.Errorf("%s as flannel: err = %v, want Forbidden", what, err)
		}
	}
}
