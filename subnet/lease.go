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
	PublicIP    netip.Addr
	BackendType string          `json:",omitempty"`
	BackendData json.RawMessage `json:",omitempty"`
}

// ParseLeaseAttrs parses and checks a lease value written by any node.
func ParseLeaseAttrs(data []byte) (LeaseAttrs, error) {
	var raw struct {
		PublicIP    *string
		BackendType string
		BackendData json.RawMessage
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
	if d := bytes.TrimSpace(raw.BackendData); len(d) > 0 && !bytes.Equal(d, []byte("null")) {
		attrs.BackendData = d
	}
	return attrs, nil
}

// Marshal returns the lease value in flannel's format.
func (a LeaseAttrs) Marshal() ([]byte, error) {
	return json.Marshal(a)
}

// Lease is one node's claim on a subnet.
type Lease struct {
	Subnet netip.Prefix
	Attrs  LeaseAttrs
	// Expiration is when etcd expires the key; zero for a reservation (a key
	// written without TTL).
	Expiration time.Time
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
