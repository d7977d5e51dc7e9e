package kube

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"testing"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/restmapper"

	"github.com/flanneld-go/flanneld/internal/kubetest"
	"github.com/flanneld-go/flanneld/subnet"
)

const manifestPath = "../../dist/kube-flannel.yml"

// manifest returns the objects of dist/kube-flannel.yml.
func manifest(t *testing.T) []*unstructured.Unstructured {
	t.Helper()
	data, err := os.ReadFile(manifestPath)
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	var objs []*unstructured.Unstructured
	for {
		var o map[string]any
		if err := dec.Decode(&o); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("parsing %s: %v", manifestPath, err)
		}
		if o != nil {
			objs = append(objs, &unstructured.Unstructured{Object: o})
		}
	}
	return objs
}

// applier applies manifest objects with server-side apply.
type applier struct {
	dyn    dynamic.Interface
	mapper meta.RESTMapper
}

func newApplier(t *testing.T, s *kubetest.Server) *applier {
	t.Helper()
	cfg := s.Config(s.AdminToken)
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return &applier{dyn: dyn, mapper: restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(cs.Discovery()))}
}

func (a *applier) apply(ctx context.Context, o *unstructured.Unstructured, dryRun bool) error {
	gvk := o.GroupVersionKind()
	m, err := a.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		return err
	}
	var r dynamic.ResourceInterface = a.dyn.Resource(m.Resource)
	if m.Scope.Name() == meta.RESTScopeNameNamespace {
		r = a.dyn.Resource(m.Resource).Namespace(o.GetNamespace())
	}
	opts := metav1.ApplyOptions{FieldManager: "kube-test", Force: true}
	if dryRun {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	_, err = r.Apply(ctx, o.GetName(), o, opts)
	return err
}

func objectsOfKind(objs []*unstructured.Unstructured, kinds ...string) []*unstructured.Unstructured {
	var out []*unstructured.Unstructured
	for _, o := range objs {
		for _, k := range kinds {
			if o.GetKind() == k {
				out = append(out, o)
			}
		}
	}
	return out
}

// TestManifestDryRun: the whole manifest is accepted by the API server
// (server-side apply, dry run) once its namespace exists.
func TestManifestDryRun(t *testing.T) {
	s := apiServer(t)
	a := newApplier(t, s)
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
	for _, o := range objectsOfKind(objs, "Namespace") {
		if err := a.apply(ctx, o, false); err != nil {
			t.Fatalf("applying %s %s: %v", o.GetKind(), o.GetName(), err)
		}
	}
	for _, o := range objs {
		if err := a.apply(ctx, o, true); err != nil {
			t.Errorf("dry-run apply of %s %s rejected: %v", o.GetKind(), o.GetName(), err)
		}
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
	a := newApplier(t, s)
	ctx := context.Background()
	for _, o := range objectsOfKind(manifest(t), "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding") {
		if err := a.apply(ctx, o, false); err != nil {
			t.Fatalf("applying %s %s: %v", o.GetKind(), o.GetName(), err)
		}
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
	l, err := m.AcquireLease(ctx, mustConfig(t), vxlanAttrs("192.168.8.50"), netip.Prefix{})
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
