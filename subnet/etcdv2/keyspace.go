package etcdv2

import (
	"context"
	"errors"
	"sort"
	"strings"
	"time"

	client "go.etcd.io/etcd/client/v2"

	"github.com/flanneld-go/flanneld/subnet"
)

// keyspace is subnet.Keyspace on the v2 keys API: the index is the
// revision, a key's TTL its expiry.
type keyspace struct {
	api     client.KeysAPI
	timeout time.Duration
}

func (k *keyspace) get(ctx context.Context, key string, recursive bool) (*client.Response, subnet.Rev, error) {
	resp, err := call(ctx, k.timeout, func(ctx context.Context) (*client.Response, error) {
		return k.api.Get(ctx, key, &client.GetOptions{Recursive: recursive, Quorum: true})
	})
	var e client.Error
	switch {
	case err == nil:
		return resp, subnet.Rev{Index: int64(resp.Index), Cluster: resp.ClusterID}, nil
	case errors.As(err, &e) && e.Code == client.ErrorCodeKeyNotFound:
		return nil, subnet.Rev{Index: int64(e.Index)}, nil
	}
	return nil, subnet.Rev{}, flatError(err)
}

func (k *keyspace) Get(ctx context.Context, key string) (*subnet.KV, subnet.Rev, error) {
	resp, rev, err := k.get(ctx, key, false)
	switch {
	case err != nil || resp == nil:
		return nil, rev, err
	case resp.Node.Dir:
		return nil, rev, subnet.ErrDirectory
	}
	kv := toKV(resp.Node)
	return &kv, rev, nil
}

// List flattens a recursive listing of the directory prefix names.
func (k *keyspace) List(ctx context.Context, prefix string) ([]subnet.KV, subnet.Rev, error) {
	resp, rev, err := k.get(ctx, strings.TrimSuffix(prefix, "/"), true)
	if err != nil || resp == nil {
		return nil, rev, err
	}
	var out []subnet.KV
	var walk func(n *client.Node)
	walk = func(n *client.Node) {
		for _, c := range n.Nodes {
			if c.Dir {
				walk(c)
			} else {
				out = append(out, toKV(c))
			}
		}
	}
	walk(resp.Node)
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out, rev, nil
}

func toKV(n *client.Node) subnet.KV {
	kv := subnet.KV{Key: n.Key, Value: []byte(n.Value), Mod: int64(n.ModifiedIndex), Create: int64(n.CreatedIndex)}
	if n.Expiration != nil {
		kv.Expiration = *n.Expiration
	}
	return kv
}

// set is Set, where an answer with one of codes is false.
func (k *keyspace) set(ctx context.Context, key string, value []byte, opts *client.SetOptions, codes ...int) (subnet.KV, bool, error) {
	resp, err := call(ctx, k.timeout, func(ctx context.Context) (*client.Response, error) {
		return k.api.Set(ctx, key, string(value), opts)
	})
	if err != nil {
		for _, c := range codes {
			if etcdCode(err) == c {
				return subnet.KV{}, false, nil
			}
		}
		return subnet.KV{}, false, flatError(err)
	}
	return toKV(resp.Node), true, nil
}

func (k *keyspace) Create(ctx context.Context, key string, value []byte, ttl time.Duration) (subnet.KV, bool, error) {
	return k.set(ctx, key, value, &client.SetOptions{PrevExist: client.PrevNoExist, TTL: ttl}, client.ErrorCodeNodeExist)
}

func (k *keyspace) Update(ctx context.Context, kv subnet.KV, value []byte, ttl time.Duration) (subnet.KV, bool, error) {
	opts := &client.SetOptions{PrevExist: client.PrevExist, PrevIndex: uint64(kv.Mod)}
	if !kv.Expiration.IsZero() {
		opts.TTL = ttl
	}
	return k.set(ctx, kv.Key, value, opts, client.ErrorCodeKeyNotFound, client.ErrorCodeTestFailed)
}

func (k *keyspace) Delete(ctx context.Context, kv subnet.KV) error {
	_, err := call(ctx, k.timeout, func(ctx context.Context) (*client.Response, error) {
		return k.api.Delete(ctx, kv.Key, &client.DeleteOptions{PrevIndex: uint64(kv.Mod)})
	})
	if etcdCode(err) != 0 {
		return nil // gone, or written since: not ours to delete
	}
	return flatError(err)
}

func (k *keyspace) Watch(_ context.Context, prefix string, after int64) subnet.Watch {
	return &watch{k: k, dir: strings.TrimSuffix(prefix, "/"), cursor: uint64(after)}
}

// watch is a series of long polls, each for the next event after the
// cursor.
type watch struct {
	k      *keyspace
	dir    string
	cursor uint64
}

// relistLag is how many etcd writes the watch may trail the store by before
// it asks for a listing instead of reading the events one by one.
const relistLag = 256

func (w *watch) Next(ctx context.Context) ([]subnet.Change, subnet.Rev, error) {
	resp, err := w.k.api.Watcher(w.dir, &client.WatcherOptions{AfterIndex: w.cursor, Recursive: true}).Next(ctx)
	switch {
	case etcdCode(err) == client.ErrorCodeEventIndexCleared:
		return nil, subnet.Rev{}, subnet.ErrCompacted
	case ctx.Err() != nil:
		return nil, subnet.Rev{}, ctx.Err()
	case err != nil:
		return nil, subnet.Rev{}, flatError(err)
	case resp.Node == nil:
		return nil, subnet.Rev{}, errors.New("etcd sent a watch event without a node")
	}
	n, rev := resp.Node, subnet.Rev{Index: int64(resp.Index), Cluster: resp.ClusterID}
	w.cursor = n.ModifiedIndex
	switch resp.Action {
	case "set", "create", "update", "compareAndSwap":
		if n.Dir {
			return nil, rev, nil
		}
	default:
		if n.Dir {
			return nil, rev, subnet.ErrCompacted // a directory deleted as a whole
		}
	}
	// Far behind etcd (a burst of writes): one listing catches up faster
	// than one request per event.
	if resp.Index > n.ModifiedIndex+relistLag {
		return nil, rev, subnet.ErrCompacted
	}
	deleted := resp.Action == "delete" || resp.Action == "expire" || resp.Action == "compareAndDelete"
	return []subnet.Change{{KV: toKV(n), Deleted: deleted}}, rev, nil
}
