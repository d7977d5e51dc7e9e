package main

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/flanneld-go/flanneld/pkg/ip"
)

// TestFlagBadInput extends TestFlagErrors: every malformed flag or
// FLANNELD_* value is refused by parseFlags with one line that names the
// flag (or the variable) and says what to give instead, before the daemon
// touches etcd or the kernel.
func TestFlagBadInput(t *testing.T) {
	tests := []struct {
		name string
		args []string
		env  map[string]string
		// names is the flag or variable the error must name; fix is how it
		// says to mend it.
		names, fix string
	}{
		{"renew margin not a number", []string{"--subnet-lease-renew-margin=abc"}, nil, "--subnet-lease-renew-margin", "must be a whole number"},
		{"renew margin empty", []string{"--subnet-lease-renew-margin="}, nil, "--subnet-lease-renew-margin", "must be a whole number"},
		{"renew margin negative", []string{"--subnet-lease-renew-margin=-5"}, nil, "--subnet-lease-renew-margin", "use 1..1439 minutes"},
		{"renew margin missing value", []string{"--subnet-lease-renew-margin"}, nil, "--subnet-lease-renew-margin", "needs an argument"},
		{"route resync zero", []string{"--route-resync=0"}, nil, "--route-resync", "at least 1 second"},
		{"route resync fraction", []string{"--route-resync=1.5"}, nil, "--route-resync", "must be a whole number"},
		{"route resync duration from env", nil, map[string]string{"FLANNELD_ROUTE_RESYNC": "10s"}, "FLANNELD_ROUTE_RESYNC", "must be a whole number"},
		{"iptables resync negative", []string{"--iptables-resync=-1"}, nil, "--iptables-resync", "at least 1 second"},
		{"healthz port negative", []string{"--healthz-port=-1"}, nil, "--healthz-port", "use 0..65535"},
		{"healthz port name", []string{"--healthz-port=http"}, nil, "--healthz-port", "must be a whole number"},
		{"healthz port from env", nil, map[string]string{"FLANNELD_HEALTHZ_PORT": "99999"}, "--healthz-port", "use 0..65535"},
		{"healthz ip empty", []string{"--healthz-port=8080", "--healthz-ip="}, nil, "--healthz-ip", "is not an IP address"},
		{"healthz ip with port", []string{"--healthz-port=8080", "--healthz-ip=10.0.0.1:80"}, nil, "--healthz-ip", "is not an IP address"},
		{"public ip short", []string{"--public-ip=10.0.0"}, nil, "--public-ip", "is not an IPv4 address"},
		{"public ip mapped", []string{"--public-ip=::ffff:10.0.0.1"}, nil, "--public-ip", "is not an IPv4 address"},
		{"public ip CIDR", []string{"--public-ip=10.0.0.1/24"}, nil, "--public-ip", "is not an IPv4 address"},
		{"public ip IPv6 from env", nil, map[string]string{"FLANNELD_PUBLIC_IP": "fd00::1"}, "--public-ip", "is not an IPv4 address"},
		{"public ipv6 IPv4", []string{"--public-ipv6=10.0.0.1"}, nil, "--public-ipv6", "is not an IPv6 address"},
		{"public ipv6 mapped", []string{"--public-ipv6=::ffff:10.0.0.1"}, nil, "--public-ipv6", "is not an IPv6 address"},
		{"public ipv6 CIDR from env", nil, map[string]string{"FLANNELD_PUBLIC_IPV6": "fd00::1/64"}, "--public-ipv6", "is not an IPv6 address"},
		{"key without cert", []string{"--etcd-keyfile=/k"}, nil, "--etcd-keyfile", "give both or neither"},
		{"ip-masq not a bool", []string{"--ip-masq=maybe"}, nil, "--ip-masq", "must be true or false"},
		{"ip-masq from env", nil, map[string]string{"FLANNELD_IP_MASQ": "maybe"}, "FLANNELD_IP_MASQ", "must be true or false"},
		{"version not a bool", []string{"--version=maybe"}, nil, "--version", "must be true or false"},
		{"klog bool", []string{"--logtostderr=maybe"}, nil, "--logtostderr", "must be true or false"},
		{"klog size", []string{"--log_file_max_size=1G"}, nil, "--log_file_max_size", "whole number"},
		{"klog verbosity", []string{"-v=x"}, nil, "--v", "whole number"},
		{"klog verbosity from env", nil, map[string]string{"FLANNELD_V": "high"}, "FLANNELD_V", "whole number"},
		{"unknown shorthand", []string{"-x"}, nil, "-x", "flanneld --help"},
		{"unknown flag", []string{"--etcd-endpoint=http://10.0.0.1:2379"}, nil, "--etcd-endpoint", "flanneld --help"},
		{"three dashes", []string{"---iface=eth0"}, nil, "---iface", "bad flag syntax"},
		{"bad iface regex", []string{"--iface-regex=("}, nil, "--iface-regex", "not a valid regular expression"},
		{"bad iface regex from env", nil, map[string]string{"FLANNELD_IFACE_REGEX": "10\\.[0-"}, "--iface-regex", "not a valid regular expression"},
		{"empty iface", []string{"--iface="}, nil, "--iface", "give an interface name or IPv4 address"},
		{"empty iface in env list", nil, map[string]string{"FLANNELD_IFACE": "eth0,,eth1"}, "--iface", "give an interface name or IPv4 address"},
		{"empty subnet file", []string{"--subnet-file="}, nil, "--subnet-file", "give a path such as /run/flannel/subnet.env"},
		{"blank subnet file from env", nil, map[string]string{"FLANNELD_SUBNET_FILE": " "}, "--subnet-file", "give a path such as /run/flannel/subnet.env"},
		{"empty endpoints", []string{"--etcd-endpoints="}, nil, "--etcd-endpoints", "such as http://127.0.0.1:2379"},
		{"only commas", []string{"--etcd-endpoints=, ,"}, nil, "--etcd-endpoints", "such as http://127.0.0.1:2379"},
		{"empty prefix", []string{"--etcd-prefix="}, nil, "--etcd-prefix", "such as /coreos.com/network"},
		{"relative prefix", []string{"--etcd-prefix=coreos.com/network"}, nil, "--etcd-prefix", "such as /coreos.com/network"},
		{"unknown etcd API", []string{"--etcd-api=v4"}, nil, "--etcd-api", "use auto, v2 or v3"},
		{"etcd API from env", nil, map[string]string{"FLANNELD_ETCD_API": "3"}, "--etcd-api", "use auto, v2 or v3"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, err := parseFlags(tt.args, env(tt.env))
			if err == nil {
				t.Fatalf("parseFlags(%q, %v) = %+v, want an error", tt.args, tt.env, f)
			}
			msg := err.Error()
			if strings.ContainsAny(msg, "\n\r") {
				t.Errorf("error spans lines: %q", msg)
			}
			if !strings.Contains(msg, tt.names) || !strings.Contains(msg, tt.fix) {
				t.Errorf("error %q: want it to name %q and say %q", msg, tt.names, tt.fix)
			}
		})
	}
}

// TestFlagGoodInputStillParses guards the checks above against refusing
// what flannel accepts.
func TestFlagGoodInputStillParses(t *testing.T) {
	for _, tc := range []struct {
		args []string
		env  map[string]string
	}{
		{[]string{"--iface-regex=^10\\.", "--iface-regex=eth[0-9]+", "--iface=10.0.0.5", "--iface=eth0"}, nil},
		{[]string{"--etcd-prefix=/coreos.com/network/", "--etcd-endpoints=http://10.0.0.1:2379, https://10.0.0.2:2379"}, nil},
		{[]string{"--healthz-port=8080", "--healthz-ip=::1", "--public-ip=192.168.8.1", "-v=4"}, nil},
		{[]string{"--public-ipv6=fd00::1"}, map[string]string{"FLANNELD_PUBLIC_IPV6": "fd00::2"}},
		{nil, map[string]string{"FLANNELD_IFACE": " eth0 , eth1", "FLANNELD_SUBNET_FILE": "/tmp/s.env", "FLANNELD_V": "2"}},
		{[]string{"--etcd-api=v2"}, nil},
		{nil, map[string]string{"FLANNELD_ETCD_API": "v3"}},
	} {
		if _, err := parseFlags(tc.args, env(tc.env)); err != nil {
			t.Errorf("parseFlags(%q, %v) = %v, want success", tc.args, tc.env, err)
		}
	}
}

// TestIfaceBadInput: --iface and --iface-regex values that name no usable
// interface fail at start with one line giving each reason. It only reads
// this namespace's links and addresses; the names cannot exist (pid in
// them) and 203.0.113.0/24 is TEST-NET-3.
func TestIfaceBadInput(t *testing.T) {
	missing := fmt.Sprintf("nosuch%d", os.Getpid()%100000)
	names := []string{missing, "fd00::1", "203.0.113.77"}
	regexes := []string{fmt.Sprintf("^no-such-iface-%d$", os.Getpid())}
	f, err := parseFlags([]string{"--iface=" + names[0], "--iface=" + names[1], "--iface=" + names[2], "--iface-regex=" + regexes[0]}, env(nil))
	if err != nil {
		t.Fatal(err)
	}
	_, err = ip.ChooseInterface(nil, f.iface, f.ifaceRegex)
	if !errors.Is(err, ip.ErrNoInterface) {
		t.Fatalf("ChooseInterface(%q, %q) = %v, want ErrNoInterface", names, regexes, err)
	}
	msg := err.Error()
	if strings.ContainsAny(msg, "\n\r") {
		t.Errorf("error spans lines: %q", msg)
	}
	for _, want := range []string{
		"--iface " + missing + ": no such interface",
		"--iface fd00::1: no interface has this address",
		"--iface 203.0.113.77: no interface has this address",
		"--iface-regex \"" + regexes[0] + "\" matches no interface",
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q: want it to say %q", msg, want)
		}
	}
}
