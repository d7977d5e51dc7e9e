package kube

import (
	"fmt"
	"testing"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestSlimNode: the informer keeps a node's name, version, podCIDRs and the
// lease annotations, nothing else.
func TestSlimNode(t *testing.T) {
	keys, err := newAnnotations(DefaultAnnotationPrefix)
	if err != nil {
		t.Fatal(err)
	}
	m := &Manager{keys: keys}
	full := &v1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "n1", ResourceVersion: "42", UID: "u", Labels: map[string]string{"a": "b"},
			Annotations: map[string]string{
				"flannel.alpha.coreos.com/backend-type":        "vxlan",
				"flannel.alpha.coreos.com/backend-data":        `{"VtepMAC":"82:4b:b6:2f:54:4e"}`,
				"flannel.alpha.coreos.com/public-ip":           "192.168.8.1",
				"flannel.alpha.coreos.com/kube-subnet-manager": "true",
				"flannel.alpha.coreos.com/public-ip-overwrite": "203.0.113.1",
				"node.alpha.kubernetes.io/ttl":                 "0",
			}},
		Spec:   v1.NodeSpec{PodCIDR: "10.5.1.0/24", PodCIDRs: []string{"10.5.1.0/24"}, ProviderID: "x"},
		Status: v1.NodeStatus{Images: []v1.ContainerImage{{Names: []string{"big"}}}, Addresses: []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: "192.168.8.1"}}},
	}
	got, err := m.slimNode(full)
	if err != nil {
		t.Fatal(err)
	}
	want := &v1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "n1", ResourceVersion: "42", Annotations: map[string]string{
			"flannel.alpha.coreos.com/backend-type":        "vxlan",
			"flannel.alpha.coreos.com/backend-data":        `{"VtepMAC":"82:4b:b6:2f:54:4e"}`,
			"flannel.alpha.coreos.com/public-ip":           "192.168.8.1",
			"flannel.alpha.coreos.com/kube-subnet-manager": "true",
		}},
		Spec: v1.NodeSpec{PodCIDR: "10.5.1.0/24", PodCIDRs: []string{"10.5.1.0/24"}},
	}
	if fmt.Sprintf("%+v", got) != fmt.Sprintf("%+v", want) {
		t.Errorf("slim node =\n%+v\nwant\n%+v", got, want)
	}
	bare, _ := m.slimNode(&v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "bare"}})
	if n := bare.(*v1.Node); n.Annotations != nil || n.Name != "bare" {
		t.Errorf("a node without annotations slims to %+v", n)
	}
}
