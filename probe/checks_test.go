package probe

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/flanneld-go/flanneld/internal/nstest"
)

// TestMain doubles as a helper process holding a UDP port (for the busy
// port check, which must see another process's socket).
func TestMain(m *testing.M) {
	if port := os.Getenv("PROBE_TEST_HOLD_UDP"); port != "" {
		c, err := net.ListenPacket("udp4", ":"+port)
		if err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		fmt.Println("holding")
		time.Sleep(time.Minute)
		c.Close()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func find(checks []Check, name string) Check {
	for _, c := range checks {
		if c.Name == name {
			return c
		}
	}
	return Check{Name: name, Detail: "missing"}
}

// TestForwardPolicy reads iptables -S output as iptables 1.8 prints it.
func TestForwardPolicy(t *testing.T) {
	n := netip.MustParsePrefix("10.5.0.0/16")
	tests := []struct {
		name, rules string
		ok          bool
	}{
		{"accept policy", "-P INPUT ACCEPT\n-P FORWARD ACCEPT\n-P OUTPUT ACCEPT\n", true},
		{"drop, no rule", "-P INPUT ACCEPT\n-P FORWARD DROP\n-P OUTPUT ACCEPT\n-A FORWARD -s 10.6.0.0/16 -j ACCEPT\n", false},
		{"drop, flanneld's chain", "-P FORWARD DROP\n-N FLANNEL-FWD\n-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n" +
			"-A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment \"flanneld forward from network\" -j ACCEPT\n", true},
		{"drop, docker's chains only", "-P FORWARD DROP\n-N DOCKER-USER\n-A FORWARD -j DOCKER-USER\n-A DOCKER-USER -j RETURN\n", false},
		{"drop, rule to the network", "-P FORWARD DROP\n-A FORWARD -d 10.5.0.0/16 -j ACCEPT\n", true},
		{"drop, a loop of jumps", "-P FORWARD DROP\n-N A\n-N B\n-A FORWARD -j A\n-A A -j B\n-A B -j A\n", false},
	}
	for _, tt := range tests {
		c := forwardPolicy("iptables", tt.rules, n)
		if c.OK != tt.ok || (!c.OK && !strings.Contains(c.Fix, "-A FORWARD -s 10.5.0.0/16 -j ACCEPT")) {
			t.Errorf("%s: %+v, want ok %v", tt.name, c, tt.ok)
		}
	}
}

// TestHostChecks runs every check in a namespace made to fail each, then
// fixed (the peers' subnets given unsorted, as flanneld --check does):
// forwarding off, FORWARD DROP, an overlapping address and route, the
// port held by another process, a small MTU.
func TestHostChecks(t *testing.T) {
	ns := nstest.New(t, "probe")
	ns.Up(t, "lo")
	ns.Veth(t, "eth0", 0, nil, "veth-lan", "192.168.77.1/24")
	h := HostConfig{Network: netip.MustParsePrefix("10.5.0.0/16"), Backend: "vxlan", Port: 18472, Iface: "eth0", MTU: 1500,
		Own: netip.MustParsePrefix("10.5.1.0/24")}
	for _, p := range []string{"10.5.9.0/24", "10.5.2.0/24", "10.5.3.0/24"} {
		h.Peers.Add(netip.MustParsePrefix(p))
	}
	run := func() []Check {
		var res []Check
		inNS(t, ns, func() { res = RunChecks(context.Background(), h) })
		return res
	}
	sh := func(cmd string) {
		t.Helper()
		if out, err := ns.Command(context.Background(), "sh", "-c", cmd).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v: %s", cmd, err, out)
		}
	}
	// flanneld's own: a device named flannel.*, the own subnet on a
	// bridge, a host-gw route to a peer's subnet.
	sh("ip link add flannel.1 type bridge && ip addr add 10.5.1.0/32 dev flannel.1 && ip link set flannel.1 up && " +
		"ip link add docker0 type bridge && ip addr add 10.5.1.1/24 dev docker0 && ip link set docker0 up && " +
		"ip route add 10.5.2.0/24 via 192.168.77.2 dev eth0")

	res := run()
	if c := find(res, "forwarding"); c.OK || !strings.Contains(c.Fix, "sysctl -w net.ipv4.ip_forward=1") {
		t.Errorf("forwarding off in a new namespace: %+v", c)
	}
	if c := find(res, "overlap"); !c.OK {
		t.Errorf("only flanneld's routes and addresses: %+v", c)
	}
	if c := find(res, "port"); !c.OK {
		t.Errorf("free port: %+v", c)
	}
	if c := find(res, "mtu"); !c.OK {
		t.Errorf("MTU 1500: %+v", c)
	}

	sh("echo 1 > /proc/sys/net/ipv4/ip_forward && ip link add br-other type bridge && ip addr add 10.5.255.1/25 dev br-other && ip link set br-other up && " +
		"ip route add 10.5.7.0/24 via 192.168.77.9 dev eth0")
	if _, err := exec.LookPath("iptables"); err == nil {
		sh("iptables -P FORWARD DROP")
	}
	hold := exec.Command("ip", "netns", "exec", ns.Name, os.Args[0], "-test.run=^$")
	hold.Env = append(os.Environ(), "PROBE_TEST_HOLD_UDP=18472")
	out, err := hold.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := hold.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { hold.Process.Kill(); hold.Wait() }()
	buf := make([]byte, 64)
	if n, _ := out.Read(buf); !strings.Contains(string(buf[:n]), "holding") {
		t.Fatalf("helper process: %q", buf[:n])
	}
	h.MTU = 600
	res = run()
	if c := find(res, "forwarding"); !c.OK {
		t.Errorf("forwarding on: %+v", c)
	}
	if c := find(res, "overlap"); c.OK || !strings.Contains(c.Detail, "route 10.5.7.0/24 dev eth0") || !strings.Contains(c.Detail, "address 10.5.255.1/25 on br-other") ||
		!strings.Contains(c.Detail, "route 10.5.255.0/25 dev br-other") {
		t.Errorf("an overlapping address and route: %+v", c)
	}
	if c := find(res, "port"); c.OK || !strings.Contains(c.Detail, "UDP 18472, the vxlan backend's port, is held by probe.test (pid ") {
		t.Errorf("port held by another process: %+v", c)
	}
	if c := find(res, "mtu"); c.OK || !strings.Contains(c.Detail, "eth0 MTU 600 is below the 626 the vxlan backend needs") {
		t.Errorf("MTU 600: %+v", c)
	}
	if _, err := exec.LookPath("iptables"); err == nil {
		if c := find(res, "forward-policy"); c.OK {
			t.Errorf("FORWARD DROP without rules: %+v", c)
		}
	}
	// The port held by this process is ours.
	hold.Process.Kill()
	hold.Wait()
	var own net.PacketConn
	inNS(t, ns, func() { own, err = net.ListenPacket("udp4", ":18472") })
	if err != nil {
		t.Fatal(err)
	}
	defer own.Close()
	if c := find(run(), "port"); !c.OK {
		t.Errorf("port held by this process: %+v", c)
	}
}

// BenchmarkCheckOverlap is the overlap check of each resync with 10,000
// peer subnets, on this host's tables (it reads and changes nothing).
func BenchmarkCheckOverlap(b *testing.B) {
	h := HostConfig{Network: netip.MustParsePrefix("10.0.0.0/8"), Backend: "vxlan", Own: netip.MustParsePrefix("10.200.0.0/24")}
	for _, p := range benchPeers(10000) {
		h.Peers.Add(p.Subnet)
	}
	h.Peers.Sort()
	b.ReportAllocs()
	for b.Loop() {
		if c := checkOverlap(h); strings.HasPrefix(c.Detail, "not checked") {
			b.Fatal(c.Detail)
		}
	}
}
