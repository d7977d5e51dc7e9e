package ip

import (
	"strings"
	"testing"
)

// FuzzParseKey checks the lease key codec on any string: ParseKey never
// panics, what it accepts is a masked IPv4 prefix whose Key is exactly the
// input (one spelling per subnet, so two nodes can never write the same
// subnet under two names), and what it rejects gets a one-line error.
//
//	go test -run '^$' -fuzz '^FuzzParseKey$' -fuzztime 30s ./pkg/ip/
func FuzzParseKey(f *testing.F) {
	for _, s := range []string{
		"10.5.34.0-24", "0.0.0.0-0", "255.255.255.255-32", "10.5.0.4-30", "192.168.8.128-25",
		"10.5.34.1-24", "10.5.34.0-024", "10.5.34.0-+24", "10.5.34.0-33", "10.5.34.0--1",
		"10.5.34.0-24-1", "010.5.34.0-24", "10.5.34.0/24", "fd00::-64", "::ffff:10.5.34.0-120",
		"10.5.34.0-", "-24", "", "10.5.34.0-2\n4", "10.5.34.0-٢٤",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParseKey(s)
		if err != nil {
			if strings.ContainsAny(err.Error(), "\n\r") {
				t.Errorf("ParseKey(%q) error is not one line: %q", s, err)
			}
			return
		}
		if !p.IsValid() || !p.Addr().Is4() {
			t.Fatalf("ParseKey(%q) = %v: not an IPv4 prefix", s, p)
		}
		if p.Masked() != p {
			t.Errorf("ParseKey(%q) = %v: host bits set", s, p)
		}
		if got := Key(p); got != s {
			t.Errorf("Key(ParseKey(%q)) = %q, want the input back", s, got)
		}
		if back, err := ParseKey(Key(p)); err != nil || back != p {
			t.Errorf("ParseKey(Key(%v)) = %v, %v", p, back, err)
		}
	})
}

// FuzzParseLeaseKey checks the dual-stack key codec the same way: no panic,
// one spelling per lease (LeaseKey gives the input back), one-line errors.
//
//	go test -run '^$' -fuzz '^FuzzParseLeaseKey$' -fuzztime 30s ./pkg/ip/
func FuzzParseLeaseKey(f *testing.F) {
	for _, s := range []string{
		"10.5.34.0-24", "10.5.34.0-24&fc00:0:0:22::-64", "0.0.0.0-0&fc00::-48", "0.0.0.0-0",
		"10.5.34.0-24&fc00:0000::-64", "10.5.34.0-24&fc00::1-64", "10.5.34.0-24&fc00::-129",
		"10.5.34.0-24&10.5.0.0-16", "10.5.34.0-24&::ffff:10.0.0.0-120", "10.5.34.0-24&", "&fc00::-64",
		"10.5.34.0-24&fc00::-64&fd00::-64", "10.5.34.0-24&fc00::%eth0-64", "10.5.34.0-24&FC00::-64",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		v4, v6, err := ParseLeaseKey(s)
		if err != nil {
			if strings.ContainsAny(err.Error(), "\n\r") {
				t.Errorf("ParseLeaseKey(%q) error is not one line: %q", s, err)
			}
			return
		}
		if !v4.IsValid() && !v6.IsValid() {
			t.Fatalf("ParseLeaseKey(%q) gave no subnet", s)
		}
		if v4.IsValid() && (!v4.Addr().Is4() || v4.Masked() != v4) {
			t.Errorf("ParseLeaseKey(%q) IPv4 part %v", s, v4)
		}
		if v6.IsValid() && (!v6.Addr().Is6() || v6.Addr().Is4In6() || v6.Masked() != v6) {
			t.Errorf("ParseLeaseKey(%q) IPv6 part %v", s, v6)
		}
		if got := LeaseKey(v4, v6); got != s {
			t.Errorf("LeaseKey(ParseLeaseKey(%q)) = %q, want the input back", s, got)
		}
	})
}
