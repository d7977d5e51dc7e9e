package main

import (
	"strings"
	"testing"
)

func TestKubeFlags(t *testing.T) {
	f, err := parseFlags(nil, env(nil))
	if err != nil {
		t.Fatal(err)
	}
	if f.kube != (kubeFlags{netConfigPath: "/etc/kube-flannel/net-conf.json", annotationPrefix: "flannel.alpha.coreos.com", setNodeNetworkUnavailable: true}) {
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
		netConfigPath: "/etc/net.json", annotationPrefix: "example.com", setNodeNetworkUnavailable: true}
	if f.kube != want {
		t.Errorf("flags = %+v, want %+v", f.kube, want)
	}
}

func TestKubeFlagErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--kube-annotation-prefix=a/b/c"}, "--kube-annotation-prefix"},
		{[]string{"--kube-annotation-prefix=not valid!"}, "give a DNS name such as flannel.alpha.coreos.com"},
		{[]string{"--net-config-path= "}, "--net-config-path is empty"},
	} {
		_, err := parseFlags(tc.args, env(nil))
		if err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%v: err = %v, want one line with %q", tc.args, err, tc.want)
		}
	}
}
