package etcdtest

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/client/v2"
)

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestPutGetV2(t *testing.T) {
	begin := time.Now()
	s := Start(t)
	t.Logf("started in %v at %v", time.Since(begin), s.Endpoints())
	ctx := ctxT(t)
	kapi := s.KeysAPI()
	if _, err := kapi.Set(ctx, "/coreos.com/network/config", `{"Network":"10.5.0.0/16"}`, nil); err != nil {
		t.Fatalf("set: %v", err)
	}
	resp, err := kapi.Get(ctx, "/coreos.com/network/config", nil)
	if err != nil {
		t.Fatalf("get: %v", err)
	}
	if got, want := resp.Node.Value, `{"Network":"10.5.0.0/16"}`; got != want {
		t.Fatalf("value = %q, want %q", got, want)
	}
	// A v2 create with prevExist=false on an existing key fails with 105.
	_, err = kapi.Set(ctx, "/coreos.com/network/config", "x", &client.SetOptions{PrevExist: client.PrevNoExist})
	var cerr client.Error
	if !errors.As(err, &cerr) || cerr.Code != client.ErrorCodeNodeExist {
		t.Fatalf("create over existing key: err = %v, want etcd error %d", err, client.ErrorCodeNodeExist)
	}
}

func TestStopRestartKeepsDataAndEndpoint(t *testing.T) {
	s := Start(t)
	ctx := ctxT(t)
	kapi := s.KeysAPI()
	if _, err := kapi.Set(ctx, "/k", "v1", nil); err != nil {
		t.Fatalf("set: %v", err)
	}
	before := s.Endpoints()[0]

	s.Stop()
	s.Stop() // idempotent
	if s.Running() {
		t.Fatal("Running() = true after Stop")
	}
	shortCtx, cancel := context.WithTimeout(ctx, 2*time.Second)
	_, err := kapi.Get(shortCtx, "/k", nil)
	cancel()
	if err == nil {
		t.Fatal("get on a stopped server succeeded")
	}

	begin := time.Now()
	if err := s.Restart(); err != nil {
		t.Fatalf("restart: %v", err)
	}
	t.Logf("restarted in %v", time.Since(begin))
	if got := s.Endpoints()[0]; got != before {
		t.Fatalf("endpoint changed across restart: %s -> %s", before, got)
	}
	resp, err := kapi.Get(ctx, "/k", nil)
	if err != nil {
		t.Fatalf("get after restart: %v", err)
	}
	if resp.Node.Value != "v1" {
		t.Fatalf("value after restart = %q, want v1", resp.Node.Value)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	if err := s.Restart(); !errors.Is(err, ErrStopped) {
		t.Fatalf("restart after close: err = %v, want ErrStopped", err)
	}
}

func TestTLSRequiresClientCert(t *testing.T) {
	s := Start(t, WithTLS())
	ctx := ctxT(t)
	if !strings.HasPrefix(s.Endpoints()[0], "https://") {
		t.Fatalf("endpoint %s is not https", s.Endpoints()[0])
	}
	f := s.TLS()
	for _, p := range []string{f.CAFile, f.ServerCert, f.ServerKey, f.ClientCert, f.ClientKey} {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("PEM file: %v", err)
		}
	}
	// With the client certificate: works.
	if _, err := s.KeysAPI().Set(ctx, "/tls", "ok", nil); err != nil {
		t.Fatalf("set with client cert: %v", err)
	}

	caPEM, err := os.ReadFile(f.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	noCert := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
	defer noCert.CloseIdleConnections()
	c, err := client.New(client.Config{Endpoints: s.Endpoints(), Transport: noCert})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := client.NewKeysAPI(c).Get(ctx, "/tls", nil); err == nil {
		t.Fatal("get without a client certificate succeeded")
	}

	// Plain HTTP to the TLS port is refused too.
	plainURL := "http://" + strings.TrimPrefix(s.Endpoints()[0], "https://")
	plain := &http.Transport{}
	defer plain.CloseIdleConnections()
	c, err = client.New(client.Config{Endpoints: []string{plainURL}, Transport: plain})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := client.NewKeysAPI(c).Get(ctx, "/tls", nil); err == nil {
		t.Fatal("get over plain HTTP succeeded")
	}
}

// TestNetNSListener checks that WithNetNS puts the listening sockets in the
// namespace, not in the caller's, and that the helpers dial from inside it.
func TestNetNSListener(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("creating a network namespace needs root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Fatalf("the ip command is missing: apt-get install iproute2")
	}
	ns := fmt.Sprintf("etcdtest-%d", os.Getpid())
	run := func(args ...string) string {
		t.Helper()
		out, err := exec.Command("ip", args...).CombinedOutput()
		if err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	run("netns", "add", ns)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	run("-n", ns, "link", "set", "lo", "up")

	s := Start(t, WithNetNS("/run/netns/"+ns), WithListen(netip.MustParseAddr("127.0.0.1"), 0, 0))
	ctx := ctxT(t)
	if _, err := s.KeysAPI().Set(ctx, "/ns", "inside", nil); err != nil {
		t.Fatalf("set through the namespace dialer: %v", err)
	}
	port := s.clientURL.Port()
	out, err := exec.Command("ip", "netns", "exec", ns, "ss", "-Hltn", "sport", "= :"+port).CombinedOutput()
	if err != nil {
		t.Fatalf("ss in namespace: %v: %s", err, out)
	}
	if !strings.Contains(string(out), ":"+port) {
		t.Fatalf("no listener on port %s inside the namespace; ss says %q", port, out)
	}
	out, err = exec.Command("ss", "-Hltn", "sport", "= :"+port).CombinedOutput()
	if err != nil {
		t.Fatalf("ss in root namespace: %v: %s", err, out)
	}
	if strings.Contains(string(out), ":"+port) {
		t.Fatalf("etcd port %s is listening in the caller's namespace: %q", port, out)
	}
	s.Stop()
	if err := s.Restart(); err != nil {
		t.Fatalf("restart in namespace: %v", err)
	}
	resp, err := s.KeysAPI().Get(ctx, "/ns", nil)
	if err != nil || resp.Node.Value != "inside" {
		t.Fatalf("get after restart in namespace: %v %v", resp, err)
	}
}
