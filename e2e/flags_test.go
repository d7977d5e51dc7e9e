package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestRuleAndRouteFlags runs the daemon with flannel v0.28's rule and route
// flags: --iptables-forward-rules=false leaves no FLANNEL-FWD chain or jump
// (the one of the earlier run with the default removed),
// --ip-masq-fully-random-disable writes MASQUERADE without --random-fully,
// and --ip-blackhole-route keeps a blackhole route for the subnet, put back
// after it is deleted by hand.
func TestRuleAndRouteFlags(t *testing.T) {
	t.Parallel()
	l := newLab(t, 1, hostGWConfig)
	ctx := testCtx(t, 2*time.Minute)
	h := l.Host(1)
	startDaemon(t, h, "--ip-masq", "--iptables-resync", "1")
	env := waitEnv(t, h)
	eventually(t, "rules with the defaults", func() error { return checkRules(ctx, h, network, env.Subnet, true) })
	stop(t, h.Daemon())

	startDaemon(t, h, "--ip-masq", "--iptables-resync", "1", "--iptables-forward-rules=false",
		"--ip-masq-fully-random-disable", "--ip-blackhole-route")
	waitEnv(t, h)
	eventually(t, "no forward chain, plain MASQUERADE", func() error {
		out, err := h.Exec(ctx, "iptables-save")
		if err != nil {
			return err
		}
		if strings.Contains(out, "FLANNEL-FWD") {
			return fmt.Errorf("FLANNEL-FWD still in place:\n%s", out)
		}
		if strings.Contains(out, "random-fully") || strings.Count(out, "-j MASQUERADE") != 2 {
			return fmt.Errorf("want two MASQUERADE rules without --random-fully:\n%s", out)
		}
		return nil
	})
	blackhole := func() error {
		out, err := h.Exec(ctx, "ip", "route", "show", "type", "blackhole")
		if err != nil {
			return err
		}
		if !strings.Contains(out, "blackhole "+env.Subnet.Masked().String()) {
			return fmt.Errorf("no blackhole route for %s:\n%s", env.Subnet.Masked(), out)
		}
		return nil
	}
	eventually(t, "the blackhole route", blackhole)
	if out, err := h.Exec(ctx, "ip", "route", "del", "blackhole", env.Subnet.Masked().String()); err != nil {
		t.Fatalf("deleting the blackhole route: %v\n%s", err, out)
	}
	eventually(t, "the blackhole route back", blackhole)
}
