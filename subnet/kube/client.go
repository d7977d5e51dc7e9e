package kube

import (
	"context"
	"fmt"
	"sync"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/rest"
)

// The manager speaks only core/v1 (nodes and pods): its scheme holds that
// group alone, instead of client-go's clientset with every API group, which
// would triple the daemon's binary and the memory its start-up touches.
// It is built at the first client, not at init, so that a daemon in etcd
// mode does not pay for it.
var (
	schemeOnce sync.Once
	codecs     serializer.CodecFactory
	paramCodec runtime.ParameterCodec
)

func initScheme() {
	scheme := runtime.NewScheme()
	if err := v1.AddToScheme(scheme); err != nil {
		panic(err) // a static registration; fails only if the types are broken
	}
	metav1.AddToGroupVersion(scheme, v1.SchemeGroupVersion)
	codecs, paramCodec = serializer.NewCodecFactory(scheme), runtime.NewParameterCodec(scheme)
}

// client is the part of the API the manager uses: nodes get, list, watch
// and status patch; pods get (the RBAC of dist/kube-flannel.yml).
type client struct {
	rc rest.Interface
}

// newClient makes a core/v1 client of cfg.
func newClient(cfg *rest.Config) (*client, error) {
	schemeOnce.Do(initScheme)
	c := rest.CopyConfig(cfg)
	c.GroupVersion = &v1.SchemeGroupVersion
	c.APIPath = "/api"
	c.NegotiatedSerializer = codecs.WithoutConversion()
	if c.UserAgent == "" {
		c.UserAgent = rest.DefaultKubernetesUserAgent()
	}
	rc, err := rest.RESTClientFor(c)
	if err != nil {
		return nil, fmt.Errorf("creating the Kubernetes API client: %w", err)
	}
	return &client{rc: rc}, nil
}

func (c *client) getNode(ctx context.Context, name string) (*v1.Node, error) {
	n := &v1.Node{}
	return n, c.rc.Get().Resource("nodes").Name(name).Do(ctx).Into(n)
}

func (c *client) listNodes(ctx context.Context, opts metav1.ListOptions) (*v1.NodeList, error) {
	l := &v1.NodeList{}
	return l, c.rc.Get().Resource("nodes").VersionedParams(&opts, paramCodec).Do(ctx).Into(l)
}

func (c *client) watchNodes(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
	opts.Watch = true
	return c.rc.Get().Resource("nodes").VersionedParams(&opts, paramCodec).Watch(ctx)
}

func (c *client) patchNodeStatus(ctx context.Context, name string, pt types.PatchType, body []byte) error {
	return c.rc.Patch(pt).Resource("nodes").Name(name).SubResource("status").Body(body).Do(ctx).Error()
}

func (c *client) getPod(ctx context.Context, namespace, name string) (*v1.Pod, error) {
	p := &v1.Pod{}
	return p, c.rc.Get().Namespace(namespace).Resource("pods").Name(name).Do(ctx).Into(p)
}
