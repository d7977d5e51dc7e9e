// Command flannel-migrate-v3 copies a flannel network from etcd's v2
// keyspace to its v3 keyspace on the same cluster: the config, the
// reservations (keys without TTL, copied without etcd lease) and the live
// leases (each attached to a new etcd lease with the TTL it has left). It
// writes nothing when a v3 key already holds a different value, and names
// those keys; keys that already hold the same value are left alone, so it
// can be run again.
package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path"
	"sort"
	"strings"
	"time"

	"github.com/spf13/pflag"
	client "go.etcd.io/etcd/client/v2"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/flanneld-go/flanneld/subnet/etcdv3"
)

func main() {
	var o struct {
		endpoints, prefix, cert, key, ca, user, password string
		dryRun                                           bool
	}
	fs := pflag.NewFlagSet("flannel-migrate-v3", pflag.ContinueOnError)
	fs.StringVar(&o.endpoints, "etcd-endpoints", "http://127.0.0.1:2379", "a comma-delimited list of etcd endpoints")
	fs.StringVar(&o.prefix, "etcd-prefix", "/coreos.com/network", "etcd prefix")
	fs.StringVar(&o.key, "etcd-keyfile", "", "SSL key file used to secure etcd communication")
	fs.StringVar(&o.cert, "etcd-certfile", "", "SSL certification file used to secure etcd communication")
	fs.StringVar(&o.ca, "etcd-cafile", "", "SSL Certificate Authority file used to secure etcd communication")
	fs.StringVar(&o.user, "etcd-username", "", "username for etcd authentication")
	fs.StringVar(&o.password, "etcd-password", "", "password for etcd authentication")
	fs.BoolVar(&o.dryRun, "dry-run", false, "report what would be copied, write nothing")
	if err := fs.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "flannel-migrate-v3:", err)
		os.Exit(2)
	}
	var endpoints []string
	for _, e := range strings.Split(o.endpoints, ",") {
		if e = strings.TrimSpace(e); e != "" {
			endpoints = append(endpoints, e)
		}
	}
	tlsCfg, err := etcdv3.ClientTLS(etcdv3.Options{CertFile: o.cert, KeyFile: o.key, CAFile: o.ca})
	if err == nil {
		var c2 client.Client
		c2, err = client.New(client.Config{Endpoints: endpoints, Transport: &http.Transport{TLSClientConfig: tlsCfg}, Username: o.user, Password: o.password})
		if err == nil {
			var c3 *clientv3.Client
			c3, err = clientv3.New(clientv3.Config{Endpoints: endpoints, TLS: tlsCfg, Username: o.user, Password: o.password, DialTimeout: 10 * time.Second, Logger: zap.NewNop()})
			if err == nil {
				defer c3.Close()
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
				defer cancel()
				var r *report
				r, err = migrate(ctx, client.NewKeysAPI(c2), c3, strings.TrimRight(o.prefix, "/"), o.dryRun)
				if r != nil {
					fmt.Println(r)
				}
			}
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "flannel-migrate-v3:", err)
		os.Exit(1)
	}
}

// item is one v2 key to copy.
type item struct {
	key   string
	value string
	ttl   int64 // seconds left; 0: no TTL (config, reservation)
}

// report says what migrate did.
type report struct {
	copied, same []string
	dryRun       bool
}

func (r *report) String() string {
	verb := "copied"
	if r.dryRun {
		verb = "would copy"
	}
	return fmt.Sprintf("%s %d keys, %d already the same in v3: %s", verb, len(r.copied), len(r.same), strings.Join(r.copied, " "))
}

// errConflict: some v3 keys hold other values than their v2 counterparts.
var errConflict = errors.New("refusing to overwrite v3 keys that hold a different value")

// migrate copies prefix/config and prefix/subnets/* from v2 to v3.
func migrate(ctx context.Context, kapi client.KeysAPI, c *clientv3.Client, prefix string, dryRun bool) (*report, error) {
	var items []item
	resp, err := kapi.Get(ctx, prefix+"/config", &client.GetOptions{Quorum: true})
	switch {
	case err == nil:
		items = append(items, item{key: resp.Node.Key, value: resp.Node.Value})
	case client.IsKeyNotFound(err):
		return nil, fmt.Errorf("reading %s/config with the v2 API: no config there; nothing to migrate", prefix)
	default:
		return nil, fmt.Errorf("reading %s/config with the v2 API: %w", prefix, err)
	}
	resp, err = kapi.Get(ctx, prefix+"/subnets", &client.GetOptions{Recursive: true, Quorum: true})
	switch {
	case err == nil:
		for _, n := range resp.Node.Nodes {
			if n.Dir || path.Dir(n.Key) != prefix+"/subnets" {
				continue
			}
			it := item{key: n.Key, value: n.Value}
			if n.Expiration != nil {
				it.ttl = n.TTL
				if it.ttl <= 0 {
					continue // expiring now
				}
			}
			items = append(items, it)
		}
	case client.IsKeyNotFound(err):
	default:
		return nil, fmt.Errorf("listing %s/subnets with the v2 API: %w", prefix, err)
	}
	sort.Slice(items, func(i, j int) bool { return items[i].key < items[j].key })

	// Check every key before writing any, against one listing.
	g, err := c.Get(ctx, prefix+"/", clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("listing %s/ with the v3 API: %w", prefix, err)
	}
	inV3 := make(map[string]string, len(g.Kvs))
	for _, kv := range g.Kvs {
		inV3[string(kv.Key)] = string(kv.Value)
	}
	r := &report{dryRun: dryRun}
	var todo []item
	var conflicts []string
	for _, it := range items {
		v, ok := inV3[it.key]
		switch {
		case !ok:
			todo = append(todo, it)
		case v == it.value:
			r.same = append(r.same, it.key)
		default:
			conflicts = append(conflicts, it.key)
		}
	}
	if len(conflicts) > 0 {
		return nil, fmt.Errorf("%w: %s; compare them with the v2 keys, delete the v3 ones that are wrong (etcdctl del KEY) and run again", errConflict, strings.Join(conflicts, ", "))
	}
	for _, it := range todo {
		if dryRun {
			r.copied = append(r.copied, it.key)
			continue
		}
		var opts []clientv3.OpOption
		var id clientv3.LeaseID
		if it.ttl > 0 {
			g, err := c.Grant(ctx, it.ttl)
			if err != nil {
				return r, fmt.Errorf("granting a %d s etcd lease for %s: %w", it.ttl, it.key, err)
			}
			id = g.ID
			opts = append(opts, clientv3.WithLease(id))
		}
		t, err := c.Txn(ctx).If(clientv3.Compare(clientv3.Version(it.key), "=", 0)).Then(clientv3.OpPut(it.key, it.value, opts...)).Commit()
		if err != nil {
			return r, fmt.Errorf("writing %s with the v3 API: %w", it.key, err)
		}
		if !t.Succeeded {
			if id != 0 {
				c.Revoke(ctx, id)
			}
			return r, fmt.Errorf("%w: %s was written by someone else during the migration; run again", errConflict, it.key)
		}
		r.copied = append(r.copied, it.key)
	}
	return r, nil
}
