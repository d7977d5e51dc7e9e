// Package subnet holds the network config, the lease types, the contract of
// the lease store, and the subnet.env file that docker reads.
package subnet

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"strings"

	"github.com/flanneld-go/flanneld/pkg/ip"
)

// ErrInvalidConfig matches (errors.Is) every error ParseConfig returns.
var ErrInvalidConfig = errors.New("invalid network config")

// ConfigError is the error ParseConfig returns: one line naming the field,
// the value and the rule it breaks.
type ConfigError struct {
	// Key is where the config was read from (e.g. the etcd key); the reader
	// fills it in, ParseConfig leaves it empty.
	Key string
	// Reason names the field, the value and the rule.
	Reason string
}

func (e *ConfigError) Error() string {
	if e.Key == "" {
		return ErrInvalidConfig.Error() + ": " + e.Reason
	}
	return ErrInvalidConfig.Error() + " at " + e.Key + ": " + e.Reason
}

// ConfigErrorAt names where the config was read in an error of
// ParseConfig: "invalid network config at /coreos.com/network/config:
// SubnetLen 31 is longer than 30".
func ConfigErrorAt(key string, err error) error {
	var ce *ConfigError
	if errors.As(err, &ce) {
		withKey := *ce
		withKey.Key = key
		return &withKey
	}
	return fmt.Errorf("%w at %s: %w", ErrInvalidConfig, key, err)
}

// Is makes errors.Is(err, ErrInvalidConfig) true.
func (e *ConfigError) Is(target error) bool { return target == ErrInvalidConfig }

// DefaultBackendType is the backend used when the config has no Backend block.
const DefaultBackendType = "udp"

// Config is the network config kept at <prefix>/config, with defaults applied.
type Config struct {
	// Network is the overlay network every lease is carved from.
	Network netip.Prefix
	// SubnetLen is the prefix length of each lease.
	SubnetLen int
	// SubnetMin and SubnetMax bound the first addresses of leased subnets.
	SubnetMin netip.Addr
	SubnetMax netip.Addr
	// BackendType is Backend.Type, "udp" when the Backend block is absent.
	BackendType string
	// Backend is the raw Backend object, for the backend to read its own keys;
	// nil when the config has none.
	Backend json.RawMessage

	// EnableIPv4 (default true) and EnableIPv6 choose the address families
	// of the overlay; at least one is on. Network and its keys are used
	// only with EnableIPv4, IPv6Network and its keys only with EnableIPv6.
	EnableIPv4 bool
	EnableIPv6 bool
	// IPv6Network, IPv6SubnetLen, IPv6SubnetMin and IPv6SubnetMax are the
	// IPv6 counterparts of Network, SubnetLen, SubnetMin and SubnetMax.
	IPv6Network   netip.Prefix
	IPv6SubnetLen int
	IPv6SubnetMin netip.Addr
	IPv6SubnetMax netip.Addr
	// EnableNFTables keeps the forward and masquerade rules in nftables
	// tables instead of iptables chains (flannel v0.25+).
	EnableNFTables bool
}

// rawConfig mirrors the JSON; encoding/json matches keys case-insensitively
// and ignores unknown ones, as flannel does.
type rawConfig struct {
	Network   *json.RawMessage
	SubnetLen *json.RawMessage
	SubnetMin *json.RawMessage
	SubnetMax *json.RawMessage
	Backend   json.RawMessage

	EnableIPv4     *json.RawMessage
	EnableIPv6     *json.RawMessage
	IPv6Network    *json.RawMessage
	IPv6SubnetLen  *json.RawMessage
	IPv6SubnetMin  *json.RawMessage
	IPv6SubnetMax  *json.RawMessage
	EnableNFTables *json.RawMessage
}

func invalid(format string, args ...any) error {
	return &ConfigError{Reason: fmt.Sprintf(format, args...)}
}

// ParseConfig parses the network config JSON, applies the defaults of
// WIRE.md and validates it. Every error is a *ConfigError.
func ParseConfig(data []byte) (*Config, error) {
	var raw rawConfig
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&raw); err != nil {
		return nil, invalid("not a JSON object (%v); write it like {\"Network\":\"10.5.0.0/16\"}", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, invalid("trailing data after the JSON object")
	}
	cfg := &Config{EnableIPv4: true}
	for _, f := range []struct {
		name string
		raw  *json.RawMessage
		dst  *bool
	}{{"EnableIPv4", raw.EnableIPv4, &cfg.EnableIPv4}, {"EnableIPv6", raw.EnableIPv6, &cfg.EnableIPv6}, {"EnableNFTables", raw.EnableNFTables, &cfg.EnableNFTables}} {
		if f.raw == nil {
			continue
		}
		if err := json.Unmarshal(*f.raw, f.dst); err != nil {
			return nil, invalid("%s %s is not true or false", f.name, jsonText(*f.raw))
		}
	}
	switch {
	case !cfg.EnableIPv4 && !cfg.EnableIPv6:
		return nil, invalid("EnableIPv4 and EnableIPv6 are both false; enable at least one address family")
	case !cfg.EnableIPv6 && raw.IPv6Network != nil:
		return nil, invalid("IPv6Network is set but EnableIPv6 is not true; add \"EnableIPv6\":true or remove IPv6Network")
	}
	if cfg.EnableIPv4 {
		if err := parseIPv4(cfg, &raw); err != nil {
			return nil, err
		}
	}
	if cfg.EnableIPv6 {
		if err := parseIPv6(cfg, &raw); err != nil {
			return nil, err
		}
	}
	if err := parseBackend(cfg, raw.Backend); err != nil {
		return nil, err
	}
	if cfg.EnableIPv6 && cfg.BackendType == "udp" {
		return nil, invalid("the udp backend carries IPv4 only; use vxlan or host-gw with EnableIPv6")
	}
	return cfg, nil
}

// parseIPv4 reads Network, SubnetLen, SubnetMin and SubnetMax.
func parseIPv4(cfg *Config, raw *rawConfig) error {
	if raw.Network == nil {
		return invalid("Network is missing; set it to an IPv4 CIDR such as \"10.5.0.0/16\"")
	}
	s, err := stringField("Network", *raw.Network, "an IPv4 CIDR such as \"10.5.0.0/16\"")
	if err != nil {
		return err
	}
	if cfg.Network, err = ip.ParsePrefix(s); err != nil {
		return invalid("Network %s is not an IPv4 CIDR such as \"10.5.0.0/16\"", quote(s))
	}
	nbits := cfg.Network.Bits()
	if nbits > 28 {
		return invalid("Network %s is too small: the prefix must be /28 or shorter", cfg.Network)
	}

	if raw.SubnetLen == nil {
		cfg.SubnetLen = 24
		if nbits > 22 {
			cfg.SubnetLen = nbits + 2
		}
	} else {
		var n int
		if err := json.Unmarshal(*raw.SubnetLen, &n); err != nil {
			return invalid("SubnetLen %s is not a whole number; write it like 24", jsonText(*raw.SubnetLen))
		}
		switch {
		case n > 30:
			return invalid("SubnetLen %d is longer than 30", n)
		case n < nbits+2:
			return invalid("SubnetLen %d is shorter than the Network prefix + 2 (%d for %s)", n, nbits+2, cfg.Network)
		}
		cfg.SubnetLen = n
	}

	size := uint32(1) << (32 - cfg.SubnetLen)
	first := ip.Uint32(cfg.Network.Addr())
	last := first + uint32((uint64(1)<<(32-nbits))-uint64(size))
	cfg.SubnetMin = ip.FromUint32(first + size)
	cfg.SubnetMax = ip.FromUint32(last)
	for _, f := range []struct {
		name string
		raw  *json.RawMessage
		dst  *netip.Addr
	}{{"SubnetMin", raw.SubnetMin, &cfg.SubnetMin}, {"SubnetMax", raw.SubnetMax, &cfg.SubnetMax}} {
		if f.raw == nil {
			continue
		}
		s, err := stringField(f.name, *f.raw, "an IPv4 address such as \"10.5.1.0\"")
		if err != nil {
			return err
		}
		a, err := ip.ParseAddr(s)
		if err != nil {
			return invalid("%s %s is not an IPv4 address such as \"10.5.1.0\"", f.name, quote(s))
		}
		if !cfg.Network.Contains(a) {
			return invalid("%s %s is outside Network %s", f.name, a, cfg.Network)
		}
		if ip.Uint32(a)%size != 0 {
			return invalid("%s %s is not on a /%d boundary (SubnetLen)", f.name, a, cfg.SubnetLen)
		}
		*f.dst = a
	}
	if ip.Uint32(cfg.SubnetMin) > ip.Uint32(cfg.SubnetMax) {
		return invalid("SubnetMin %s is above SubnetMax %s", cfg.SubnetMin, cfg.SubnetMax)
	}

	return nil
}

// parseIPv6 reads IPv6Network, IPv6SubnetLen, IPv6SubnetMin and
// IPv6SubnetMax, with flannel's defaults: a /64 per node when IPv6Network is
// /62 or shorter, else its prefix + 2; the first subnet skipped.
func parseIPv6(cfg *Config, raw *rawConfig) error {
	if raw.IPv6Network == nil {
		return invalid("EnableIPv6 is true but IPv6Network is missing; set it to an IPv6 CIDR such as \"fc00::/48\"")
	}
	s, err := stringField("IPv6Network", *raw.IPv6Network, "an IPv6 CIDR such as \"fc00::/48\"")
	if err != nil {
		return err
	}
	if cfg.IPv6Network, err = ip.ParsePrefix6(s); err != nil {
		return invalid("IPv6Network %s is not an IPv6 CIDR such as \"fc00::/48\"", quote(s))
	}
	nbits := cfg.IPv6Network.Bits()
	if nbits > 124 {
		return invalid("IPv6Network %s is too small: the prefix must be /124 or shorter", cfg.IPv6Network)
	}
	if raw.IPv6SubnetLen == nil {
		cfg.IPv6SubnetLen = 64
		if nbits > 62 {
			cfg.IPv6SubnetLen = nbits + 2
		}
	} else {
		var n int
		if err := json.Unmarshal(*raw.IPv6SubnetLen, &n); err != nil {
			return invalid("IPv6SubnetLen %s is not a whole number; write it like 64", jsonText(*raw.IPv6SubnetLen))
		}
		switch {
		case n > 126:
			return invalid("IPv6SubnetLen %d is longer than 126", n)
		case n < nbits+2:
			return invalid("IPv6SubnetLen %d is shorter than the IPv6Network prefix + 2 (%d for %s)", n, nbits+2, cfg.IPv6Network)
		}
		cfg.IPv6SubnetLen = n
	}
	cfg.IPv6SubnetMin = ip.FirstSubnet6(cfg.IPv6Network, cfg.IPv6SubnetLen)
	cfg.IPv6SubnetMax = ip.LastSubnet6(cfg.IPv6Network, cfg.IPv6SubnetLen)
	for _, f := range []struct {
		name string
		raw  *json.RawMessage
		dst  *netip.Addr
	}{{"IPv6SubnetMin", raw.IPv6SubnetMin, &cfg.IPv6SubnetMin}, {"IPv6SubnetMax", raw.IPv6SubnetMax, &cfg.IPv6SubnetMax}} {
		if f.raw == nil {
			continue
		}
		s, err := stringField(f.name, *f.raw, "an IPv6 address such as \"fc00:0:0:1::\"")
		if err != nil {
			return err
		}
		a, err := ip.ParseAddr6(s)
		if err != nil {
			return invalid("%s %s is not an IPv6 address such as \"fc00:0:0:1::\"", f.name, quote(s))
		}
		if !cfg.IPv6Network.Contains(a) {
			return invalid("%s %s is outside IPv6Network %s", f.name, a, cfg.IPv6Network)
		}
		if netip.PrefixFrom(a, cfg.IPv6SubnetLen).Masked().Addr() != a {
			return invalid("%s %s is not on a /%d boundary (IPv6SubnetLen)", f.name, a, cfg.IPv6SubnetLen)
		}
		*f.dst = a
	}
	if cfg.IPv6SubnetMin.Compare(cfg.IPv6SubnetMax) > 0 {
		return invalid("IPv6SubnetMin %s is above IPv6SubnetMax %s", cfg.IPv6SubnetMin, cfg.IPv6SubnetMax)
	}
	return nil
}

// parseBackend reads Backend.Type ("udp" when Backend is absent).
func parseBackend(cfg *Config, rawBackend json.RawMessage) error {
	raw := struct{ Backend json.RawMessage }{rawBackend}
	cfg.BackendType = DefaultBackendType
	if len(raw.Backend) > 0 && !bytes.Equal(bytes.TrimSpace(raw.Backend), []byte("null")) {
		var be struct{ Type *json.RawMessage }
		if err := json.Unmarshal(raw.Backend, &be); err != nil {
			return invalid("Backend is not a JSON object; write it like {\"Type\":\"vxlan\"}")
		}
		if be.Type == nil {
			return invalid("Backend.Type is missing; set it to udp, vxlan or host-gw")
		}
		t, err := stringField("Backend.Type", *be.Type, "a backend name such as \"vxlan\"")
		if err != nil {
			return err
		}
		if t == "" {
			return invalid("Backend.Type is empty; set it to udp, vxlan or host-gw")
		}
		cfg.BackendType = t
		cfg.Backend = raw.Backend
	}
	return nil
}

func stringField(name string, raw json.RawMessage, want string) (string, error) {
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", invalid("%s %s is not a string; write %s", name, jsonText(raw), want)
	}
	return s, nil
}

// maxQuoted is how much of a user's value an error message repeats, so
// that a huge value still makes a short line.
const maxQuoted = 64

// quote renders a user's value for an error message: quoted, and cut
// after maxQuoted bytes.
func quote(s string) string {
	if len(s) > maxQuoted {
		return strconv.Quote(s[:maxQuoted]) + "..."
	}
	return strconv.Quote(s)
}

// jsonText renders a raw JSON value for an error message: compacted, so
// that the message stays on one line, and cut after maxQuoted bytes.
func jsonText(raw json.RawMessage) string {
	var b bytes.Buffer
	if err := json.Compact(&b, raw); err != nil {
		return quote(string(raw))
	}
	if b.Len() > maxQuoted {
		b.Truncate(maxQuoted)
		b.WriteString("...")
	}
	return b.String()
}

// InRange reports whether p is a subnet this config could lease: SubnetLen
// long, inside Network, between SubnetMin and SubnetMax.
func (c *Config) InRange(p netip.Prefix) bool {
	if !p.Addr().Is4() || p.Bits() != c.SubnetLen || p.Masked() != p || !c.Network.Contains(p.Addr()) {
		return false
	}
	v := ip.Uint32(p.Addr())
	return v >= ip.Uint32(c.SubnetMin) && v <= ip.Uint32(c.SubnetMax)
}

// Subnets calls yield for each leasable subnet from SubnetMin to SubnetMax in
// order, until yield returns false.
func (c *Config) Subnets(yield func(netip.Prefix) bool) {
	size := uint64(1) << (32 - c.SubnetLen)
	for v := uint64(ip.Uint32(c.SubnetMin)); v <= uint64(ip.Uint32(c.SubnetMax)); v += size {
		if !yield(netip.PrefixFrom(ip.FromUint32(uint32(v)), c.SubnetLen)) {
			return
		}
	}
}

// Changes names what differs from c to next, one "Field old → new" item per
// changed field, joined with "; "; "" when the two configs are the same.
// Backend is compared as compacted JSON, so spacing alone is no change.
func (c *Config) Changes(next *Config) string {
	var out []string
	add := func(field string, old, new any) {
		if fmt.Sprint(old) != fmt.Sprint(new) {
			out = append(out, fmt.Sprintf("%s %v → %v", field, old, new))
		}
	}
	add("Network", c.Network, next.Network)
	add("SubnetLen", c.SubnetLen, next.SubnetLen)
	add("SubnetMin", c.SubnetMin, next.SubnetMin)
	add("SubnetMax", c.SubnetMax, next.SubnetMax)
	add("EnableIPv4", c.EnableIPv4, next.EnableIPv4)
	add("EnableIPv6", c.EnableIPv6, next.EnableIPv6)
	add("IPv6Network", c.IPv6Network, next.IPv6Network)
	add("IPv6SubnetLen", c.IPv6SubnetLen, next.IPv6SubnetLen)
	add("IPv6SubnetMin", c.IPv6SubnetMin, next.IPv6SubnetMin)
	add("IPv6SubnetMax", c.IPv6SubnetMax, next.IPv6SubnetMax)
	add("EnableNFTables", c.EnableNFTables, next.EnableNFTables)
	add("Backend.Type", c.BackendType, next.BackendType)
	if old, new := compact(c.Backend), compact(next.Backend); c.BackendType == next.BackendType && old != new {
		out = append(out, fmt.Sprintf("Backend %s → %s", old, new))
	}
	return strings.Join(out, "; ")
}

// compact is raw JSON without insignificant space ("{}" for none).
func compact(raw json.RawMessage) string {
	var b bytes.Buffer
	if len(raw) == 0 || json.Compact(&b, raw) != nil {
		return "{}"
	}
	return b.String()
}

// InRange6 reports whether p is an IPv6 subnet this config could lease:
// IPv6SubnetLen long, inside IPv6Network, between IPv6SubnetMin and
// IPv6SubnetMax.
func (c *Config) InRange6(p netip.Prefix) bool {
	if !c.EnableIPv6 || !p.Addr().Is6() || p.Bits() != c.IPv6SubnetLen || p.Masked() != p || !c.IPv6Network.Contains(p.Addr()) {
		return false
	}
	return p.Addr().Compare(c.IPv6SubnetMin) >= 0 && p.Addr().Compare(c.IPv6SubnetMax) <= 0
}

// Subnets6 calls yield for each leasable IPv6 subnet from IPv6SubnetMin to
// IPv6SubnetMax in order, until yield returns false.
func (c *Config) Subnets6(yield func(netip.Prefix) bool) {
	p := netip.PrefixFrom(c.IPv6SubnetMin, c.IPv6SubnetLen)
	for p.Addr().Compare(c.IPv6SubnetMax) <= 0 {
		if !yield(p) {
			return
		}
		next, ok := ip.Next6(p)
		if !ok {
			return
		}
		p = next
	}
}
