package e2e

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/flanneld-go/flanneld/e2e/lab"
)

const udpConfig = `{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}`

// TestUDP runs three hosts on the udp backend: leases in flannel's form
// (no BackendType) written and followed, flannel0 as WIRE.md says,
// FLANNEL_MTU = eth0 - 28, overlay pings between every pair, and a lease
// removed stops traffic to it with ICMP net-unreachable from the sender's
// own flanneld (the packet never leaves the host).
func TestUDP(t *testing.T) {
	l := newLab(t, 3, udpConfig)
	hosts := l.Hosts()
	envs := startAll(t, l, "--healthz-port", "8471", "--healthz-ip", "127.0.0.1")
	for i, h := range hosts {
		mtu, err := linkMTU(h, "eth0")
		if err != nil {
			t.Fatal(err)
		}
		if envs[i].MTU != mtu-28 {
			t.Errorf("%s: FLANNEL_MTU = %d, want eth0 MTU %d - 28", h.Name, envs[i].MTU, mtu)
		}
		if err := checkFlannel0(h, envs[i].Subnet, mtu-28); err != nil {
			t.Errorf("%s: %v", h.Name, err)
		}
	}
	leases, err := readLeases(testCtx(t, converge), l)
	if err != nil {
		t.Fatal(err)
	}
	for i, h := range hosts {
		ls := leasesOf(leases, h)
		if len(ls) != 1 || ls[0].PublicIP != h.Addr || ls[0].BackendType != "" || ls[0].Subnet != envs[i].Subnet.Masked() {
			t.Errorf("%s: leases %+v, want one udp lease for %s", h.Name, ls, envs[i].Subnet)
		}
		// Written as flannel's udp backend writes it, so that flannel's
		// nodes and ours take each other's leases (WIRE.md, udp).
		resp, err := l.KeysAPI().Get(testCtx(t, converge), leaseKey(l, envs[i].Subnet.Masked()), nil)
		if want := `{"PublicIP":"` + h.Addr.String() + `"}`; err != nil || resp.Node.Value != want {
			t.Errorf("%s: lease value %v (%v), want %s", h.Name, resp, err, want)
		}
	}
	setBridges(t, hosts, envs)
	pingAll(t, hosts, envs)

	// The data path is counted in /metrics.
	ctx := testCtx(t, converge)
	_, body, err := httpGet(ctx, hosts[0], "http://127.0.0.1:8471/metrics")
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []string{`flannel_udp_packets_total{direction="tx"}`, `flannel_udp_packets_total{direction="rx"}`, `flannel_leases`} {
		if v := metricValue(body, m); v <= 0 {
			t.Errorf("metric %s = %v, want > 0", m, v)
		}
	}

	// host3 goes away for good: its lease is deleted, and host1 answers
	// traffic for it with net-unreachable.
	if code := stop(t, hosts[2].Daemon()); code != 0 {
		t.Errorf("host3 exit code %d, want 0", code)
	}
	if _, err := l.KeysAPI().Delete(ctx, leaseKey(l, envs[2].Subnet.Masked()), nil); err != nil {
		t.Fatal(err)
	}
	eventually(t, "host1 answering net-unreachable for host3's subnet", func() error {
		out, err := hosts[0].Exec(ctx, "ping", "-c", "1", "-W", "1", "-I", envs[0].Subnet.Addr().String(), envs[2].Subnet.Addr().String())
		if err == nil {
			return errors.New("ping to the removed lease still answered")
		}
		if !strings.Contains(out, "Destination Net Unreachable") {
			return fmt.Errorf("ping output lacks net-unreachable: %q", out)
		}
		return nil
	})
	_, body, err = httpGet(ctx, hosts[0], "http://127.0.0.1:8471/metrics")
	if err != nil {
		t.Fatal(err)
	}
	if v := metricValue(body, `flannel_udp_drops_total{reason="no_route"}`); v <= 0 {
		t.Errorf("no_route drops = %v, want > 0", v)
	}
	if v := metricValue(body, `flannel_udp_unreachable_total`); v <= 0 {
		t.Errorf("net-unreachable answers = %v, want > 0", v)
	}
	// host1 and host2 still reach each other.
	if err := hosts[0].WaitPing(ctx, envs[0].Subnet.Addr(), envs[1].Subnet.Addr()); err != nil {
		t.Error(err)
	}
}

// TestMetrics scrapes /metrics of a converged host-gw host: non-zero lease
// and route figures.
func TestMetrics(t *testing.T) {
	l := newLab(t, 2, hostGWConfig)
	startAll(t, l, "--healthz-port", "8471", "--healthz-ip", "127.0.0.1")
	ctx := testCtx(t, converge)
	eventually(t, "metrics of a converged host", func() error {
		_, body, err := httpGet(ctx, l.Host(1), "http://127.0.0.1:8471/metrics")
		if err != nil {
			return err
		}
		for m, want := range map[string]float64{
			`flannel_leases`: 2,
			`flannel_programmed_entries{backend="host-gw",kind="route"}`: 1,
			`flannel_lease_acquisitions_total`:                           1,
			`flannel_iptables_restores_total`:                            1, // FLANNEL-FWD installed at start
		} {
			if v := metricValue(body, m); v != want {
				return fmt.Errorf("metric %s = %v, want %v", m, v, want)
			}
		}
		if v := metricValue(body, "flannel_lease_expiration_timestamp_seconds"); v < 1e9 {
			return fmt.Errorf("lease expiration = %v, want a Unix time", v)
		}
		if v := metricValue(body, "flannel_reconcile_duration_seconds_count"); v < 1 {
			return fmt.Errorf("reconcile count = %v, want >= 1", v)
		}
		return nil
	})
}

// metricValue returns the value of the sample named exactly name (with its
// labels) in a Prometheus text exposition, or -1.
func metricValue(body, name string) float64 {
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` (\S+)$`)
	m := re.FindStringSubmatch(body)
	if m == nil {
		return -1
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		return -1
	}
	return v
}

// checkFlannel0 checks the TUN device: up, the MTU, and exactly the address
// <lease subnet IP>/<Network prefix>.
func checkFlannel0(h *lab.Host, lease netip.Prefix, mtu int) error {
	return withNetlink(h, func(nh *netlink.Handle) error {
		link, err := nh.LinkByName("flannel0")
		if err != nil {
			return fmt.Errorf("flannel0: %w", err)
		}
		if link.Type() != "tuntap" || link.Attrs().MTU != mtu || link.Attrs().Flags&(1<<0) == 0 {
			return fmt.Errorf("flannel0: type %s, MTU %d, flags %v; want tuntap, %d, up", link.Type(), link.Attrs().MTU, link.Attrs().Flags, mtu)
		}
		addrs, err := nh.AddrList(link, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		want := fmt.Sprintf("%s/%d", lease.Masked().Addr(), network.Bits())
		if len(addrs) != 1 || addrs[0].IPNet.String() != want {
			return fmt.Errorf("flannel0 addresses %v, want exactly %s", addrs, want)
		}
		return nil
	})
}
