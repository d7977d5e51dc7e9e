package etcdtest

import (
	"net/http"
	"testing"
	"time"

	"go.etcd.io/etcd/client/v2"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

func v3Client(t *testing.T, s *Server) *clientv3.Client {
	t.Helper()
	c, err := clientv3.New(clientv3.Config{Endpoints: s.Endpoints(), DialTimeout: 10 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestWithoutV2 serves v3 and answers the v2 keys API with a plain 404, as
// etcd 3.6 does.
func TestWithoutV2(t *testing.T) {
	s := Start(t, WithoutV2())
	ctx := ctxT(t)
	if _, err := v3Client(t, s).Put(ctx, "/k", "v"); err != nil {
		t.Fatalf("v3 put: %v", err)
	}
	resp, err := http.Get(s.Endpoints()[0] + "/v2/keys/k")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("v2 GET = HTTP %d, want 404", resp.StatusCode)
	}
	if _, err := s.KeysAPI().Get(ctx, "/k", nil); err == nil {
		t.Errorf("v2 get succeeded on a server without v2")
	}
}

// TestWipe: the same endpoint serves an empty store whose revision starts
// again, and clients reconnect to it.
func TestWipe(t *testing.T) {
	s := Start(t)
	ctx := ctxT(t)
	c := v3Client(t, s)
	for range 5 {
		if _, err := c.Put(ctx, "/k", "v"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.KeysAPI().Set(ctx, "/v2key", "v", nil); err != nil {
		t.Fatal(err)
	}
	before, err := c.Get(ctx, "/k")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Wipe(); err != nil {
		t.Fatal(err)
	}
	after, err := c.Get(ctx, "/k")
	if err != nil {
		t.Fatalf("get after the wipe: %v", err)
	}
	if after.Count != 0 || after.Header.Revision >= before.Header.Revision {
		t.Errorf("after the wipe: %d keys at revision %d, want none at a revision below %d", after.Count, after.Header.Revision, before.Header.Revision)
	}
	if _, err := s.KeysAPI().Get(ctx, "/v2key", nil); !client.IsKeyNotFound(err) {
		t.Errorf("v2 key after the wipe: %v, want not found", err)
	}
	s.Close()
	if err := s.Wipe(); err != ErrStopped {
		t.Errorf("Wipe after Close = %v, want ErrStopped", err)
	}
}
