package main

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	client "go.etcd.io/etcd/client/v2"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/flanneld-go/flanneld/internal/etcdtest"
)

const prefix = "/coreos.com/network"

func TestMigrate(t *testing.T) {
	srv := etcdtest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	kapi := srv.KeysAPI()
	set := func(key, value string, ttl time.Duration) {
		t.Helper()
		if _, err := kapi.Set(ctx, prefix+"/"+key, value, &client.SetOptions{TTL: ttl}); err != nil {
			t.Fatal(err)
		}
	}
	set("config", `{"Network":"10.5.0.0/16"}`, 0)
	set("subnets/10.5.1.0-24", `{"PublicIP":"192.168.0.1"}`, 0) // reservation
	set("subnets/10.5.2.0-24", `{"PublicIP":"192.168.0.2","BackendType":"vxlan"}`, time.Hour)
	set("subnets/10.5.3.0-24", `{"PublicIP":"192.168.0.3"}`, 24*time.Hour)
	c, err := clientv3.New(clientv3.Config{Endpoints: srv.Endpoints(), DialTimeout: 10 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	if r, err := migrate(ctx, kapi, c, prefix, true); err != nil || len(r.copied) != 4 {
		t.Fatalf("dry run: %v, %v", r, err)
	}
	if g, _ := c.Get(ctx, prefix+"/", clientv3.WithPrefix()); g.Count != 0 {
		t.Fatalf("the dry run wrote %d keys", g.Count)
	}
	r, err := migrate(ctx, kapi, c, prefix, false)
	if err != nil || len(r.copied) != 4 {
		t.Fatalf("migrate: %v, %v", r, err)
	}
	for key, wantTTL := range map[string]int64{"config": 0, "subnets/10.5.1.0-24": 0, "subnets/10.5.2.0-24": 3600, "subnets/10.5.3.0-24": 86400} {
		g, err := c.Get(ctx, prefix+"/"+key)
		if err != nil || len(g.Kvs) != 1 {
			t.Fatalf("v3 %s: %v %v", key, g, err)
		}
		v2, _ := kapi.Get(ctx, prefix+"/"+key, nil)
		if string(g.Kvs[0].Value) != v2.Node.Value {
			t.Errorf("v3 %s = %s, want %s", key, g.Kvs[0].Value, v2.Node.Value)
		}
		if wantTTL == 0 {
			if g.Kvs[0].Lease != 0 {
				t.Errorf("%s is on an etcd lease, want none", key)
			}
			continue
		}
		ttl, err := c.TimeToLive(ctx, clientv3.LeaseID(g.Kvs[0].Lease))
		if err != nil || ttl.TTL > wantTTL || ttl.TTL < wantTTL-60 {
			t.Errorf("%s: etcd lease TTL %d (%v), want about %d (what v2 had left)", key, ttl.TTL, err, wantTTL)
		}
	}
	// Again: nothing to do.
	if r, err := migrate(ctx, kapi, c, prefix, false); err != nil || len(r.copied) != 0 || len(r.same) != 4 {
		t.Fatalf("second run: %v, %v", r, err)
	}
	// A v3 key holding something else: refused, named, nothing written.
	if _, err := c.Put(ctx, prefix+"/subnets/10.5.2.0-24", `{"PublicIP":"192.168.9.9"}`); err != nil {
		t.Fatal(err)
	}
	set("subnets/10.5.4.0-24", `{"PublicIP":"192.168.0.4"}`, time.Hour)
	_, err = migrate(ctx, kapi, c, prefix, false)
	if !errors.Is(err, errConflict) || !strings.Contains(err.Error(), prefix+"/subnets/10.5.2.0-24") {
		t.Fatalf("with a differing v3 key: %v, want a refusal naming it", err)
	}
	if g, _ := c.Get(ctx, prefix+"/subnets/10.5.4.0-24"); len(g.Kvs) != 0 {
		t.Errorf("a refused migration wrote %s", g.Kvs[0].Key)
	}
}
