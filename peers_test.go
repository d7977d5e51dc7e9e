package main

import (
	"strings"
	"testing"
)

// TestPeerProbeRateFlag: default 20, FLANNELD_PEER_PROBE_RATE, the command
// line winning, 0 turning probes off, and out-of-range values.
func TestPeerProbeRateFlag(t *testing.T) {
	for _, tt := range []struct {
		args []string
		env  map[string]string
		want int
	}{
		{nil, nil, 20},
		{nil, map[string]string{"FLANNELD_PEER_PROBE_RATE": "5"}, 5},
		{[]string{"--peer-probe-rate=0"}, map[string]string{"FLANNELD_PEER_PROBE_RATE": "5"}, 0},
	} {
		f, err := parseFlags(tt.args, env(tt.env))
		if err != nil || f.peerProbeRate != tt.want {
			t.Errorf("parseFlags(%q, %v): rate %v, %v; want %d", tt.args, tt.env, f, err, tt.want)
		}
	}
	for _, bad := range []string{"--peer-probe-rate=-1", "--peer-probe-rate=10001"} {
		if _, err := parseFlags([]string{bad}, env(nil)); err == nil || !strings.Contains(err.Error(), "is out of range: use 0..10000") {
			t.Errorf("%s: %v", bad, err)
		}
	}
	if _, err := parseFlags([]string{"--peer-probe-rate=fast"}, env(nil)); err == nil || !strings.Contains(err.Error(), "must be a whole number") {
		t.Errorf("--peer-probe-rate=fast: %v", err)
	}
	if f, err := parseFlags([]string{"--check"}, env(nil)); err != nil || !f.check {
		t.Errorf("--check: %v", err)
	}
}
