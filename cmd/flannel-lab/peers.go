package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"time"

	"github.com/flanneld-go/flanneld/e2e/lab"
	"github.com/flanneld-go/flanneld/internal/etcdtest"
	"github.com/flanneld-go/flanneld/probe"
)

// healthzArgs gives each daemon a healthz server on its namespace's
// loopback, for /peers.
var healthzArgs = []string{"--healthz-port", "8471", "--healthz-ip", "127.0.0.1"}

const peersURL = "http://127.0.0.1:8471/peers"

// getPeers reads h's /peers from inside its namespace.
func getPeers(ctx context.Context, h *lab.Host) (probe.Report, []byte, error) {
	var rep probe.Report
	tr := &http.Transport{DialContext: etcdtest.DialContextIn(filepath.Join("/run/netns", h.NS)), DisableKeepAlives: true, Proxy: nil}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, peersURL, nil)
	if err != nil {
		return rep, nil, err
	}
	resp, err := (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		return rep, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return rep, nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return rep, body, fmt.Errorf("GET /peers on %s: %s", h.Name, resp.Status)
	}
	return rep, body, json.Unmarshal(body, &rep)
}

// settleUnreachable is how long printPeers waits for a peer reported
// unreachable to come back: a tunnel can start a few seconds after the
// probes do (a WireGuard handshake lost at start is retried after 5 s),
// while the ping matrix before it waited for every path.
const settleUnreachable = 15 * time.Second

// printPeers waits until every host has probed every peer with both sizes
// and finds it reachable (or timeout; for peers probed but unreachable,
// settleUnreachable), then prints each host's view and host1's /peers, and
// returns how many peers are not reachable.
func printPeers(ctx context.Context, l *lab.Lab, timeout time.Duration) int {
	start := time.Now()
	deadline := start.Add(timeout)
	reps := make([]probe.Report, len(l.Hosts()))
	var first []byte
	for {
		settled, unreachable := true, false
		for i, h := range l.Hosts() {
			rep, body, err := getPeers(ctx, h)
			if err != nil {
				settled = false
				continue
			}
			reps[i] = rep
			if i == 0 {
				first = body
			}
			if len(rep.Peers) != len(l.Hosts())-1 || rep.Counts["unprobed"] > 0 {
				settled = false
			}
			for _, p := range rep.Peers {
				if p.State != probe.Reachable {
					unreachable = true
				}
			}
		}
		if settled && unreachable && time.Since(start) < settleUnreachable {
			settled = false
		}
		if settled || time.Now().After(deadline) || ctx.Err() != nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	fmt.Printf("\n== peer states: what each host's peer probes say (GET %s)\n", peersURL)
	bad := 0
	for i, h := range l.Hosts() {
		for _, p := range reps[i].Peers {
			fmt.Printf("%s -> %-18s (%s): %-13s rtt %.3f ms\n", h.Name, p.Subnet, p.PublicIP, p.State, p.LastRTTMs)
			if p.State != probe.Reachable {
				bad++
			}
		}
	}
	fmt.Printf("\n== %s's /peers\n%s", l.Host(1).Name, first)
	return bad
}
