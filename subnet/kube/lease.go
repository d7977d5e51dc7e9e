package kube

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/flanneld-go/flanneld/subnet"
)

// The NetworkUnavailable condition flannel v0.28 sets on its node.
const (
	conditionReason  = "FlannelIsUp"
	conditionMessage = "Flannel is running on this node"
)

// AcquireLease returns the node's podCIDRs as the lease (the IPv4 one with
// EnableIPv4, the IPv6 one with EnableIPv6), waiting (one log line, then a
// look every PollInterval) while kube-controller-manager has not assigned
// them, and publishes attrs as the node's annotations. A podCIDR outside
// Network (or IPv6Network) is an error wrapping ErrPodCIDROutsideNetwork.
// prev is ignored: the podCIDR is the node's. If the node carries
// <prefix>/public-ip-overwrite (or public-ipv6-overwrite), that address is
// published and returned as the lease's PublicIP (PublicIPv6).
func (m *Manager) AcquireLease(ctx context.Context, cfg *subnet.Config, attrs subnet.LeaseAttrs, prev subnet.Lease) (*subnet.Lease, error) {
	node, v4, v6, err := m.waitPodCIDRs(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if v4.IsValid() && (!cfg.Network.Contains(v4.Addr()) || v4.Bits() < cfg.Network.Bits()) {
		return nil, m.outside("podCIDR %s, outside Network %s; make kube-controller-manager's --cluster-cidr match Network (or fix Network)", v4, cfg.Network)
	}
	if v6.IsValid() && (!cfg.IPv6Network.Contains(v6.Addr()) || v6.Bits() < cfg.IPv6Network.Bits()) {
		return nil, m.outside("IPv6 podCIDR %s, outside IPv6Network %s; make kube-controller-manager's --cluster-cidr match IPv6Network (or fix IPv6Network)", v6, cfg.IPv6Network)
	}
	if v4.IsValid() {
		if attrs.PublicIP, err = m.overwrite(node, m.keys.publicIPOverwrite, attrs.PublicIP, false); err != nil {
			return nil, err
		}
	}
	if v6.IsValid() {
		if attrs.PublicIPv6, err = m.overwrite(node, m.keys.publicIPv6Overwrite, attrs.PublicIPv6, true); err != nil {
			return nil, err
		}
	}
	l := &subnet.Lease{Subnet: v4, IPv6Subnet: v6, Attrs: attrs}
	if err := m.publish(ctx, l); err != nil {
		return nil, err
	}
	return l, nil
}

// podCIDRError is a podCIDR the network config does not allow: both
// ErrPodCIDROutsideNetwork and (as the config file and the cluster
// disagree) subnet.ErrInvalidConfig.
type podCIDRError struct{ *subnet.ConfigError }

func (e podCIDRError) Is(target error) bool {
	return target == ErrPodCIDROutsideNetwork || target == subnet.ErrInvalidConfig
}

// outside is the podCIDRError of this node, e.g. "invalid network config at
// /etc/kube-flannel/net-conf.json: node n1 has podCIDR 10.6.1.0/24, outside
// Network 10.5.0.0/16; make ...".
func (m *Manager) outside(format string, args ...any) error {
	return podCIDRError{&subnet.ConfigError{Key: m.path, Reason: fmt.Sprintf("node %s has "+format, append([]any{m.node}, args...)...)}}
}

// overwrite returns the address of the node's annotation key if it has one
// (an admin's public-ip-overwrite), else addr.
func (m *Manager) overwrite(node *v1.Node, key string, addr netip.Addr, ipv6 bool) (netip.Addr, error) {
	s, ok := node.Annotations[key]
	if !ok || s == "" {
		return addr, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil || a.Is6() != ipv6 || a.Is4In6() {
		family := "an IPv4"
		if ipv6 {
			family = "an IPv6"
		}
		return addr, fmt.Errorf("node %s annotation %s=%q is not %s address: fix or remove it", m.node, key, s, family)
	}
	if a != addr {
		m.log.Info("Publishing the public IP the node's annotation overwrites", "annotation", key, "publicIP", a)
	}
	return a, nil
}

// podCIDRs returns the node's IPv4 and IPv6 podCIDRs, each invalid when
// absent.
func podCIDRs(n *v1.Node) (v4, v6 netip.Prefix, err error) {
	return parsePodCIDRs(specPodCIDRs(n))
}

// specPodCIDRs is the node's spec.podCIDRs, else its spec.podCIDR.
func specPodCIDRs(n *v1.Node) []string {
	if len(n.Spec.PodCIDRs) == 0 && n.Spec.PodCIDR != "" {
		return []string{n.Spec.PodCIDR}
	}
	return n.Spec.PodCIDRs
}

// parsePodCIDRs returns the first IPv4 and the first IPv6 of cidrs, each
// invalid when absent.
func parsePodCIDRs(cidrs []string) (v4, v6 netip.Prefix, err error) {
	for _, s := range cidrs {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return v4, v6, fmt.Errorf("podCIDR %q is not a CIDR", s)
		}
		if p.Addr().Is4() && !v4.IsValid() {
			v4 = p.Masked()
		} else if p.Addr().Is6() && !v6.IsValid() {
			v6 = p.Masked()
		}
	}
	return v4, v6, nil
}

// waitPodCIDRs gets the node until it has the podCIDRs of the families cfg
// enables, and returns those.
func (m *Manager) waitPodCIDRs(ctx context.Context, cfg *subnet.Config) (*v1.Node, netip.Prefix, netip.Prefix, error) {
	logged := false
	for {
		node, err := m.client.getNode(ctx, m.node)
		if apierrors.IsNotFound(err) {
			return nil, netip.Prefix{}, netip.Prefix{}, fmt.Errorf("getting node %s: it does not exist; NODE_NAME must name this host's Kubernetes node: %w", m.node, err)
		}
		if err != nil {
			return nil, netip.Prefix{}, netip.Prefix{}, fmt.Errorf("getting node %s: %w", m.node, err)
		}
		v4, v6, err := podCIDRs(node)
		if err != nil {
			return nil, netip.Prefix{}, netip.Prefix{}, fmt.Errorf("node %s: %w", m.node, err)
		}
		if !cfg.EnableIPv4 {
			v4 = netip.Prefix{}
		}
		if !cfg.EnableIPv6 {
			v6 = netip.Prefix{}
		}
		if v4.IsValid() == cfg.EnableIPv4 && v6.IsValid() == cfg.EnableIPv6 {
			return node, v4, v6, nil
		}
		if !logged {
			logged = true
			family := "an IPv4"
			if cfg.EnableIPv4 == v4.IsValid() {
				family = "an IPv6"
			}
			m.log.Info("Waiting for the node's podCIDR; kube-controller-manager assigns it when run with --allocate-node-cidrs and --cluster-cidr", "missing", family+" podCIDR")
		}
		if err := sleep(ctx, m.poll); err != nil {
			return nil, netip.Prefix{}, netip.Prefix{}, err
		}
	}
}

// RenewLease has nothing to renew (a podCIDR never expires): it checks that
// the node still exists with the lease's podCIDRs (else ErrLeaseLost) and
// publishes the annotations again if they were changed or removed.
func (m *Manager) RenewLease(ctx context.Context, lease *subnet.Lease) error {
	node, err := m.client.getNode(ctx, m.node)
	if apierrors.IsNotFound(err) {
		return fmt.Errorf("%w: node %s was deleted", subnet.ErrLeaseLost, m.node)
	}
	if err != nil {
		return fmt.Errorf("getting node %s: %w", m.node, err)
	}
	v4, v6, err := podCIDRs(node)
	if err != nil || (lease.Subnet.IsValid() && v4 != lease.Subnet) || (lease.IPv6Subnet.IsValid() && v6 != lease.IPv6Subnet) {
		return fmt.Errorf("%w: node %s podCIDRs are now %q", subnet.ErrLeaseLost, m.node, node.Spec.PodCIDRs)
	}
	for k, v := range m.wantAnnotations(lease) {
		if node.Annotations[k] != v {
			return m.publish(ctx, lease)
		}
	}
	return nil
}

// wantAnnotations are the annotations that publish lease, as flannel
// writes them: the IPv4 ones for an IPv4 subnet, the IPv6 ones for an IPv6
// subnet (backend data "null" when there is none).
func (m *Manager) wantAnnotations(lease *subnet.Lease) map[string]string {
	data := func(d []byte) string {
		if len(d) == 0 {
			return "null"
		}
		return string(d)
	}
	a := map[string]string{
		m.keys.backendType:   lease.Attrs.BackendType,
		m.keys.subnetManager: "true",
	}
	if lease.Subnet.IsValid() {
		a[m.keys.backendData] = data(lease.Attrs.BackendData)
		a[m.keys.publicIP] = lease.Attrs.PublicIP.String()
	}
	if lease.IPv6Subnet.IsValid() {
		a[m.keys.backendV6Data] = data(lease.Attrs.BackendV6Data)
		a[m.keys.publicIPv6] = lease.Attrs.PublicIPv6.String()
	}
	return a
}

// statusPatch is the strategic-merge patch of nodes/status: conditions
// merge by type, so only NetworkUnavailable is touched (and none when the
// list is left out).
type statusPatch struct {
	Metadata struct {
		Annotations map[string]string `json:"annotations"`
	} `json:"metadata"`
	Status struct {
		Conditions []v1.NodeCondition `json:"conditions,omitempty"`
	} `json:"status"`
}

// publish patches the node's status with the annotations of lease and the
// NetworkUnavailable=False condition (unless KeepNetworkUnavailable). The
// status subresource is what flannel's RBAC (nodes/status patch) allows.
func (m *Manager) publish(ctx context.Context, lease *subnet.Lease) error {
	var p statusPatch
	p.Metadata.Annotations = m.wantAnnotations(lease)
	if !m.noCondition {
		now := metav1.NewTime(m.now())
		p.Status.Conditions = []v1.NodeCondition{{
			Type:               v1.NodeNetworkUnavailable,
			Status:             v1.ConditionFalse,
			Reason:             conditionReason,
			Message:            conditionMessage,
			LastTransitionTime: now,
			LastHeartbeatTime:  now,
		}}
	}
	body, err := json.Marshal(p)
	if err != nil {
		return fmt.Errorf("encoding node status patch: %w", err)
	}
	if err := m.client.patchNodeStatus(ctx, m.node, types.StrategicMergePatchType, body); err != nil {
		return fmt.Errorf("patching node %s status with the lease annotations: %w", m.node, err)
	}
	m.log.V(1).Info("Published lease annotations", "publicIP", lease.Attrs.PublicIP, "publicIPv6", lease.Attrs.PublicIPv6, "backendType", lease.Attrs.BackendType)
	return nil
}
