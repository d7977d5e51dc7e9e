package kube

import (
	"context"
	"errors"
	"fmt"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// ErrNoNodeName: neither NODE_NAME nor POD_NAME and POD_NAMESPACE are set.
var ErrNoNodeName = errors.New("the node name is unknown: set NODE_NAME (in the DaemonSet: env NODE_NAME valueFrom fieldRef spec.nodeName), or POD_NAME and POD_NAMESPACE")

// NodeName finds the node this daemon runs on as flannel does: env
// NODE_NAME, else the spec.nodeName of the pod POD_NAMESPACE/POD_NAME.
func NodeName(ctx context.Context, cfg *rest.Config, getenv func(string) string) (string, error) {
	if n := getenv("NODE_NAME"); n != "" {
		return n, nil
	}
	pod, ns := getenv("POD_NAME"), getenv("POD_NAMESPACE")
	switch {
	case pod == "" && ns == "":
		return "", ErrNoNodeName
	case pod == "":
		return "", fmt.Errorf("POD_NAMESPACE is set but POD_NAME is not: set both (downward API metadata.name and metadata.namespace), or NODE_NAME")
	case ns == "":
		return "", fmt.Errorf("POD_NAME is set but POD_NAMESPACE is not: set both (downward API metadata.name and metadata.namespace), or NODE_NAME")
	}
	c, err := newClient(cfg)
	if err != nil {
		return "", err
	}
	p, err := c.getPod(ctx, ns, pod)
	if err != nil {
		return "", fmt.Errorf("getting pod %s/%s to find its node (POD_NAME, POD_NAMESPACE): %w", ns, pod, err)
	}
	if p.Spec.NodeName == "" {
		return "", fmt.Errorf("pod %s/%s has no spec.nodeName: it is not scheduled; set NODE_NAME instead", ns, pod)
	}
	return p.Spec.NodeName, nil
}

// RESTConfig is the client config of the flags: the kubeconfig file and/or
// the API server URL (the URL overrides the file's server), or the
// in-cluster config (the pod's service account) when both are empty.
// Objects are read as protobuf, which decodes a large node list faster and
// in less memory than JSON.
func RESTConfig(apiURL, kubeconfig string) (*rest.Config, error) {
	var (
		c   *rest.Config
		err error
	)
	if apiURL == "" && kubeconfig == "" {
		c, err = rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("loading the in-cluster config (run in a pod with a service account, or give --kube-api-url or --kubeconfig-file): %w", err)
		}
	} else {
		c, err = clientcmd.BuildConfigFromFlags(apiURL, kubeconfig)
		if err != nil {
			if kubeconfig != "" {
				return nil, fmt.Errorf("loading --kubeconfig-file %s: %w", kubeconfig, err)
			}
			return nil, fmt.Errorf("using --kube-api-url %s: %w", apiURL, err)
		}
	}
	c.ContentType = "application/vnd.kubernetes.protobuf"
	c.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	c.UserAgent = "flanneld"
	return c, nil
}
