package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/client/v2"

	"github.com/flanneld-go/flanneld/e2e/lab"
	"github.com/flanneld-go/flanneld/internal/etcdtest"
)

// TestSecurityTLS runs the daemon against an etcd that serves TLS and
// requires a client certificate: with --etcd-certfile, --etcd-keyfile and
// --etcd-cafile it gets a lease; without the CA, or without the client
// certificate, it gets none and says why: a line naming the config key and
// the TLS certificate problem. Its log never holds the client key.
func TestSecurityTLS(t *testing.T) {
	t.Parallel()
	l := newLab(t, 1, "")
	ctx := testCtx(t, 3*time.Minute)
	h := l.Host(1)
	srv := etcdtest.Start(t, etcdtest.WithTLS(), etcdtest.WithNetNS(lanNSPath(l)),
		etcdtest.WithListen(l.EtcdAddr(), 0, 0), etcdtest.WithParentDir(l.Dir()))
	t.Cleanup(func() { stopAll(t, l) }) // before the server closes
	kapi := srv.KeysAPI()
	if _, err := kapi.Set(ctx, l.EtcdPrefix()+"/config", hostGWConfig, nil); err != nil {
		t.Fatal(err)
	}
	tf := srv.TLS()
	ep := srv.Endpoints()[0]
	configKey := l.EtcdPrefix() + "/config"
	keyPEM, err := os.ReadFile(tf.ClientKey)
	if err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name string
		args []string
		want []string // in the line that says why
	}{
		// The server's certificate is signed by a CA the daemon does not
		// trust.
		{"NoCAFile", []string{"--etcd-certfile", tf.ClientCert, "--etcd-keyfile", tf.ClientKey}, []string{configKey, "tls: ", "certificate", "unknown authority"}},
		// The server wants a client certificate.
		{"NoClientCert", []string{"--etcd-cafile", tf.CAFile}, []string{configKey, "tls: ", "certificate required"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := startDaemon(t, h, append([]string{"--etcd-endpoints", ep, "-v=10"}, tc.args...)...)
			var line string
			eventually(t, "a log line on the TLS failure", func() error {
				log := d.Log()
				for _, ln := range strings.Split(log, "\n") {
					if !slices.ContainsFunc(tc.want, func(w string) bool { return !strings.Contains(ln, w) }) {
						line = ln
						return nil
					}
				}
				if d.Exited() {
					return fmt.Errorf("flanneld exited without a line saying all of %q:\n%s", tc.want, log)
				}
				return fmt.Errorf("no line says all of %q yet:\n%s", tc.want, log)
			})
			t.Logf("flanneld says: %s", line)
			if d.Exited() {
				code, _ := d.Wait()
				t.Logf("flanneld exited with %d", code)
				if code == 0 {
					t.Errorf("flanneld exited 0 without reaching etcd")
				}
			} else {
				t.Logf("flanneld keeps retrying")
				if code := stop(t, d); code != 0 {
					t.Errorf("flanneld exited with %d after SIGTERM, want 0", code)
				}
			}
			if _, err := os.Stat(h.SubnetFile); !os.IsNotExist(err) {
				t.Errorf("subnet.env exists without a TLS connection to etcd (stat: %v)", err)
			}
			resp, err := kapi.Get(ctx, l.EtcdPrefix()+"/subnets", nil)
			if err == nil && len(resp.Node.Nodes) > 0 {
				t.Errorf("etcd holds leases without a TLS connection: %v", resp.Node.Nodes)
			} else if err != nil && !client.IsKeyNotFound(err) {
				t.Fatal(err)
			}
			checkNoSecret(t, d, "the client key", keyPEM)
		})
	}

	d := startDaemon(t, h, "--etcd-endpoints", ep, "--etcd-certfile", tf.ClientCert,
		"--etcd-keyfile", tf.ClientKey, "--etcd-cafile", tf.CAFile, "-v=10")
	env := waitEnv(t, h)
	resp, err := kapi.Get(ctx, leaseKey(l, env.Subnet), nil)
	if err != nil {
		t.Fatalf("reading the lease of subnet.env's %s: %v", env.Subnet, err)
	}
	var v struct{ PublicIP string }
	if err := json.Unmarshal([]byte(resp.Node.Value), &v); err != nil || v.PublicIP != h.Addr.String() || resp.Node.TTL <= 0 {
		t.Errorf("lease %s = %s (TTL %d), want PublicIP %s with a TTL", resp.Node.Key, resp.Node.Value, resp.Node.TTL, h.Addr)
	}
	eventually(t, "rules on host1", func() error { return checkRules(ctx, h, network, env.Subnet, false) })
	if code := stop(t, d); code != 0 {
		t.Errorf("flanneld exited with %d after SIGTERM, want 0", code)
	}
	checkNoSecret(t, d, "the client key", keyPEM)
}

// checkNoSecret fails the test if any line of the PEM secret, or the
// secret itself when it is not PEM, appears in d's whole log.
func checkNoSecret(t *testing.T, d *lab.Daemon, what string, secret []byte) {
	t.Helper()
	log := d.Log()
	parts := []string{string(secret)}
	if strings.HasPrefix(string(secret), "-----BEGIN") {
		parts = nil
		for _, ln := range strings.Split(string(secret), "\n") {
			if ln != "" && !strings.HasPrefix(ln, "-----") {
				parts = append(parts, ln)
			}
		}
	}
	for _, p := range parts {
		if strings.Contains(log, p) {
			t.Errorf("%s appears in flanneld's log %s", what, d.LogPath)
			return
		}
	}
	t.Logf("%s is not in flanneld's log (%d bytes, %d lines)", what, len(log), strings.Count(log, "\n"))
}

// TestSecurityBasicAuth turns on etcd's v2 auth (guest may do nothing):
// the daemon with --etcd-username and --etcd-password gets a lease; with
// no credentials or a wrong password it exits with one line saying etcd
// refused access and what to check. Run at -v=10, no log ever holds the
// password given, right or wrong.
func TestSecurityBasicAuth(t *testing.T) {
	t.Parallel()
	l := newLab(t, 1, hostGWConfig)
	ctx := testCtx(t, 3*time.Minute)
	h := l.Host(1)
	const (
		rootPW  = "root-pw-9d1f2a"
		pw      = "flannel-pw-5c3e8b-never-logged"
		wrongPW = "wrong-pw-71aa4d-never-logged"
	)
	root := enableAuth(t, ctx, l, rootPW, pw)

	for _, tc := range []struct {
		name string
		args []string
	}{
		{"NoCredentials", nil},
		{"WrongPassword", []string{"--etcd-username", "flannel", "--etcd-password", wrongPW}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := startDaemon(t, h, append([]string{"-v=10"}, tc.args...)...)
			code := waitExit(t, d)
			log := d.Log()
			if code == 0 {
				t.Errorf("flanneld exited 0, want non-zero; log:\n%s", log)
			}
			lines := strings.Split(strings.TrimSpace(log), "\n")
			last := lines[len(lines)-1]
			t.Logf("exit %d, last line: %s", code, last)
			for _, w := range []string{"flanneld: ", l.EtcdPrefix() + "/config", "refused", "password"} {
				if !strings.Contains(last, w) {
					t.Errorf("last line %q does not say %q", last, w)
				}
			}
			checkNoSecret(t, d, "the password", []byte(wrongPW))
			checkNoSecret(t, d, "the right password", []byte(pw))
			if _, err := os.Stat(h.SubnetFile); !os.IsNotExist(err) {
				t.Errorf("subnet.env exists without access to etcd (stat: %v)", err)
			}
		})
	}

	d := startDaemon(t, h, "--etcd-username", "flannel", "--etcd-password", pw, "-v=10")
	env := waitEnv(t, h)
	leases, err := root.Get(ctx, l.EtcdPrefix()+"/subnets", &client.GetOptions{Recursive: true})
	if err != nil {
		t.Fatal(err)
	}
	if n := leases.Node.Nodes; len(n) != 1 || n[0].Key != leaseKey(l, env.Subnet) {
		t.Errorf("etcd holds %v, want just the lease of %s", n, env.Subnet)
	}
	eventually(t, "rules on host1", func() error { return checkRules(ctx, h, network, env.Subnet, false) })
	if code := stop(t, d); code != 0 {
		t.Errorf("flanneld exited with %d after SIGTERM, want 0", code)
	}
	checkNoSecret(t, d, "the password", []byte(pw))
}

// enableAuth turns on v2 auth on the lab's etcd: a root user, a user
// "flannel" with password pw that may read and write the prefix, and a
// guest that may do nothing. It returns a keys API logged in as root.
func enableAuth(t *testing.T, ctx context.Context, l *lab.Lab, rootPW, pw string) client.KeysAPI {
	t.Helper()
	c := l.Etcd().Client()
	users, roles := client.NewAuthUserAPI(c), client.NewAuthRoleAPI(c)
	if err := users.AddUser(ctx, "root", rootPW); err != nil {
		t.Fatalf("adding root user: %v", err)
	}
	if err := roles.AddRole(ctx, "flannel"); err != nil {
		t.Fatalf("adding role: %v", err)
	}
	prefix := l.EtcdPrefix()
	if _, err := roles.GrantRoleKV(ctx, "flannel", []string{prefix, prefix + "/*"}, client.ReadWritePermission); err != nil {
		t.Fatalf("granting role: %v", err)
	}
	if err := users.AddUser(ctx, "flannel", pw); err != nil {
		t.Fatalf("adding user: %v", err)
	}
	if _, err := users.GrantUser(ctx, "flannel", []string{"flannel"}); err != nil {
		t.Fatalf("granting user: %v", err)
	}
	if err := client.NewAuthAPI(c).Enable(ctx); err != nil {
		t.Fatalf("enabling auth: %v", err)
	}
	rc, err := client.New(client.Config{Endpoints: l.Etcd().Endpoints(), Transport: l.Etcd().Transport(), Username: "root", Password: rootPW})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := client.NewAuthRoleAPI(rc).RevokeRoleKV(ctx, "guest", []string{"/*"}, client.ReadWritePermission); err != nil {
		t.Fatalf("revoking guest: %v", err)
	}
	return client.NewKeysAPI(rc)
}
