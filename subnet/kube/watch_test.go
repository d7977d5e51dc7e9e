package kube

import (
	"fmt"
	"slices"
	"testing"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
)

// TestSlimNode: the informer keeps a node's name and, for a lease, its
// podCIDRs and the lease annotations' values, nothing else; a node that is
// not a lease keeps only its name.
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
				"flannel.alpha.coreos.com/public-ipv6":         "",
				"flannel.alpha.coreos.com/kube-subnet-manager": "true",
				"flannel.alpha.coreos.com/public-ip-overwrite": "203.0.113.1",
				"node.alpha.kubernetes.io/ttl":                 "0",
			}},
		Spec:   v1.NodeSpec{PodCIDR: "10.5.1.0/24", PodCIDRs: []string{"10.5.1.0/24", "fc00::/64"}, ProviderID: "x"},
		Status: v1.NodeStatus{Images: []v1.ContainerImage{{Names: []string{"big"}}}, Addresses: []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: "192.168.8.1"}}},
	}
	got, err := m.slimNode(full)
	if err != nil {
		t.Fatal(err)
	}
	want := &watchedNode{
		ObjectMeta:  metav1.ObjectMeta{Name: "n1"},
		podCIDRs:    []string{"10.5.1.0/24", "fc00::/64"},
		backendType: "vxlan", backendData: `{"VtepMAC":"82:4b:b6:2f:54:4e"}`,
		publicIP: "192.168.8.1", hasPublicIP: true, hasPublicIPv6: true,
	}
	if fmt.Sprintf("%#v", got) != fmt.Sprintf("%#v", want) {
		t.Errorf("slim node =\n%#v\nwant\n%#v", got, want)
	}
	if again, _ := m.slimNode(got); again != got {
		t.Errorf("a watchedNode transforms to %#v, want itself", again)
	}
	if key, err := cache.MetaNamespaceKeyFunc(got); key != "n1" || err != nil {
		t.Errorf("the informer's key of a watchedNode = %q, %v; want n1", key, err)
	}

	old := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "old", Annotations: full.Annotations}, Spec: v1.NodeSpec{PodCIDR: "10.5.2.0/24"}}
	if n, _ := m.slimNode(old); !slices.Equal(n.(*watchedNode).podCIDRs, []string{"10.5.2.0/24"}) {
		t.Errorf("a node with only spec.podCIDR slims to %#v", n)
	}
	for _, n := range []*v1.Node{
		{ObjectMeta: metav1.ObjectMeta{Name: "other", Annotations: map[string]string{"flannel.alpha.coreos.com/public-ip": "192.168.8.2"}},
			Spec: v1.NodeSpec{PodCIDR: "10.5.3.0/24"}},
		{ObjectMeta: metav1.ObjectMeta{Name: "nocidr", Annotations: full.Annotations}},
	} {
		got, _ := m.slimNode(n)
		if want := (&watchedNode{ObjectMeta: metav1.ObjectMeta{Name: n.Name}}); fmt.Sprintf("%#v", got) != fmt.Sprintf("%#v", want) {
			t.Errorf("node %s, not a lease, slims to %#v; want only its name", n.Name, got)
		}
	}
}
