package kube

import (
	"fmt"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"
)

// annotations are the node annotation keys of one prefix.
type annotations struct {
	backendType         string // <p>backend-type: "vxlan", "host-gw", "" for udp
	backendData         string // <p>backend-data: the lease's BackendData JSON ("null" when none)
	backendV6Data       string // <p>backend-v6-data: BackendV6Data (dual stack)
	publicIP            string // <p>public-ip
	publicIPv6          string // <p>public-ipv6 (dual stack)
	publicIPOverwrite   string // <p>public-ip-overwrite: set by an admin, published as public-ip
	publicIPv6Overwrite string // <p>public-ipv6-overwrite: likewise for public-ipv6
	subnetManager       string // <p>kube-subnet-manager: "true"
}

// newAnnotations builds the keys as flannel does: a prefix without a slash
// gets one ("flannel.alpha.coreos.com" → "flannel.alpha.coreos.com/"), a
// prefix with one that does not end the name gets a dash
// ("example.com/net" → "example.com/net-").
func newAnnotations(prefix string) (annotations, error) {
	switch strings.Count(prefix, "/") {
	case 0:
		prefix += "/"
	case 1:
		if !strings.HasSuffix(prefix, "/") && !strings.HasSuffix(prefix, "-") {
			prefix += "-"
		}
	default:
		return annotations{}, fmt.Errorf("--kube-annotation-prefix %q has more than one slash: give a DNS name such as %s", prefix, DefaultAnnotationPrefix)
	}
	a := annotations{
		backendType:         prefix + "backend-type",
		backendData:         prefix + "backend-data",
		backendV6Data:       prefix + "backend-v6-data",
		publicIP:            prefix + "public-ip",
		publicIPv6:          prefix + "public-ipv6",
		publicIPOverwrite:   prefix + "public-ip-overwrite",
		publicIPv6Overwrite: prefix + "public-ipv6-overwrite",
		subnetManager:       prefix + "kube-subnet-manager",
	}
	if errs := validation.IsQualifiedName(a.publicIPv6Overwrite); len(errs) > 0 {
		return annotations{}, fmt.Errorf("--kube-annotation-prefix %q does not make valid annotation keys (%s): give a DNS name such as %s",
			strings.TrimSuffix(prefix, "/"), strings.Join(errs, "; "), DefaultAnnotationPrefix)
	}
	return a, nil
}

// CheckAnnotationPrefix reports whether prefix (--kube-annotation-prefix)
// makes valid annotation keys, with an error saying how to fix it.
func CheckAnnotationPrefix(prefix string) error {
	_, err := newAnnotations(prefix)
	return err
}
