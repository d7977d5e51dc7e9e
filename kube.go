package main

import (
	"context"
	"errors"
	"os"
	"strings"

	"github.com/spf13/pflag"
	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/subnet"
	"github.com/flanneld-go/flanneld/subnet/kube"
)

// kubeFlags are the flags of --kube-subnet-mgr, named as flannel's.
type kubeFlags struct {
	subnetMgr        bool
	apiURL           string
	kubeconfig       string
	netConfigPath    string
	annotationPrefix string
	// setNodeNetworkUnavailable sets the node's NetworkUnavailable
	// condition False (flannel v0.28's default).
	setNodeNetworkUnavailable bool
}

func addKubeFlags(fs *pflag.FlagSet, k *kubeFlags) {
	fs.BoolVar(&k.subnetMgr, "kube-subnet-mgr", false, "contact the Kubernetes API for subnet assignment instead of etcd")
	fs.StringVar(&k.apiURL, "kube-api-url", "", "Kubernetes API server URL; with neither this nor --kubeconfig-file, the in-cluster config is used")
	fs.StringVar(&k.kubeconfig, "kubeconfig-file", "", "kubeconfig file location")
	fs.StringVar(&k.netConfigPath, "net-config-path", kube.DefaultNetConfigPath, "path to the network configuration file (with --kube-subnet-mgr)")
	fs.StringVar(&k.annotationPrefix, "kube-annotation-prefix", kube.DefaultAnnotationPrefix, "prefix of the node annotations (with --kube-subnet-mgr)")
	fs.BoolVar(&k.setNodeNetworkUnavailable, "set-node-network-unavailable", true, "set the node's NetworkUnavailable condition to False once the lease is published (with --kube-subnet-mgr); false leaves it alone")
}

// validate checks the flags that need no API server.
func (k *kubeFlags) validate() error {
	if strings.TrimSpace(k.netConfigPath) == "" {
		return errors.New("--net-config-path is empty: give the network config file, such as " + kube.DefaultNetConfigPath)
	}
	return kube.CheckAnnotationPrefix(k.annotationPrefix)
}

// newKubeManager creates the Kubernetes lease manager of the flags; it asks
// the API server for this node's name when only POD_NAME and POD_NAMESPACE
// are set.
func newKubeManager(ctx context.Context, k *kubeFlags, log klog.Logger) (subnet.Manager, error) {
	cfg, err := kube.RESTConfig(k.apiURL, k.kubeconfig)
	if err != nil {
		return nil, err
	}
	node, err := kube.NodeName(ctx, cfg, os.Getenv)
	if err != nil {
		return nil, err
	}
	kl := log.WithName("kube")
	log.Info("Using the Kubernetes API for leases", "node", node, "netConfig", k.netConfigPath,
		"annotationPrefix", strings.TrimSuffix(k.annotationPrefix, "/"))
	return kube.New(kube.Options{
		Config:           cfg,
		NodeName:         node,
		NetConfigPath:    k.netConfigPath,
		AnnotationPrefix: k.annotationPrefix,
		Logger:           &kl,

		KeepNetworkUnavailable: !k.setNodeNetworkUnavailable,
	})
}
