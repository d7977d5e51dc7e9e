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

// AcquireLease returns the node's podCIDR as the lease, waiting (one log
// line, then a look every PollInterval) while kube-controller-manager has
// not assigned it, and publishes attrs as the node's annotations. A podCIDR
// outside cfg.Network is an error wrapping ErrPodCIDROutsideNetwork. prev
// is ignored: the podCIDR is the node's. If the node carries
// <prefix>/public-ip-overwrite, that address is published and returned as
// the lease's PublicIP.
func (m *Manager) AcquireLease(ctx context.Context, cfg *subnet.Config, attrs subnet.LeaseAttrs, prev netip.Prefix) (*subnet.Lease, error) {
	node, cidr, err := m.waitPodCIDR(ctx)
	if err != nil {
		return nil, err
	}
	if !cidr.Addr().Is4() || !cfg.Network.Contains(cidr.Addr()) || cidr.Bits() < cfg.Network.Bits() {
		return nil, fmt.Errorf("%w: node %s has podCIDR %s, outside Network %s of %s; make kube-controller-manager's --cluster-cidr match Network (or fix Network)",
			ErrPodCIDROutsideNetwork, m.node, cidr, cfg.Network, m.path)
	}
	if s, ok := node.Annotations[m.keys.publicIPOverwrite]; ok && s != "" {
		a, err := netip.ParseAddr(s)
		if err != nil || !a.Is4() {
			return nil, fmt.Errorf("node %s annotation %s=%q is not an IPv4 address: fix or remove it", m.node, m.keys.publicIPOverwrite, s)
		}
		if a != attrs.PublicIP {
			m.log.Info("Publishing the public IP the node's annotation overwrites", "annotation", m.keys.publicIPOverwrite, "publicIP", a)
		}
		attrs.PublicIP = a
	}
	if err := m.publish(ctx, attrs); err != nil {
		return nil, err
	}
	return &subnet.Lease{Subnet: cidr, Attrs: attrs}, nil
}

// waitPodCIDR gets the node until it has a podCIDR.
func (m *Manager) waitPodCIDR(ctx context.Context) (*v1.Node, netip.Prefix, error) {
	logged := false
	for {
		node, err := m.client.getNode(ctx, m.node)
		if apierrors.IsNotFound(err) {
			return nil, netip.Prefix{}, fmt.Errorf("getting node %s: it does not exist; NODE_NAME must name this host's Kubernetes node: %w", m.node, err)
		}
		if err != nil {
			return nil, netip.Prefix{}, fmt.Errorf("getting node %s: %w", m.node, err)
		}
		if s := node.Spec.PodCIDR; s != "" {
			p, err := netip.ParsePrefix(s)
			if err != nil {
				return nil, netip.Prefix{}, fmt.Errorf("node %s has podCIDR %q, which is not a CIDR: %w", m.node, s, err)
			}
			return node, p.Masked(), nil
		}
		if !logged {
			logged = true
			m.log.Info("Waiting for the node's podCIDR; kube-controller-manager assigns it when run with --allocate-node-cidrs and --cluster-cidr")
		}
		if err := sleep(ctx, m.poll); err != nil {
			return nil, netip.Prefix{}, err
		}
	}
}

// RenewLease has nothing to renew (a podCIDR never expires): it checks that
// the node still exists with the lease's podCIDR (else ErrLeaseLost) and
// publishes the annotations again if they were changed or removed.
func (m *Manager) RenewLease(ctx context.Context, lease *subnet.Lease) error {
	node, err := m.client.getNode(ctx, m.node)
	if apierrors.IsNotFound(err) {
		return fmt.Errorf("%w: node %s was deleted", subnet.ErrLeaseLost, m.node)
	}
	if err != nil {
		return fmt.Errorf("getting node %s: %w", m.node, err)
	}
	if p, err := netip.ParsePrefix(node.Spec.PodCIDR); err != nil || p.Masked() != lease.Subnet {
		return fmt.Errorf("%w: node %s podCIDR is now %q", subnet.ErrLeaseLost, m.node, node.Spec.PodCIDR)
	}
	want := m.wantAnnotations(lease.Attrs)
	for k, v := range want {
		if node.Annotations[k] != v {
			return m.publish(ctx, lease.Attrs)
		}
	}
	return nil
}

// wantAnnotations are the annotations that publish attrs, as flannel
// writes them (backend-data "null" when there is none).
func (m *Manager) wantAnnotations(attrs subnet.LeaseAttrs) map[string]string {
	data := "null"
	if len(attrs.BackendData) > 0 {
		data = string(attrs.BackendData)
	}
	return map[string]string{
		m.keys.backendType:   attrs.BackendType,
		m.keys.backendData:   data,
		m.keys.publicIP:      attrs.PublicIP.String(),
		m.keys.subnetManager: "true",
	}
}

// statusPatch is the strategic-merge patch of nodes/status: conditions
// merge by type, so only NetworkUnavailable is touched.
type statusPatch struct {
	Metadata struct {
		Annotations map[string]string `json:"annotations"`
	} `json:"metadata"`
	Status struct {
		Conditions []v1.NodeCondition `json:"conditions"`
	} `json:"status"`
}

// publish patches the node's status with the annotations of attrs and the
// NetworkUnavailable=False condition. The status subresource is what
// flannel's RBAC (nodes/status patch) allows.
func (m *Manager) publish(ctx context.Context, attrs subnet.LeaseAttrs) error {
	var p statusPatch
	p.Metadata.Annotations = m.wantAnnotations(attrs)
	now := metav1.NewTime(m.now())
	p.Status.Conditions = []v1.NodeCondition{{
		Type:               v1.NodeNetworkUnavailable,
		Status:             v1.ConditionFalse,
		Reason:             conditionReason,
		Message:            conditionMessage,
		LastTransitionTime: now,
		LastHeartbeatTime:  now,
	}}
	body, err := json.Marshal(p)
	if err != nil {
		return fmt.Errorf("encoding node status patch: %w", err)
	}
	if err := m.client.patchNodeStatus(ctx, m.node, types.StrategicMergePatchType, body); err != nil {
		return fmt.Errorf("patching node %s status with the lease annotations: %w", m.node, err)
	}
	m.log.V(1).Info("Published lease annotations", "publicIP", attrs.PublicIP, "backendType", attrs.BackendType)
	return nil
}
