package subnet

import (
	"context"
	"errors"
	"time"
)

// Keyspace is what the etcd lease manager needs of a store: etcd's v2 keys
// API and its v3 keyspace each implement it in a thin adapter
// (subnet/etcdv2, subnet/etcdv3), and one conformance suite runs against
// both. Expected outcomes (a missing key, a lost compare-and-swap) are
// results, not errors; an error is a failed request. Each call is bound by
// the adapter's request timeout.
type Keyspace interface {
	// Get reads key; kv is nil when the key does not exist. A key that is a
	// directory (v2) is ErrDirectory.
	Get(ctx context.Context, key string) (kv *KV, rev Rev, err error)
	// List reads every key whose name starts with prefix, at any depth,
	// sorted by name; a missing prefix is an empty list.
	List(ctx context.Context, prefix string) ([]KV, Rev, error)
	// Create writes key with value only if it does not exist (false if it
	// does), with ttl (v3: attached to an etcd lease granted for it).
	Create(ctx context.Context, key string, value []byte, ttl time.Duration) (KV, bool, error)
	// Update makes kv's key hold value, only if nobody wrote it since kv
	// was read (false otherwise, or when it is gone). A key without TTL (a
	// reservation) stays without; a key with one gets ttl afresh (v3: its
	// etcd lease is kept alive, or the key moves to a new etcd lease of ttl
	// when its own was granted shorter). Update with kv.Value refreshes.
	Update(ctx context.Context, kv KV, value []byte, ttl time.Duration) (KV, bool, error)
	// Delete deletes kv's key only if nobody wrote it since kv was read.
	Delete(ctx context.Context, kv KV) error
	// Watch follows the keys starting with prefix after revision after,
	// until ctx ends.
	Watch(ctx context.Context, prefix string, after int64) Watch
}

// Watch is one watch of a Keyspace.
type Watch interface {
	// Next returns the next changes, in order, with the store's revision
	// and cluster when it answered. A batch without changes only tells the
	// revision (the adapter looked after a reconnection). ErrCompacted
	// means the history after the cursor is gone (or too long to read
	// event by event): list again. When ctx ends it returns ctx.Err(); the
	// watch may be asked again.
	Next(ctx context.Context) ([]Change, Rev, error)
}

// KV is one key of a Keyspace.
type KV struct {
	Key   string
	Value []byte
	// Mod and Create are the revision (v2: index) of the key's last write
	// and of its creation.
	Mod, Create int64
	// Expiration is when the key expires; zero without TTL (a reservation).
	Expiration time.Time
	// Lease is the adapter's handle of the key's TTL (v3: the etcd lease).
	Lease int64
}

// Change is a key written or deleted under a watch.
type Change struct {
	KV      KV
	Deleted bool
}

// Rev is a point of a store's history: the revision (v2: index) an answer
// was current to, and the cluster that gave it ("" when unknown). A
// revision that goes down or a cluster that changes is a store restored
// from a backup, wiped or replaced.
type Rev struct {
	Index   int64
	Cluster string
}

// wentBack reports whether r is the answer of a store that is not the one
// that answered prev: its revision is lower or its cluster another.
func (r Rev) wentBack(prev Rev) bool {
	return (r.Index != 0 && r.Index < prev.Index) || (r.Cluster != "" && prev.Cluster != "" && r.Cluster != prev.Cluster)
}

// Sentinels of a Keyspace.
var (
	// ErrCompacted: the watch's history is gone; list again.
	ErrCompacted = errors.New("watch history compacted")
	// ErrDirectory: the key is a directory, not a value.
	ErrDirectory = errors.New("it is a directory")
	// ErrAccessDenied: the store refuses the client's identity or rights,
	// which retrying does not fix.
	ErrAccessDenied = errors.New("access denied")
)

// Denied wraps err, the store's refusal of the client, so that it is also
// ErrAccessDenied; its text stays err's.
func Denied(err error) error { return deniedError{err} }

type deniedError struct{ error }

func (e deniedError) Unwrap() []error { return []error{e.error, ErrAccessDenied} }
