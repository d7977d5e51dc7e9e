package main

import "testing"

func TestKubeFlags(t *testing.T) {
	f, err := parseFlags(nil, env(nil))
	if err != nil {
		t.Fatal(err)
	}
	if f.kube != (kubeFlags{netConfigPath: "/etc/kube-flannel/net-conf.json", annotationPrefix: "flannel.alpha.coreos.com"}) {
		t.Errorf("defaults = %+v", f.kube)
	}
	f, err = parseFlags([]string{"--kube-api-url=https://10.0.0.1:6443"}, env(map[string]string{
		"FLANNELD_KUBE_SUBNET_MGR":        "true",
		"FLANNELD_KUBECONFIG_FILE":        "/etc/kubeconfig",
		"FLANNELD_NET_CONFIG_PATH":        "/etc/net.json",
		"FLANNELD_KUBE_ANNOTATION_PREFIX": "example.com",
		"FLANNELD_KUBE_API_URL":           "https://ignored",
	}))
	if err != nil {
		t.Fatal(err)
	}
	want := kubeFlags{subnetMgr: true, apiURL: "https://10.0.0.1:6443", kubeconfig: "/etc/kubeconfig",
		netConfigPath: "/etc/net.json", annotationPrefix: "example.com"}
	if f.kube != want {
		t.Errorf("flags = %+v, want %+v", f.kube, want)
	}
}
