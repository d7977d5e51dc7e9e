package subnet

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/flanneld-go/flanneld/pkg/ip"
)

// maxAcquireAttempts bounds how often AcquireLease starts over after losing
// a race for a subnet to another node.
const maxAcquireAttempts = 10

// errContention is returned when AcquireLease lost the race for a subnet
// maxAcquireAttempts times in a row; calling it again is the remedy.
var errContention = errors.New("other nodes kept taking the chosen subnets first")

// leaseKey is the key of l in its canonical form, the one RenewLease renews.
func (m *EtcdManager) leaseKey(l Lease) string {
	return m.subnetsDir() + ip.LeaseKey(l.Subnet, l.IPv6Subnet)
}

// AcquireLease implements Manager. A new key is created only if it does not
// exist; an existing one is rewritten only if nobody wrote it since it was
// listed, so another node's lease is never overwritten.
func (m *EtcdManager) AcquireLease(ctx context.Context, cfg *Config, attrs LeaseAttrs, prev Lease) (*Lease, error) {
	if err := CheckAttrs(cfg, attrs); err != nil {
		return nil, fmt.Errorf("acquiring lease: %w", err)
	}
	value, err := attrs.Marshal()
	if err != nil {
		return nil, fmt.Errorf("acquiring lease: encoding lease value: %w", err)
	}
	for range maxAcquireAttempts {
		lease, err := m.tryAcquire(ctx, cfg, attrs, value, prev)
		if err != nil {
			return nil, fmt.Errorf("acquiring lease: %w", err)
		}
		if lease != nil {
			return lease, nil
		}
		if !Sleep(ctx, m.jitter()) {
			return nil, ctx.Err()
		}
	}
	return nil, fmt.Errorf("acquiring lease: %w (%d attempts)", errContention, maxAcquireAttempts)
}

// tryAcquire makes one attempt; a nil lease and nil error mean another node
// changed the keys under us and the caller should start over.
func (m *EtcdManager) tryAcquire(ctx context.Context, cfg *Config, attrs LeaseAttrs, value []byte, prev Lease) (*Lease, error) {
	dir := m.subnetsDir()
	kvs, rev, err := m.ks.List(ctx, dir)
	if err != nil {
		return nil, fmt.Errorf("listing %s: %w", dir, err)
	}
	m.keepListing(kvs, rev)
	alloc := newAllocation(cfg, kvs)

	if own, ok := m.own(cfg, attrs, kvs); ok {
		l := own.lease
		l.Attrs = attrs
		if own.kv.Expiration.IsZero() && bytes.Equal(own.kv.Value, value) {
			return &l, nil // a reservation already ours
		}
		kv, ok, err := m.ks.Update(ctx, own.kv, value, EtcdLeaseTTL)
		if err != nil || !ok {
			return nil, wrap(err, "updating lease %s", l.Key())
		}
		l.Expiration = kv.Expiration
		m.keepOwn(kv)
		return &l, nil
	}

	l, ok := ChooseLease(cfg, alloc.taken, alloc.taken6, prev, m.intn)
	if !ok {
		return nil, ErrNoFreeSubnets
	}
	kv, ok, err := m.ks.Create(ctx, m.leaseKey(l), value, EtcdLeaseTTL)
	if err != nil || !ok {
		return nil, wrap(err, "creating lease %s", l.Key())
	}
	if cfg.EnableIPv6 || alloc.dual {
		// Keys that differ only in their IPv6 (or IPv4) part can claim the
		// same subnet at once; the older key keeps it.
		if won, err := m.firstClaim(ctx, kv, l); err != nil || !won {
			return nil, err
		}
	}
	l.Attrs, l.Expiration = attrs, kv.Expiration
	m.keepOwn(kv)
	return &l, nil
}

// wrap is err with what failed, or nil.
func wrap(err error, format string, args ...any) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf(format+": %w", append(args, err)...)
}

// firstClaim lists the subnets after our key kv was created and reports
// whether no older key claims a subnet of l. A later claim loses: its key
// is deleted (only if it is still the one we wrote) and the caller starts
// over.
func (m *EtcdManager) firstClaim(ctx context.Context, kv KV, l Lease) (bool, error) {
	kvs, _, err := m.ks.List(ctx, m.subnetsDir())
	if err != nil {
		return false, fmt.Errorf("listing %s: %w", m.subnetsDir(), err)
	}
	for _, o := range kvs {
		if o.Key == kv.Key || o.Create > kv.Create || !ClaimsOf(o.Key[strings.LastIndexByte(o.Key, '/')+1:], l) {
			continue
		}
		return false, wrap(m.ks.Delete(ctx, kv), "giving up lease %s to %s", l.Key(), o.Key)
	}
	return true, nil
}

// RenewLease implements Manager: one read of the key, which must still
// hold a lease of lease's PublicIP and PublicIPv6, then one refresh of its
// TTL (none for a reservation).
func (m *EtcdManager) RenewLease(ctx context.Context, lease *Lease) error {
	kv, _, err := m.ks.Get(ctx, m.leaseKey(*lease))
	switch {
	case err != nil:
		return fmt.Errorf("renewing lease %s: %w", lease.Key(), err)
	case kv == nil:
		return fmt.Errorf("renewing lease %s: %w: the key was deleted or expired", lease.Key(), ErrLeaseLost)
	}
	if a, err := ParseLeaseAttrs(kv.Value); err != nil || a.PublicIP != lease.Attrs.PublicIP || a.PublicIPv6 != lease.Attrs.PublicIPv6 {
		return fmt.Errorf("renewing lease %s: %w: the key now holds another value", lease.Key(), ErrLeaseLost)
	}
	if kv.Expiration.IsZero() {
		lease.Expiration = kv.Expiration // a reservation
		return nil
	}
	n, ok, err := m.ks.Update(ctx, *kv, kv.Value, EtcdLeaseTTL)
	switch {
	case err != nil:
		return fmt.Errorf("renewing lease %s: %w", lease.Key(), err)
	case !ok:
		return fmt.Errorf("renewing lease %s: %w: the key expired or changed", lease.Key(), ErrLeaseLost)
	}
	lease.Expiration = n.Expiration
	return nil
}

// allocation is what a listing of the subnets tells AcquireLease.
type allocation struct {
	taken  *Taken // IPv4 subnets claimed
	taken6 *Taken // IPv6 subnets claimed; nil without IPv6
	dual   bool   // a key has a dual-stack name
}

// newAllocation reads a listing of the subnets. Every key whose last path
// element names a subnet claims it, whatever its value (flannel's parser
// finds a subnet anywhere in the key).
func newAllocation(cfg *Config, kvs []KV) *allocation {
	a := &allocation{taken: NewTaken(cfg.SubnetLen)}
	if cfg.EnableIPv6 {
		a.taken6 = NewTaken(cfg.IPv6SubnetLen)
	}
	for _, kv := range kvs {
		name := kv.Key[strings.LastIndexByte(kv.Key, '/')+1:]
		v4, v6 := ClaimedPrefixes(name)
		a.dual = a.dual || strings.Contains(name, "&")
		if v4.IsValid() {
			a.taken.Add(v4)
		}
		if v6.IsValid() && a.taken6 != nil {
			a.taken6.Add(v6)
		}
	}
	return a
}

// entry is a lease key whose name and value parse.
type entry struct {
	kv    KV
	lease Lease
}

// own returns the lease of attrs' node that fits cfg (OwnLease), under the
// canonical key name of its subnets (the one RenewLease renews). Only
// values that can hold the address are parsed: those with its text, or with
// a JSON escape; with thousands of leases, that is most of the cost of
// acquiring one.
func (m *EtcdManager) own(cfg *Config, attrs LeaseAttrs, kvs []KV) (entry, bool) {
	ipText := []byte(attrs.PublicIP.String())
	if !cfg.EnableIPv4 {
		ipText = []byte(attrs.PublicIPv6.String())
	}
	for _, kv := range kvs {
		if !bytes.Contains(kv.Value, ipText) && !bytes.Contains(kv.Value, []byte(`\`)) {
			continue
		}
		e, err := m.parseKV(kv)
		if err == nil && OwnLease(cfg, attrs, e.lease) && kv.Key == m.leaseKey(e.lease) {
			return e, true
		}
	}
	return entry{}, false
}

// parseKV reads a key under the subnets prefix. It fails, saying why, for a
// key below it, a name that is not a lease key, or a value that does not
// parse.
func (m *EtcdManager) parseKV(kv KV) (entry, error) {
	name, ok := strings.CutPrefix(kv.Key, m.subnetsDir())
	if !ok || strings.Contains(name, "/") {
		return entry{}, errors.New("not a lease key: it is in a subdirectory")
	}
	v4, v6, err := ip.ParseLeaseKey(name)
	if err != nil {
		return entry{}, errors.New("not a lease key: the name is not <A.B.C.D>-<prefix length>, like 10.5.34.0-24 (or 10.5.34.0-24&fc00:0:0:22::-64)")
	}
	attrs, err := ParseLeaseAttrs(kv.Value)
	if err != nil {
		return entry{}, err
	}
	return entry{kv: kv, lease: Lease{Subnet: v4, IPv6Subnet: v6, Attrs: attrs, Expiration: kv.Expiration}}, nil
}

// leaseKeyPrefix parses the name of a key under the subnets prefix and
// returns what identifies its lease (Lease.Key).
func (m *EtcdManager) leaseKeyPrefix(key string) (netip.Prefix, bool) {
	name, ok := strings.CutPrefix(key, m.subnetsDir())
	if !ok || strings.Contains(name, "/") {
		return netip.Prefix{}, false
	}
	v4, v6, err := ip.ParseLeaseKey(name)
	l := Lease{Subnet: v4, IPv6Subnet: v6}
	return l.Key(), err == nil
}
