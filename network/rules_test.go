package network

import (
	"net/netip"
	"slices"
	"testing"
)

func TestRules(t *testing.T) {
	fwd := []string{
		`-t filter -A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD`,
		`-t filter -A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment "flanneld forward from network" -j ACCEPT`,
		`-t filter -A FLANNEL-FWD -d 10.5.0.0/16 -m comment --comment "flanneld forward to network" -j ACCEPT`,
	}
	tests := []struct {
		name    string
		network string
		lease   string
		ipMasq  bool
		want    []string
	}{
		{
			name:    "forward only without ip-masq",
			network: "10.5.0.0/16", lease: "10.5.34.0/24",
			want: fwd,
		},
		{
			name:    "forward and masquerade in order",
			network: "10.5.0.0/16", lease: "10.5.34.0/24", ipMasq: true,
			want: append(slices.Clone(fwd),
				`-t nat -A POSTROUTING -m comment --comment "flanneld masquerade" -j FLANNEL-POSTRTG`,
				`-t nat -A FLANNEL-POSTRTG -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld no masq within network" -j RETURN`,
				`-t nat -A FLANNEL-POSTRTG -s 10.5.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq leaving network" -j MASQUERADE`,
				`-t nat -A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.34.0/24 -m comment --comment "flanneld no masq to own subnet" -j RETURN`,
				`-t nat -A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld masq entering network" -j MASQUERADE`,
			),
		},
		{
			name:    "host bits are masked",
			network: "10.1.2.3/8", lease: "10.200.7.1/20", ipMasq: true,
			want: []string{
				`-t filter -A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD`,
				`-t filter -A FLANNEL-FWD -s 10.0.0.0/8 -m comment --comment "flanneld forward from network" -j ACCEPT`,
				`-t filter -A FLANNEL-FWD -d 10.0.0.0/8 -m comment --comment "flanneld forward to network" -j ACCEPT`,
				`-t nat -A POSTROUTING -m comment --comment "flanneld masquerade" -j FLANNEL-POSTRTG`,
				`-t nat -A FLANNEL-POSTRTG -s 10.0.0.0/8 -d 10.0.0.0/8 -m comment --comment "flanneld no masq within network" -j RETURN`,
				`-t nat -A FLANNEL-POSTRTG -s 10.0.0.0/8 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq leaving network" -j MASQUERADE`,
				`-t nat -A FLANNEL-POSTRTG ! -s 10.0.0.0/8 -d 10.200.0.0/20 -m comment --comment "flanneld no masq to own subnet" -j RETURN`,
				`-t nat -A FLANNEL-POSTRTG ! -s 10.0.0.0/8 -d 10.0.0.0/8 -m comment --comment "flanneld masq entering network" -j MASQUERADE`,
			},
		},
		{
			name:    "IPv6 for ip6tables, multicast ff00::/8",
			network: "fc00:0:0:1::5/48", lease: "fc00:0:0:22::1/64", ipMasq: true,
			want: []string{
				`-t filter -A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD`,
				`-t filter -A FLANNEL-FWD -s fc00::/48 -m comment --comment "flanneld forward from network" -j ACCEPT`,
				`-t filter -A FLANNEL-FWD -d fc00::/48 -m comment --comment "flanneld forward to network" -j ACCEPT`,
				`-t nat -A POSTROUTING -m comment --comment "flanneld masquerade" -j FLANNEL-POSTRTG`,
				`-t nat -A FLANNEL-POSTRTG -s fc00::/48 -d fc00::/48 -m comment --comment "flanneld no masq within network" -j RETURN`,
				`-t nat -A FLANNEL-POSTRTG -s fc00::/48 ! -d ff00::/8 -m comment --comment "flanneld masq leaving network" -j MASQUERADE`,
				`-t nat -A FLANNEL-POSTRTG ! -s fc00::/48 -d fc00:0:0:22::/64 -m comment --comment "flanneld no masq to own subnet" -j RETURN`,
				`-t nat -A FLANNEL-POSTRTG ! -s fc00::/48 -d fc00::/48 -m comment --comment "flanneld masq entering network" -j MASQUERADE`,
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rules := Rules(netip.MustParsePrefix(tt.network), netip.MustParsePrefix(tt.lease), tt.ipMasq)
			var got []string
			for _, r := range rules {
				got = append(got, r.String())
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("Rules() =\n%s\nwant\n%s", lines(got), lines(tt.want))
			}
		})
	}
}

// TestRulesData checks the fields behind String: the comment is one argument
// naming the daemon, and every rule carries one.
func TestRulesData(t *testing.T) {
	rules := Rules(netip.MustParsePrefix("10.5.0.0/16"), netip.MustParsePrefix("10.5.34.0/24"), true)
	if len(rules) != 8 {
		t.Fatalf("Rules() returned %d rules, want 8", len(rules))
	}
	for _, r := range rules {
		i := slices.Index(r.Spec, "--comment")
		if i < 1 || r.Spec[i-1] != "comment" || r.Spec[i-2] != "-m" || i+1 >= len(r.Spec) {
			t.Errorf("rule %v has no comment match", r)
			continue
		}
		if c := r.Spec[i+1]; len(c) < len("flanneld ") || c[:len("flanneld ")] != "flanneld " {
			t.Errorf("rule %v: comment %q does not name the daemon", r, c)
		}
	}
	if r := rules[0]; r.Table != TableFilter || r.Chain != "FORWARD" {
		t.Errorf("first rule is in %s %s, want filter FORWARD", r.Table, r.Chain)
	}
	if r := rules[3]; r.Table != TableNAT || r.Chain != "POSTROUTING" {
		t.Errorf("fourth rule is in %s %s, want nat POSTROUTING", r.Table, r.Chain)
	}
}

func lines(s []string) string {
	out := ""
	for _, l := range s {
		out += "\t" + l + "\n"
	}
	return out
}
