package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strings"
	"time"

	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/agent"
	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/probe"
	"github.com/flanneld-go/flanneld/subnet"
)

// checkTimeout bounds the store reads of flanneld --check.
const checkTimeout = 20 * time.Second

// runCheck is flanneld --check: it reads the config and the leases from the
// store, runs the host checks and one probe round to the peers (from this
// node's overlay address, which a running flanneld has set up), prints a
// report to out and says whether everything passed. It takes no lease and
// changes nothing on the host.
func runCheck(f *flags, out io.Writer) (bool, error) {
	ctx, cancel := context.WithTimeout(context.Background(), checkTimeout)
	defer cancel()
	log := klog.Background()
	var mgr subnet.Manager
	var err error
	if f.kube.subnetMgr {
		mgr, err = newKubeManager(ctx, &f.kube, log)
	} else {
		mgr, err = newManager(f, log)
	}
	if err != nil {
		return false, err
	}
	cfg, err := mgr.GetNetworkConfig(ctx)
	if err != nil {
		return false, fmt.Errorf("reading the network config: %w", err)
	}
	ext, err := ip.ChooseInterface(nil, f.iface, f.ifaceRegex)
	if err != nil {
		return false, err
	}
	public, public6 := ext.Addr, ext.Addr6
	if f.publicIP != "" {
		public, _ = ip.ParseAddr(f.publicIP)
	}
	if f.publicIPv6 != "" {
		public6, _ = ip.ParseAddr6(f.publicIPv6)
	}
	leases, err := firstLeases(ctx, mgr)
	if err != nil {
		return false, fmt.Errorf("reading the leases: %w", err)
	}

	// This node's lease: as the running daemon wrote it to subnet.env,
	// else the store's lease with our public address.
	own := subnet.Lease{Attrs: subnet.LeaseAttrs{PublicIP: public}}
	mtu := ext.Iface.MTU - probe.Overhead(cfg.BackendType)
	env, envErr := subnet.ReadEnv(f.subnetFile)
	if envErr == nil && cfg.EnableIPv6 && env.IPv6Network == cfg.IPv6Network {
		own.IPv6Subnet = env.IPv6Subnet
	}
	if envErr == nil && env.Network == cfg.Network {
		own.Subnet = env.Subnet
		if env.MTU > 0 {
			mtu = env.MTU
		}
	}
	for _, l := range leases {
		if !own.Subnet.IsValid() && l.Attrs.PublicIP == public && l.Subnet.IsValid() {
			own.Subnet = l.Subnet
		}
		if !own.IPv6Subnet.IsValid() && cfg.EnableIPv6 && l.Attrs.PublicIPv6 == public6 && l.IPv6Subnet.IsValid() {
			own.IPv6Subnet = l.IPv6Subnet
		}
	}
	own.Attrs.PublicIPv6 = public6
	remote := agent.Admitted(cfg, public, public6, leases)
	path := probe.PathOf(cfg, mtu, own)

	hc := probe.HostConfig{Backend: cfg.BackendType, Port: path.Port, Iface: ext.Iface.Name, MTU: ext.Iface.MTU, Own: own.Subnet, Own6: own.IPv6Subnet, Standalone: true}
	if cfg.EnableIPv4 {
		hc.Network = cfg.Network
	}
	if cfg.EnableIPv6 {
		hc.IPv6Network = cfg.IPv6Network
	}
	for _, l := range remote {
		hc.Peers.Add(l.Subnet)
		hc.Peers.Add(l.IPv6Subnet)
	}
	port := ""
	if path.Port != 0 {
		port = fmt.Sprintf(" (UDP %d)", path.Port)
	}
	network := cfg.Network.String()
	if !cfg.EnableIPv4 {
		network = cfg.IPv6Network.String()
	}
	fmt.Fprintf(out, "flanneld --check: network %s, backend %s%s, interface %s (%s, MTU %d)\n", network, cfg.BackendType, port, ext.Iface.Name, public, ext.Iface.MTU)
	problems := 0

	fmt.Fprintln(out, "\nHost checks:")
	for _, c := range probe.RunChecks(ctx, hc) {
		mark := "ok  "
		if !c.OK {
			mark = "FAIL"
			problems++
		}
		fmt.Fprintf(out, "  %s  %-15s %s\n", mark, c.Name, c.Detail)
		if !c.OK {
			fmt.Fprintf(out, "        %-15s %s\n", "fix:", c.Fix)
		}
	}

	peers := probe.PeersOf(path, remote)
	fmt.Fprintf(out, "\nPeers: %d in the store", len(peers))
	switch {
	case f.peerProbeRate == 0:
		fmt.Fprintln(out, "; not probed (--peer-probe-rate 0)")
	case !path.Probed():
		fmt.Fprintf(out, "; not probed (the %s backend carries no traffic)\n", path.Backend)
	case !path.Source.IsValid() && !path.Source6.IsValid():
		fmt.Fprintf(out, "; not probed: this host has no lease (no %s and no lease with public IP %s): start flanneld first\n", f.subnetFile, public)
	default:
		rep, err := probe.Round(ctx, probe.Options{Rate: f.peerProbeRate, Logger: ptr(log.V(10))}, path, peers)
		if err != nil {
			fmt.Fprintf(out, "; not probed: %v (is flanneld running on this host?)\n", err)
			problems++
			break
		}
		what := "through the overlay"
		if !path.Overlay() {
			what = fmt.Sprintf("at their public addresses (%s puts no overlay address on the peers: this proves the hosts answer, not that routed pod traffic passes)", path.Backend)
		}
		from := path.Source.String()
		switch {
		case !path.Source.IsValid():
			from = path.Source6.String()
		case path.Source6.IsValid():
			from += " and " + path.Source6.String()
		}
		fmt.Fprintf(out, ", probed from %s %s with %d-byte echoes and %d-byte ones with DF set\n", from, what, 84, path.MTU)
		for _, p := range rep.Peers {
			line := fmt.Sprintf("  %-14s %-18s %-15s", p.State, p.Subnet, p.PublicIP)
			if p.State == probe.Reachable {
				line += fmt.Sprintf(" rtt %.3f ms", p.LastRTTMs)
			} else {
				problems++
				if p.Detail != "" {
					line += " " + p.Detail
				}
			}
			fmt.Fprintln(out, strings.TrimRight(line, " "))
		}
	}
	if envErr != nil && !errors.Is(envErr, fs.ErrNotExist) {
		fmt.Fprintf(out, "\nnote: %s could not be read: %v\n", f.subnetFile, envErr)
	}
	if problems == 0 {
		fmt.Fprintln(out, "\nResult: all checks pass")
		return true, nil
	}
	fmt.Fprintf(out, "\nResult: %d problem%s\n", problems, map[bool]string{true: "", false: "s"}[problems == 1])
	return false, nil
}

func ptr[T any](v T) *T { return &v }

// firstLeases is the store's current lease set: the first batch of a
// lease watch.
func firstLeases(ctx context.Context, mgr subnet.Manager) ([]subnet.Lease, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	events := make(chan []subnet.Event, 1)
	errc := make(chan error, 1)
	go func() { errc <- mgr.WatchLeases(ctx, events) }()
	select {
	case batch := <-events:
		leases := make([]subnet.Lease, 0, len(batch))
		for _, e := range batch {
			if e.Type != subnet.EventRemoved {
				leases = append(leases, e.Lease)
			}
		}
		return leases, nil
	case err := <-errc:
		return nil, err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}
