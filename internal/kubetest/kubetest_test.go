package kubetest

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"

	authv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestBinary builds (or finds) kube-apiserver Version; `make test` runs it
// first, so that the build does not count against other packages' time.
func TestBinary(t *testing.T) {
	bin, err := Binary()
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, "--version").CombinedOutput()
	if err != nil || !strings.Contains(string(out), Version) {
		t.Errorf("%s --version = %q, %v; want %s", bin, out, err, Version)
	}
}

// TestServer starts a server, uses it with both tokens and stops it:
// afterwards neither the process nor its files remain.
func TestServer(t *testing.T) {
	s, err := New()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if !strings.HasPrefix(s.URL, "https://127.0.0.1:") {
		t.Errorf("URL = %s, want loopback", s.URL)
	}
	ctx := context.Background()
	v, err := s.Admin(t).Discovery().ServerVersion()
	if err != nil || v.GitVersion != Version {
		t.Errorf("server version = %v, %v; want %s", v, err, Version)
	}
	if _, err := s.Admin(t).CoreV1().Nodes().List(ctx, metav1.ListOptions{}); err != nil {
		t.Errorf("admin cannot list nodes: %v", err)
	}
	fl, err := s.Client(s.FlannelToken)
	if err != nil {
		t.Fatal(err)
	}
	review, err := fl.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil || review.Status.UserInfo.Username != FlannelUser {
		t.Errorf("flannel token authenticates as %+v (%v), want %q", review, err, FlannelUser)
	}
	if _, err := fl.CoreV1().Nodes().List(ctx, metav1.ListOptions{}); err == nil {
		t.Error("the flannel token lists nodes with no binding; want Forbidden")
	}

	pid, dir := s.Pid(), s.dir
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, 0); err == nil {
		t.Errorf("kube-apiserver (pid %d) still runs after Close", pid)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("%s remains after Close (stat: %v)", dir, err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}
