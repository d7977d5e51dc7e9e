package subnet

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"time"
)

// Errors of the lease store, shared by every Manager implementation.
var (
	// ErrNoFreeSubnets: every subnet between SubnetMin and SubnetMax is leased.
	ErrNoFreeSubnets = errors.New("no free subnets: every subnet from SubnetMin to SubnetMax is leased; widen Network or the SubnetMin..SubnetMax range, or remove stale leases")
	// ErrLeaseLost: our lease key was deleted, expired, or taken by another node.
	ErrLeaseLost = errors.New("lease lost")
	// ErrBadLease wraps every error of ParseLeaseAttrs.
	ErrBadLease = errors.New("invalid lease value")
)

// LeaseAttrs is the JSON value of a lease key, exactly as flannel writes it:
// {"PublicIP":"192.168.8.101","BackendType":"vxlan","BackendData":{...}}.
type LeaseAttrs struct {
	PublicIP netip.Addr
	// PublicIPv6 is the node's IPv6 address in a dual-stack or IPv6-only
	// cluster; left out when invalid.
	PublicIPv6  netip.Addr      `json:",omitzero"`
	BackendType string          `json:",omitempty"`
	BackendData json.RawMessage `json:",omitempty"`
	// BackendV6Data is BackendData for the IPv6 side (vxlan's IPv6 VtepMAC).
	BackendV6Data json.RawMessage `json:",omitempty"`
}

// ParseLeaseAttrs parses and checks a lease value written by any node.
func ParseLeaseAttrs(data []byte) (LeaseAttrs, error) {
	if a, ok := parseCanonical(data); ok {
		return a, nil
	}
	return parseLeaseAttrsJSON(data)
}

// parseCanonical parses the one form every flannel node writes (Go's
// encoding of LeaseAttrs: the keys in order, no spaces, plain ASCII
// strings) about ten times faster than encoding/json; a daemon parses every
// lease of the cluster when it starts. Anything else, and anything it is
// not sure about, is left to encoding/json (ok false). Where it succeeds the
// result is the one encoding/json gives, which the fuzz test checks.
func parseCanonical(data []byte) (a LeaseAttrs, ok bool) {
	const pub, typ, bd = `{"PublicIP":"`, `,"BackendType":"`, `,"BackendData":`
	rest, ok := bytes.CutPrefix(data, []byte(pub))
	if !ok {
		return a, false
	}
	i := bytes.IndexByte(rest, '"')
	if i < 0 {
		return a, false
	}
	addr, err := netip.ParseAddr(string(rest[:i]))
	if err != nil || !addr.Is4() {
		return a, false
	}
	a.PublicIP, rest = addr, rest[i+1:]
	if r, ok := bytes.CutPrefix(rest, []byte(typ)); ok {
		i := bytes.IndexByte(r, '"')
		if i < 0 || !plainASCII(r[:i]) {
			return a, false
		}
		a.BackendType, rest = backendTypeName(r[:i]), r[i+1:]
	}
	if r, ok := bytes.CutPrefix(rest, []byte(bd)); ok {
		v, ok := bytes.CutSuffix(r, []byte("}"))
		v = bytes.TrimSpace(v)
		if !ok || len(v) == 0 || !json.Valid(v) {
			return a, false
		}
		if !bytes.Equal(v, []byte("null")) {
			a.BackendData = bytes.Clone(v)
		}
		return a, true
	}
	return a, string(rest) == "}"
}

// backendTypeName is string(b), without a copy of its own for the names
// flannel's backends write (each of a cluster's leases names one).
func backendTypeName(b []byte) string {
	switch string(b) { // compiled to comparisons, no conversion
	case "vxlan":
		return "vxlan"
	case "host-gw":
		return "host-gw"
	case "udp":
		return "udp"
	case "wireguard":
		return "wireguard"
	case "extension":
		return "extension"
	case "alloc":
		return "alloc"
	case "ipip":
		return "ipip"
	case "ipsec":
		return "ipsec"
	}
	return string(b)
}

// plainASCII reports whether s is printable ASCII without quotes or
// backslashes: a JSON string body that decodes to itself.
func plainASCII(s []byte) bool {
	for _, c := range s {
		if c < 0x20 || c >= 0x7f || c == '\\' || c == '"' {
			return false
		}
	}
	return true
}

// parseLeaseAttrsJSON is ParseLeaseAttrs through encoding/json: any form.
func parseLeaseAttrsJSON(data []byte) (LeaseAttrs, error) {
	var raw struct {
		PublicIP      *string
		PublicIPv6    *string
		BackendType   string
		BackendData   json.RawMessage
		BackendV6Data json.RawMessage
	}
	if err := json.Unmarshal(data, &raw); err != nil {
		return LeaseAttrs{}, fmt.Errorf("%w: %v", ErrBadLease, err)
	}
	if raw.PublicIP == nil {
		return LeaseAttrs{}, fmt.Errorf("%w: PublicIP is missing", ErrBadLease)
	}
	a, err := netip.ParseAddr(*raw.PublicIP)
	if err != nil || !a.Is4() {
		return LeaseAttrs{}, fmt.Errorf("%w: PublicIP %s is not an IPv4 address", ErrBadLease, quote(*raw.PublicIP))
	}
	attrs := LeaseAttrs{PublicIP: a, BackendType: raw.BackendType}
	if raw.PublicIPv6 != nil && *raw.PublicIPv6 != "" {
		a6, err := netip.ParseAddr(*raw.PublicIPv6)
		if err != nil || !a6.Is6() || a6.Is4In6() || a6.Zone() != "" {
			return LeaseAttrs{}, fmt.Errorf("%w: PublicIPv6 %s is not an IPv6 address", ErrBadLease, quote(*raw.PublicIPv6))
		}
		attrs.PublicIPv6 = a6
	}
	if d := bytes.TrimSpace(raw.BackendData); len(d) > 0 && !bytes.Equal(d, []byte("null")) {
		attrs.BackendData = d
	}
	if d := bytes.TrimSpace(raw.BackendV6Data); len(d) > 0 && !bytes.Equal(d, []byte("null")) {
		attrs.BackendV6Data = d
	}
	return attrs, nil
}

// Marshal returns the lease value in flannel's format.
func (a LeaseAttrs) Marshal() ([]byte, error) {
	return json.Marshal(a)
}

// Lease is one node's claim on a subnet (and, dual stack, an IPv6 subnet).
type Lease struct {
	// Subnet is the IPv4 subnet; invalid for an IPv6-only lease.
	Subnet netip.Prefix
	// IPv6Subnet is the IPv6 subnet; invalid without IPv6.
	IPv6Subnet netip.Prefix
	Attrs      LeaseAttrs
	// Expiration is when etcd expires the key; zero for a reservation (a key
	// written without TTL).
	Expiration time.Time
}

// Key identifies the lease: its IPv4 subnet, or the IPv6 subnet of an
// IPv6-only lease (the IPv4 part of a key claims it, as the store's key
// names do).
func (l *Lease) Key() netip.Prefix {
	if l.Subnet.IsValid() {
		return l.Subnet
	}
	return l.IPv6Subnet
}

// Reservation reports whether the lease key has no TTL.
func (l *Lease) Reservation() bool { return l.Expiration.IsZero() }

// EventType says whether a lease appeared (or changed) or went away.
type EventType int

// The event types.
const (
	EventAdded EventType = iota
	EventRemoved
)

func (t EventType) String() string {
	if t == EventRemoved {
		return "removed"
	}
	return "added"
}

// Event is a change of one lease. A changed lease is reported as Added with
// the new attributes.
type Event struct {
	Type  EventType
	Lease Lease
}

// udpType is the udp backend's name. flannel's udp backend (v0.10 to v0.28)
// writes its lease with no BackendType at all, so "" means udp too.
const udpType = "udp"

// SameBackend reports whether a lease whose BackendType is leaseType belongs
// to the backend named backendType: equal names, with "" standing for udp.
func SameBackend(leaseType, backendType string) bool {
	if leaseType == "" {
		leaseType = udpType
	}
	if backendType == "" {
		backendType = udpType
	}
	return leaseType == backendType
}

// allocType is the alloc backend's name; flannel's alloc backend writes its
// lease with no BackendType either.
const allocType = "alloc"

// WireBackendType is the BackendType a node of backendType writes in its
// lease: the name, except for udp and alloc, whose leases carry none (as
// flannel's).
func WireBackendType(backendType string) string {
	if backendType == udpType || backendType == allocType {
		return ""
	}
	return backendType
}
