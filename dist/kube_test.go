package dist

import (
	"path"
	"slices"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/flanneld-go/flanneld/e2e/lab"
	"github.com/flanneld-go/flanneld/internal/kubetest"
	"github.com/flanneld-go/flanneld/subnet/kube"
)

// TestKubeManifestDaemonSet checks what the API server cannot (its
// acceptance of the manifest is tested in subnet/kube): the DaemonSet runs
// the image's binary with flags the daemon accepts, gives it NODE_NAME and
// mounts the ConfigMap's net-conf.json where --net-config-path looks by
// default, and shares /run/flannel with the host.
func TestKubeManifestDaemonSet(t *testing.T) {
	objs, err := kubetest.ReadManifest("kube-flannel.yml")
	if err != nil {
		t.Fatal(err)
	}
	var ds *unstructured.Unstructured
	for _, o := range objs {
		if o.GetKind() == "DaemonSet" {
			ds = o
		}
	}
	if ds == nil {
		t.Fatal("kube-flannel.yml has no DaemonSet")
	}
	containers, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", "containers")
	if len(containers) != 1 {
		t.Fatalf("the DaemonSet has %d containers, want 1", len(containers))
	}
	c := containers[0].(map[string]any)
	command, _, _ := unstructured.NestedStringSlice(c, "command")
	args, _, _ := unstructured.NestedStringSlice(c, "args")
	if !slices.Equal(command, []string{"/opt/bin/flanneld"}) {
		t.Errorf("command = %q, want the image's /opt/bin/flanneld", command)
	}
	if !slices.Contains(args, "--kube-subnet-mgr") {
		t.Errorf("args %q lack --kube-subnet-mgr", args)
	}
	res := run(t, envWithout("FLANNELD_"), append([]string{lab.BuildDaemon(t)}, append(args, "--version")...)...)
	if res.code != 0 {
		t.Errorf("flanneld %s: exit %d: %s", strings.Join(args, " "), res.code, res.stderr)
	}

	env, _, _ := unstructured.NestedSlice(c, "env")
	nodeName := false
	for _, e := range env {
		e := e.(map[string]any)
		field, _, _ := unstructured.NestedString(e, "valueFrom", "fieldRef", "fieldPath")
		nodeName = nodeName || (e["name"] == "NODE_NAME" && field == "spec.nodeName")
	}
	if !nodeName {
		t.Errorf("the container has no NODE_NAME from spec.nodeName: %v", env)
	}
	if hn, _, _ := unstructured.NestedBool(ds.Object, "spec", "template", "spec", "hostNetwork"); !hn {
		t.Error("the DaemonSet does not use the host network")
	}
	caps, _, _ := unstructured.NestedStringSlice(c, "securityContext", "capabilities", "add")
	if !slices.Contains(caps, "NET_ADMIN") || !slices.Contains(caps, "NET_RAW") {
		t.Errorf("capabilities %q, want NET_ADMIN and NET_RAW", caps)
	}

	mounts := map[string]string{} // volume name → mount path
	ms, _, _ := unstructured.NestedSlice(c, "volumeMounts")
	for _, m := range ms {
		m := m.(map[string]any)
		mounts[m["name"].(string)] = m["mountPath"].(string)
	}
	vols, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", "volumes")
	cfgDir, runDir := "", ""
	for _, v := range vols {
		v := v.(map[string]any)
		name := v["name"].(string)
		if cm, ok, _ := unstructured.NestedString(v, "configMap", "name"); ok && cm == "kube-flannel-cfg" {
			cfgDir = mounts[name]
		}
		if hp, ok, _ := unstructured.NestedString(v, "hostPath", "path"); ok && hp == "/run/flannel" {
			runDir = mounts[name]
		}
	}
	if path.Join(cfgDir, "net-conf.json") != kube.DefaultNetConfigPath {
		t.Errorf("the ConfigMap is mounted at %q, want the directory of %s", cfgDir, kube.DefaultNetConfigPath)
	}
	if runDir != "/run/flannel" {
		t.Errorf("/run/flannel of the host is mounted at %q, want /run/flannel (subnet.env for the CNI plugin)", runDir)
	}
}
