package network

import (
	"errors"
	"slices"
	"testing"
)

func TestSplitRule(t *testing.T) {
	tests := []struct {
		line    string
		want    []string
		wantErr error
	}{
		{line: "-P FORWARD ACCEPT", want: []string{"-P", "FORWARD", "ACCEPT"}},
		{
			line: `-A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment "flanneld forward from network" -j ACCEPT`,
			want: []string{"-A", "FLANNEL-FWD", "-s", "10.5.0.0/16", "-m", "comment", "--comment", "flanneld forward from network", "-j", "ACCEPT"},
		},
		{line: `-A X -m comment --comment flanneld -j RETURN`, want: []string{"-A", "X", "-m", "comment", "--comment", "flanneld", "-j", "RETURN"}},
		// As iptables prints the comment `a "q" \b x`.
		{line: `-A X -m comment --comment "a \"q\" \\b x" -j RETURN`, want: []string{"-A", "X", "-m", "comment", "--comment", `a "q" \b x`, "-j", "RETURN"}},
		{line: `-A X -m comment --comment "" -j RETURN`, want: []string{"-A", "X", "-m", "comment", "--comment", "", "-j", "RETURN"}},
		{line: "  -A\tX  ! -s 1.2.3.0/24 ", want: []string{"-A", "X", "!", "-s", "1.2.3.0/24"}},
		{line: "", want: nil},
		{line: `-A X --comment "open`, wantErr: errUnterminatedQuote},
		{line: `-A X --comment open\`, wantErr: errUnterminatedQuote},
	}
	for _, tt := range tests {
		got, err := splitRule(tt.line)
		if !errors.Is(err, tt.wantErr) {
			t.Errorf("splitRule(%q) error = %v, want %v", tt.line, err, tt.wantErr)
			continue
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("splitRule(%q) = %q, want %q", tt.line, got, tt.want)
		}
	}
}

func TestChainMatches(t *testing.T) {
	want := [][]string{
		{"-s", "10.5.0.0/16", "-m", "comment", "--comment", "flanneld a", "-j", "ACCEPT"},
		{"-d", "10.5.0.0/16", "-m", "comment", "--comment", "flanneld b", "-j", "ACCEPT"},
	}
	r1 := `-A C -s 10.5.0.0/16 -m comment --comment "flanneld a" -j ACCEPT`
	r2 := `-A C -d 10.5.0.0/16 -m comment --comment "flanneld b" -j ACCEPT`
	tests := []struct {
		name    string
		listing []string
		want    bool
	}{
		{"exact", []string{"-N C", r1, r2}, true},
		{"with counters", []string{"-N C", r1 + " -c 10 2000", r2 + " -c 0 0"}, true},
		{"empty chain", []string{"-N C"}, false},
		{"missing rule", []string{"-N C", r2}, false},
		{"out of order", []string{"-N C", r2, r1}, false},
		{"extra rule", []string{"-N C", r1, r2, "-A C -j RETURN"}, false},
		{"duplicate", []string{"-N C", r1, r1, r2}, false},
		{"other comment", []string{"-N C", r1, `-A C -d 10.5.0.0/16 -m comment --comment "flanneld c" -j ACCEPT`}, false},
		{"other chain", []string{"-N D", `-A D -s 10.5.0.0/16 -m comment --comment "flanneld a" -j ACCEPT`, `-A D -d 10.5.0.0/16 -m comment --comment "flanneld b" -j ACCEPT`}, false},
		{"unreadable line", []string{"-N C", r1, r2, `-A C --comment "x`}, false},
	}
	for _, tt := range tests {
		if got := chainMatches(tt.listing, "C", want); got != tt.want {
			t.Errorf("%s: chainMatches = %v, want %v", tt.name, got, tt.want)
		}
	}
}

func TestJumpsTo(t *testing.T) {
	tests := []struct {
		spec []string
		want bool
	}{
		{[]string{"-m", "comment", "--comment", "flanneld masquerade", "-j", "FLANNEL-POSTRTG"}, true},
		{[]string{"-j", "FLANNEL-POSTRTG"}, true},
		{[]string{"-g", "FLANNEL-POSTRTG"}, true},
		{[]string{"-j", "FLANNEL-POSTRTG-X"}, false},
		{[]string{"-m", "comment", "--comment", "FLANNEL-POSTRTG", "-j", "RETURN"}, false},
		{[]string{"-j"}, false},
	}
	for _, tt := range tests {
		if got := jumpsTo(tt.spec, "FLANNEL-POSTRTG"); got != tt.want {
			t.Errorf("jumpsTo(%q) = %v, want %v", tt.spec, got, tt.want)
		}
	}
}
