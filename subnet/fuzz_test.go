package subnet

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/flanneld-go/flanneld/pkg/ip"
)

// The fuzz targets below run one at a time, for example:
//
//	go test -run '^$' -fuzz '^FuzzParseConfig$' -fuzztime 30s ./subnet/
//
// Their seeds are the f.Add calls and testdata/fuzz/<FuzzName>/.

// oneLine fails t when err's text spans lines or is long: a user's
// mistake gets one short line naming the problem, however big the input.
func oneLine(t *testing.T, what string, err error) {
	t.Helper()
	if msg := err.Error(); strings.ContainsAny(msg, "\n\r") || len(msg) > 512 {
		t.Errorf("%s: error is not one short line (%d bytes): %.600q", what, len(msg), msg)
	}
}

func FuzzParseConfig(f *testing.F) {
	for _, s := range []string{
		`{"Network":"10.5.0.0/16","SubnetLen":24,"SubnetMin":"10.5.1.0","SubnetMax":"10.5.254.0","Backend":{"Type":"vxlan","VNI":1}}`,
		`{"Network":"10.5.0.0/16"}`,
		`{"Network":"0.0.0.0/0"}`,
		`{"Network":"0.0.0.0/0","SubnetLen":2}`,
		`{"Network":"255.255.255.240/28"}`,
		`{"Network":"10.5.1.7/16","SubnetLen":30,"SubnetMin":"10.5.255.252"}`,
		`{"network":"10.0.0.0/8","SUBNETLEN":26,"backend":{"type":"host-gw"},"EnableIPv6":true}`,
		`{"Network":"10.5.0.0/16","SubnetLen":-1}`,
		`{"Network":"10.5.0.0/16","SubnetLen":1e3}`,
		`{"Network":"10.5.0.0/16","SubnetLen":24.0}`,
		`{"Network":"10.5.0.0/16","SubnetLen":[24,` + "\n" + `25]}`,
		`{"Network":"10.5.0.0/16","SubnetMin":"10.5.9.0","SubnetMax":"10.5.8.0"}`,
		`{"Network":"10.5.0.0/16","SubnetMin":"::ffff:10.5.1.0"}`,
		`{"Network":"::ffff:10.5.0.0/112"}`,
		`{"Network":"10.5.0.0/16","Backend":null}`,
		`{"Network":"10.5.0.0/16","Backend":{"Type":""}}`,
		`{"Network":"10.5.0.0/16","Network":"fd00::/64"}`,
		`{"Network":"10.5.0.0/16"}]`,
		`{"Network":"10.5.0.0/16"} {}`,
		`null`, `[]`, `{`, "",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := ParseConfig(data)
		if err != nil {
			if cfg != nil {
				t.Errorf("ParseConfig returned a config and an error: %+v, %v", cfg, err)
			}
			var ce *ConfigError
			if !errors.Is(err, ErrInvalidConfig) || !errors.As(err, &ce) {
				t.Errorf("ParseConfig(%q) = %v (%T), want a *ConfigError", data, err, err)
			}
			oneLine(t, "ParseConfig", err)
			return
		}
		// Exactly one JSON value, as flannel's json.Unmarshal wants: a
		// config that only this daemon accepts would split the cluster.
		if !json.Valid(data) {
			t.Errorf("ParseConfig accepted %q, which is not one JSON value", data)
		}
		nw := cfg.Network
		if !nw.Addr().Is4() || nw.Masked() != nw || nw.Bits() > 28 {
			t.Fatalf("Network %v: want a masked IPv4 prefix of /28 or shorter", nw)
		}
		if cfg.SubnetLen < nw.Bits()+2 || cfg.SubnetLen > 30 {
			t.Fatalf("SubnetLen %d outside [%d, 30]", cfg.SubnetLen, nw.Bits()+2)
		}
		if !cfg.SubnetMin.Is4() || !cfg.SubnetMax.Is4() || ip.Uint32(cfg.SubnetMin) > ip.Uint32(cfg.SubnetMax) {
			t.Fatalf("SubnetMin %v, SubnetMax %v: want IPv4 with Min ≤ Max", cfg.SubnetMin, cfg.SubnetMax)
		}
		lo := netip.PrefixFrom(cfg.SubnetMin, cfg.SubnetLen)
		hi := netip.PrefixFrom(cfg.SubnetMax, cfg.SubnetLen)
		if !cfg.InRange(lo) || !cfg.InRange(hi) {
			t.Errorf("InRange(%v) = %v, InRange(%v) = %v; want both true", lo, cfg.InRange(lo), hi, cfg.InRange(hi))
		}
		if !ip.Contains(nw, lo) || !ip.Contains(nw, hi) {
			t.Errorf("%v or %v not inside Network %v", lo, hi, nw)
		}
		// The first leasable subnet is SubnetMin; one before it or after
		// SubnetMax is out of range.
		var first netip.Prefix
		cfg.Subnets(func(p netip.Prefix) bool { first = p; return false })
		if first != lo {
			t.Errorf("Subnets starts at %v, want %v", first, lo)
		}
		if next, ok := nextSubnet(hi); ok && cfg.InRange(next) {
			t.Errorf("InRange(%v) after SubnetMax %v", next, cfg.SubnetMax)
		}
		if cfg.BackendType == "" {
			t.Errorf("empty BackendType")
		}
		if cfg.Backend == nil && cfg.BackendType != DefaultBackendType {
			t.Errorf("BackendType %q without a Backend block, want %q", cfg.BackendType, DefaultBackendType)
		}
		if cfg.Backend != nil && !json.Valid(cfg.Backend) {
			t.Errorf("Backend %q is not valid JSON", cfg.Backend)
		}
	})
}

func FuzzParseLeaseAttrs(f *testing.F) {
	for _, s := range []string{
		`{"PublicIP":"192.168.8.101","BackendType":"vxlan","BackendData":{"VtepMAC":"82:4b:b6:2f:54:4e"}}`,
		`{"PublicIP":"10.0.0.1"}`,
		`{"publicip":"10.0.0.1","backendtype":"udp","BackendData":null}`,
		`{"PublicIP":"10.0.0.1","BackendData":  { "a" : [1, 2.50, "<&>"] } }`,
		`{"PublicIP":"10.0.0.1","BackendType":"\u2028\ud800"}`,
		`{"PublicIP":"10.0.0.1","BackendData":1e999}`,
		`{"PublicIP":"fd00::1"}`, `{"PublicIP":"::ffff:10.0.0.1"}`, `{"PublicIP":5}`, `{"PublicIP":null}`,
		`{}`, `[]`, `null`, `garbage`, "",
		`{"PublicIP":"10.0.0.1","BackendType":"host-gw"}`,
		`{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":null}`,
		`{"PublicIP":"10.0.0.1","BackendData":{"a":1},"BackendType":"x"}`,
		`{"PublicIP":"10.0.0.1","BackendData":{}}}`,
		`{"PublicIP":"10.0.0.1","BackendType":"a\"b"}`,
		`{"PublicIP":"10.0.0.1"} `,
		`{"PublicIP":"10.5.0.4","PublicIPv6":"fc00::4","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"82:4b:b6:2f:54:4e"},"BackendV6Data":{"VNI":1,"VtepMAC":"82:4b:b6:2f:54:4f"}}`,
		`{"PublicIP":"10.5.0.4","PublicIPv6":null,"BackendType":"vxlan"}`,
		`{"PublicIP":"10.5.0.4","PublicIPv6":"10.0.0.1"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		// The fast path, where it answers, agrees with encoding/json.
		if fa, ok := parseCanonical(data); ok {
			sa, err := parseLeaseAttrsJSON(data)
			if err != nil || fa.PublicIP != sa.PublicIP || fa.BackendType != sa.BackendType || !bytes.Equal(fa.BackendData, sa.BackendData) ||
				(fa.BackendData == nil) != (sa.BackendData == nil) {
				t.Fatalf("%q: fast path %+v, encoding/json %+v (%v)", data, fa, sa, err)
			}
		}
		a, err := ParseLeaseAttrs(data)
		if err != nil {
			if !errors.Is(err, ErrBadLease) {
				t.Errorf("ParseLeaseAttrs(%q) = %v, want ErrBadLease", data, err)
			}
			oneLine(t, "ParseLeaseAttrs", err)
			return
		}
		if !a.PublicIP.Is4() {
			t.Fatalf("PublicIP %v is not IPv4", a.PublicIP)
		}
		if a.BackendData != nil && (!json.Valid(a.BackendData) || bytes.Equal(a.BackendData, []byte("null"))) {
			t.Errorf("BackendData %q: want valid JSON other than null, or nil", a.BackendData)
		}
		wire, err := a.Marshal()
		if err != nil {
			t.Fatalf("Marshal(%+v): %v", a, err)
		}
		b, err := ParseLeaseAttrs(wire)
		if err != nil {
			t.Fatalf("ParseLeaseAttrs(Marshal) = %v for %s", err, wire)
		}
		if b.PublicIP != a.PublicIP || b.BackendType != a.BackendType || (a.BackendData == nil) != (b.BackendData == nil) {
			t.Errorf("round trip changed the value: %+v → %s → %+v", a, wire, b)
		}
		// Marshal compacts BackendData; its meaning is kept and the wire
		// form is a fixed point.
		if a.BackendData != nil && !sameJSON(t, a.BackendData, b.BackendData) {
			t.Errorf("BackendData %s came back as %s", a.BackendData, b.BackendData)
		}
		if again, _ := b.Marshal(); !bytes.Equal(again, wire) {
			t.Errorf("Marshal is not stable: %s then %s", wire, again)
		}
	})
}

// sameJSON reports whether two JSON texts hold the same value.
func sameJSON(t *testing.T, x, y []byte) bool {
	t.Helper()
	decode := func(b []byte) any {
		d := json.NewDecoder(bytes.NewReader(b))
		d.UseNumber()
		var v any
		if err := d.Decode(&v); err != nil {
			t.Fatalf("decoding %q: %v", b, err)
		}
		return v
	}
	return reflect.DeepEqual(decode(x), decode(y))
}

func FuzzParseEnv(f *testing.F) {
	for _, s := range []string{
		"FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.34.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
		"# docker\n\nFLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=\"10.5.34.1/24\"\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\nOTHER=1\n",
		"FLANNEL_NETWORK='0.0.0.0/0'\r\nFLANNEL_SUBNET=255.255.255.253/30\r\nFLANNEL_MTU=+9000\r\nFLANNEL_IPMASQ=T\r\n",
		"FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.34.1/24\n",
		"FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.34.7/32\nFLANNEL_MTU=1450\n",
		"FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=255.255.255.255/32\nFLANNEL_MTU=1450\n",
		"FLANNEL_NETWORK=fd00::/64\nFLANNEL_SUBNET=fd00::1/80\n",
		"FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.34.1/24\nFLANNEL_MTU=0\n",
		"FLANNEL_NETWORK=10.5.0.0/16\njunk line\n",
		"\x00\x01\x02", "",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		e, err := ParseEnv(data)
		if err != nil {
			if !errors.Is(err, ErrBadEnv) {
				t.Errorf("ParseEnv(%q) = %v, want ErrBadEnv", data, err)
			}
			oneLine(t, "ParseEnv", err)
			return
		}
		for _, p := range []netip.Prefix{e.Network, e.Subnet} {
			if !p.Addr().Is4() || p.Masked() != p {
				t.Fatalf("ParseEnv(%q) = %+v: %v is not a masked IPv4 prefix", data, e, p)
			}
		}
		if e.MTU < 0 {
			t.Errorf("MTU %d", e.MTU)
		}
		wire := e.Marshal()
		back, err := ParseEnv(wire)
		if err != nil {
			t.Fatalf("ParseEnv(Marshal(%+v)) = %v; file:\n%s", e, err, wire)
		}
		if back != e {
			t.Errorf("round trip changed the file: %+v → %+v; file:\n%s", e, back, wire)
		}
	})
}

// nextSubnet returns the IPv4 subnet of the same length that follows p, and
// false when p is the last one.
func nextSubnet(p netip.Prefix) (netip.Prefix, bool) {
	v := uint64(ip.Uint32(p.Masked().Addr())) + 1<<(32-p.Bits())
	if v > 0xffffffff {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(ip.FromUint32(uint32(v)), p.Bits()), true
}
