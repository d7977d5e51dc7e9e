package etcdv3

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"

	"github.com/flanneld-go/flanneld/subnet"
)

// keyspace is subnet.Keyspace on the v3 client: a key's TTL is the etcd
// lease it is attached to.
type keyspace struct {
	conn    *connector
	timeout time.Duration
	now     func() time.Time
}

func newKeyspace(opts Options) (*keyspace, error) {
	conn, err := newConnector(&opts)
	if err != nil {
		return nil, err
	}
	return &keyspace{conn: conn, timeout: opts.RequestTimeout * 2, now: time.Now}, nil
}

// call runs fn with the client, bounded by the request timeout.
func (k *keyspace) call(ctx context.Context, fn func(ctx context.Context, st store) error) error {
	cctx, cancel := context.WithTimeout(ctx, k.timeout)
	defer cancel()
	st, err := k.conn.get(cctx)
	if err == nil {
		err = fn(cctx, st)
	}
	switch {
	case authError(err):
		return subnet.Denied(err)
	case err != nil && ctx.Err() == nil && cctx.Err() != nil && k.conn.diagnose != nil:
		// Timed out, most likely waiting for a connection: say why.
		if why := k.conn.diagnose(ctx); why != nil {
			return fmt.Errorf("no etcd endpoint answers (%v): %w", why, err)
		}
	}
	return err
}

func (k *keyspace) get(ctx context.Context, key string, opts ...clientv3.OpOption) (resp *clientv3.GetResponse, err error) {
	err = k.call(ctx, func(ctx context.Context, st store) error {
		resp, err = st.Get(ctx, key, opts...)
		return err
	})
	return resp, err
}

// txn commits one transaction: ops if cmp holds.
func (k *keyspace) txn(ctx context.Context, cmp clientv3.Cmp, ops ...clientv3.Op) (resp *clientv3.TxnResponse, err error) {
	err = k.call(ctx, func(ctx context.Context, st store) error {
		resp, err = st.Txn(ctx).If(cmp).Then(ops...).Commit()
		return err
	})
	return resp, err
}

func rev(h *etcdserverpb.ResponseHeader) subnet.Rev {
	return subnet.Rev{Index: h.Revision, Cluster: strconv.FormatUint(h.ClusterId, 16)}
}

// kv is the subnet.KV of a key. The expiry of a key attached to an etcd
// lease is unknown without asking etcd (one request per key); readers only
// tell a reservation (zero) from a lease, so it gets its longest possible
// expiry.
func (k *keyspace) kv(kv *mvccpb.KeyValue) subnet.KV {
	out := subnet.KV{Key: string(kv.Key), Value: kv.Value, Mod: kv.ModRevision, Create: kv.CreateRevision, Lease: kv.Lease}
	if kv.Lease != 0 {
		out.Expiration = k.now().Add(subnet.EtcdLeaseTTL)
	}
	return out
}

func (k *keyspace) Get(ctx context.Context, key string) (*subnet.KV, subnet.Rev, error) {
	resp, err := k.get(ctx, key)
	if err != nil {
		return nil, subnet.Rev{}, err
	}
	if len(resp.Kvs) == 0 {
		return nil, rev(resp.Header), nil
	}
	kv := k.kv(resp.Kvs[0])
	return &kv, rev(resp.Header), nil
}

func (k *keyspace) List(ctx context.Context, prefix string) ([]subnet.KV, subnet.Rev, error) {
	resp, err := k.get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		return nil, subnet.Rev{}, err
	}
	kvs := make([]subnet.KV, len(resp.Kvs))
	for i, kv := range resp.Kvs {
		kvs[i] = k.kv(kv)
	}
	return kvs, rev(resp.Header), nil
}

// grant grants an etcd lease of ttl.
func (k *keyspace) grant(ctx context.Context, ttl time.Duration) (id clientv3.LeaseID, exp time.Time, err error) {
	err = k.call(ctx, func(ctx context.Context, st store) error {
		r, err := st.Grant(ctx, int64(ttl/time.Second))
		if err == nil {
			id, exp = r.ID, k.now().Add(time.Duration(r.TTL)*time.Second)
		}
		return err
	})
	if err != nil {
		return 0, exp, fmt.Errorf("granting an etcd lease: %w", err)
	}
	return id, exp, nil
}

// revoke revokes the etcd lease id that no key took, so it does not linger
// for a day; if it fails the lease expires by itself.
func (k *keyspace) revoke(ctx context.Context, id clientv3.LeaseID) {
	k.call(context.WithoutCancel(ctx), func(ctx context.Context, st store) error {
		_, err := st.Revoke(ctx, id)
		return err
	})
}

// Create puts key on a new etcd lease with one transaction that succeeds
// only if the key does not exist.
func (k *keyspace) Create(ctx context.Context, key string, value []byte, ttl time.Duration) (subnet.KV, bool, error) {
	id, exp, err := k.grant(ctx, ttl)
	if err != nil {
		return subnet.KV{}, false, err
	}
	resp, err := k.txn(ctx, clientv3.Compare(clientv3.Version(key), "=", 0), clientv3.OpPut(key, string(value), clientv3.WithLease(id)))
	if err != nil || !resp.Succeeded {
		k.revoke(ctx, id)
		return subnet.KV{}, false, err
	}
	r := resp.Header.Revision
	return subnet.KV{Key: key, Value: value, Mod: r, Create: r, Lease: int64(id), Expiration: exp}, true, nil
}

// Update keeps the etcd lease of a leased key alive (moving the key to a
// new one when its own was granted for less than ttl: copied by
// flannel-migrate-v3 with the TTL it had left, or written by hand), and
// writes value if it differs, or the lease moved, only if the key's
// ModRevision is still kv's.
func (k *keyspace) Update(ctx context.Context, kv subnet.KV, value []byte, ttl time.Duration) (subnet.KV, bool, error) {
	id, moved := clientv3.LeaseID(kv.Lease), false
	out := kv
	out.Value, out.Expiration = value, time.Time{}
	if id != 0 {
		var left int64
		err := k.call(ctx, func(ctx context.Context, st store) error {
			r, err := st.KeepAliveOnce(ctx, id)
			if err == nil {
				left = r.TTL
			}
			return err
		})
		switch {
		case errors.Is(err, rpctypes.ErrLeaseNotFound):
			return kv, false, nil // it expired, and the key with it
		case err != nil:
			return kv, false, fmt.Errorf("refreshing the etcd lease: %w", err)
		}
		out.Expiration = k.now().Add(time.Duration(left) * time.Second)
		if left < int64(ttl/time.Second) {
			if id, out.Expiration, err = k.grant(ctx, ttl); err != nil {
				return kv, false, err
			}
			moved = true
		} else if bytes.Equal(value, kv.Value) {
			return out, true, nil
		}
	}
	put := clientv3.OpPut(kv.Key, string(value))
	if id != 0 {
		put = clientv3.OpPut(kv.Key, string(value), clientv3.WithLease(id))
	}
	resp, err := k.txn(ctx, clientv3.Compare(clientv3.ModRevision(kv.Key), "=", kv.Mod), put)
	if err != nil || !resp.Succeeded {
		if moved {
			k.revoke(ctx, id)
		}
		return kv, false, err
	}
	out.Lease, out.Mod = int64(id), resp.Header.Revision
	return out, true, nil
}

func (k *keyspace) Delete(ctx context.Context, kv subnet.KV) error {
	_, err := k.txn(ctx, clientv3.Compare(clientv3.ModRevision(kv.Key), "=", kv.Mod), clientv3.OpDelete(kv.Key))
	return err
}

// Watch is one v3 prefix watch from after + 1, requiring a leader.
func (k *keyspace) Watch(ctx context.Context, prefix string, after int64) subnet.Watch {
	st, err := k.conn.get(ctx)
	if err != nil {
		return &watch{err: err}
	}
	return &watch{
		k:           k,
		prefix:      prefix,
		ch:          st.Watch(clientv3.WithRequireLeader(ctx), prefix, clientv3.WithPrefix(), clientv3.WithRev(after+1), clientv3.WithCreatedNotify()),
		reconnected: connectionReady(ctx, st.ActiveConnection()),
	}
}

type watch struct {
	k           *keyspace
	prefix      string
	ch          clientv3.WatchChan
	reconnected <-chan struct{}
	err         error // the client could not be made
}

func (w *watch) Next(ctx context.Context) ([]subnet.Change, subnet.Rev, error) {
	if w.err != nil {
		return nil, subnet.Rev{}, w.err
	}
	for {
		select {
		case <-ctx.Done():
			return nil, subnet.Rev{}, ctx.Err()
		case wr, ok := <-w.ch:
			switch {
			case !ok:
				return nil, subnet.Rev{}, errors.New("the watch stream ended")
			case wr.CompactRevision != 0 || errors.Is(wr.Err(), rpctypes.ErrCompacted):
				return nil, subnet.Rev{}, subnet.ErrCompacted
			case wr.Err() != nil:
				return nil, subnet.Rev{}, wr.Err()
			}
			changes := make([]subnet.Change, len(wr.Events))
			for i, ev := range wr.Events {
				changes[i] = subnet.Change{KV: w.k.kv(ev.Kv), Deleted: ev.Type == clientv3.EventTypeDelete}
			}
			return changes, rev(&wr.Header), nil
		case <-w.reconnected:
			// The client reconnected and its watch resumes by itself: tell
			// the store's revision, to learn whether it went back.
			if resp, err := w.k.get(ctx, w.prefix, clientv3.WithKeysOnly(), clientv3.WithLimit(1)); err == nil {
				return nil, rev(resp.Header), nil
			}
		}
	}
}

// connectionReady returns a channel that receives when conn becomes ready
// again after having been down: the client reconnected. The goroutine ends
// with ctx.
func connectionReady(ctx context.Context, conn *grpc.ClientConn) <-chan struct{} {
	ch := make(chan struct{}, 1)
	if conn == nil {
		return ch
	}
	go func() {
		state := conn.GetState()
		// Only a return to Ready after a first Ready is a reconnection.
		up := state == connectivity.Ready
		wasDown := false
		for conn.WaitForStateChange(ctx, state) {
			state = conn.GetState()
			switch state {
			case connectivity.Ready:
				if wasDown {
					select {
					case ch <- struct{}{}:
					default:
					}
				}
				up, wasDown = true, false
			case connectivity.TransientFailure, connectivity.Connecting, connectivity.Idle:
				wasDown = up
			case connectivity.Shutdown:
				return
			}
		}
	}()
	return ch
}
