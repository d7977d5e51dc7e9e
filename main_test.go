package main

import (
	"errors"
	"reflect"
	"strings"
	"testing"

	"k8s.io/klog/v2/ktesting"
)

func env(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func TestFlagDefaults(t *testing.T) {
	f, err := parseFlags(nil, env(nil))
	if err != nil {
		t.Fatal(err)
	}
	if f.etcdEndpoints != "http://127.0.0.1:4001,http://127.0.0.1:2379" || f.etcdPrefix != "/coreos.com/network" ||
		f.subnetFile != "/run/flannel/subnet.env" || f.renewMargin != 60 || f.healthzIP != "0.0.0.0" ||
		f.healthzPort != 0 || f.iptablesResync != 5 || f.ipMasq || !f.nexthops {
		t.Errorf("defaults = %+v", f)
	}
}

func TestFlagsFromEnv(t *testing.T) {
	f, err := parseFlags([]string{"--etcd-prefix=/cli", "--iface", "eth9", "-v", "3"}, env(map[string]string{
		"FLANNELD_ETCD_PREFIX":               "/env", // the command line wins
		"FLANNELD_ETCD_ENDPOINTS":            "https://10.0.0.1:2379",
		"FLANNELD_IP_MASQ":                   "true",
		"FLANNELD_IFACE":                     "ignored-because-given",
		"FLANNELD_IFACE_REGEX":               "^10\\.(1|2),x",
		"FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "30",
	}))
	if err != nil {
		t.Fatal(err)
	}
	if f.etcdPrefix != "/cli" || f.etcdEndpoints != "https://10.0.0.1:2379" || !f.ipMasq || f.renewMargin != 30 {
		t.Errorf("flags = %+v", f)
	}
	if !reflect.DeepEqual(f.iface, []string{"eth9"}) || !reflect.DeepEqual(f.ifaceRegex, []string{"^10\\.(1|2),x"}) {
		t.Errorf("iface = %q, regex = %q", f.iface, f.ifaceRegex)
	}
	f, err = parseFlags(nil, env(map[string]string{"FLANNELD_IFACE": "eth0, 10.0.0.5"}))
	if err != nil || !reflect.DeepEqual(f.iface, []string{"eth0", "10.0.0.5"}) {
		t.Errorf("iface from env = %q, %v", f.iface, err)
	}
}

func TestFlagErrors(t *testing.T) {
	tests := []struct {
		args []string
		env  map[string]string
		want string
	}{
		{[]string{"--subnet-lease-renew-margin=0"}, nil, "--subnet-lease-renew-margin 0 is out of range"},
		{[]string{"--subnet-lease-renew-margin=1440"}, nil, "out of range: use 1..1439"},
		{nil, map[string]string{"FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "x"}, "invalid value of FLANNELD_SUBNET_LEASE_RENEW_MARGIN"},
		{[]string{"--public-ip=fd00::1"}, nil, `--public-ip "fd00::1" is not an IPv4 address`},
		{[]string{"--healthz-port=70000"}, nil, "--healthz-port 70000 is out of range"},
		{[]string{"--healthz-port=8080", "--healthz-ip=nope"}, nil, `--healthz-ip "nope" is not an IP address`},
		{[]string{"--iptables-resync=0"}, nil, "--iptables-resync 0 must be at least 1 second"},
		{[]string{"--etcd-certfile=/c"}, nil, "--etcd-certfile and --etcd-keyfile go together"},
		{[]string{"--no-such-flag"}, nil, "unknown flag: --no-such-flag"},
		{[]string{"stray"}, nil, `unexpected argument "stray"`},
	}
	for _, tt := range tests {
		_, err := parseFlags(tt.args, env(tt.env))
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("parseFlags(%q, %v) = %v, want %q", tt.args, tt.env, err, tt.want)
		}
	}
}

func TestNexthopFlag(t *testing.T) {
	for _, tt := range []struct {
		args []string
		env  map[string]string
		want bool
	}{
		{nil, nil, true},
		{[]string{"--nexthop-objects=false"}, nil, false},
		{[]string{"--nexthop-objects"}, nil, true},
		{nil, map[string]string{"FLANNELD_NEXTHOP_OBJECTS": "false"}, false},
		{[]string{"--nexthop-objects=true"}, map[string]string{"FLANNELD_NEXTHOP_OBJECTS": "false"}, true},
	} {
		f, err := parseFlags(tt.args, env(tt.env))
		if err != nil || f.nexthops != tt.want {
			t.Errorf("parseFlags(%q, %v): nexthops = %v, %v; want %v", tt.args, tt.env, f != nil && f.nexthops, err, tt.want)
		}
	}
	if _, err := parseFlags([]string{"--nexthop-objects=maybe"}, env(nil)); err == nil || !strings.Contains(err.Error(), "nexthop-objects") {
		t.Errorf("--nexthop-objects=maybe: %v, want an error naming the flag", err)
	}
}

func TestUseNexthops(t *testing.T) {
	unsupported := errors.New("listing nexthop objects: invalid argument")
	for _, tt := range []struct {
		want     bool
		probe    error
		use      bool
		probed   bool
		fallback bool // the fallback line is logged
	}{
		{want: true, probe: nil, use: true, probed: true},
		{want: true, probe: unsupported, use: false, probed: true, fallback: true},
		{want: false, probe: nil, use: false},
	} {
		log := ktesting.NewLogger(t, ktesting.NewConfig(ktesting.BufferLogs(true)))
		probed := false
		got := useNexthops(tt.want, func() error { probed = true; return tt.probe }, log)
		logs := log.GetSink().(ktesting.Underlier).GetBuffer().String()
		if got != tt.use || probed != tt.probed {
			t.Errorf("useNexthops(%v) with probe %v = %v (probed %v), want %v (probed %v)", tt.want, tt.probe, got, probed, tt.use, tt.probed)
		}
		if n := strings.Count(logs, "installing plain routes"); n != map[bool]int{true: 1}[tt.fallback] {
			t.Errorf("useNexthops(%v) with probe %v logged the fallback %d times:\n%s", tt.want, tt.probe, n, logs)
		}
	}
}

// TestV028Flags: flannel v0.28's interface, rule and route flags, their
// defaults and FLANNELD_* variables.
func TestV028Flags(t *testing.T) {
	f, err := parseFlags(nil, env(nil))
	if err != nil {
		t.Fatal(err)
	}
	if f.ifaceCanReach != "" || f.ipMasqFullyRandomDisable || !f.iptablesForwardRules || f.ipBlackholeRoute || !f.kube.setNodeNetworkUnavailable {
		t.Errorf("defaults: can-reach %q, fully-random-disable %v, forward-rules %v, blackhole %v, set-node-network-unavailable %v; want \"\", false, true, false, true",
			f.ifaceCanReach, f.ipMasqFullyRandomDisable, f.iptablesForwardRules, f.ipBlackholeRoute, f.kube.setNodeNetworkUnavailable)
	}
	f, err = parseFlags(nil, env(map[string]string{
		"FLANNELD_IFACE_CAN_REACH":              "10.0.0.1",
		"FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE": "true",
		"FLANNELD_IPTABLES_FORWARD_RULES":       "false",
		"FLANNELD_IP_BLACKHOLE_ROUTE":           "true",
		"FLANNELD_SET_NODE_NETWORK_UNAVAILABLE": "false",
	}))
	if err != nil {
		t.Fatal(err)
	}
	if f.ifaceCanReach != "10.0.0.1" || !f.ipMasqFullyRandomDisable || f.iptablesForwardRules || !f.ipBlackholeRoute || f.kube.setNodeNetworkUnavailable {
		t.Errorf("from the environment: %+v", f)
	}
	for _, tt := range []struct{ args []string }{
		{[]string{"--iface-can-reach=eth0"}},
		{[]string{"--iptables-forward-rules=maybe"}},
	} {
		if _, err := parseFlags(tt.args, env(nil)); err == nil {
			t.Errorf("parseFlags(%q) accepted", tt.args)
		}
	}
	if _, err := parseFlags([]string{"--iface-can-reach=nope"}, env(nil)); err == nil || !strings.Contains(err.Error(), `--iface-can-reach "nope" is not an IP address`) {
		t.Errorf("bad --iface-can-reach: %v", err)
	}
}
