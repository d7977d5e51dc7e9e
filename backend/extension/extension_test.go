package extension

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/subnet"
)

// logBuf collects a logger's lines.
type logBuf struct {
	mu    sync.Mutex
	lines []string
}

func (b *logBuf) logger() logr.Logger {
	return funcr.New(func(prefix, args string) {
		b.mu.Lock()
		defer b.mu.Unlock()
		b.lines = append(b.lines, args)
	}, funcr.Options{Verbosity: 1})
}

func (b *logBuf) matching(s string) []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []string
	for _, l := range b.lines {
		if strings.Contains(l, s) {
			out = append(out, l)
		}
	}
	return out
}

// script writes an executable shell script into dir.
func script(t *testing.T, dir, name, body string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func newTest(t *testing.T, backendJSON string, timeout time.Duration) (*extension, *logBuf) {
	t.Helper()
	cfg := &subnet.Config{Network: netip.MustParsePrefix("10.5.0.0/16"), SubnetLen: 24, BackendType: Type, Backend: json.RawMessage(backendJSON), EnableIPv4: true}
	logs := &logBuf{}
	e, err := newExtension(backend.Options{
		Ext: backend.ExternalInterface{
			Iface:    &net.Interface{Name: "eth0", Index: 2, MTU: 1400},
			PublicIP: netip.MustParseAddr("192.168.9.1"), IfaceAddr: netip.MustParseAddr("192.168.9.1"),
		},
		Config: cfg,
		Logger: logs.logger(),
	}, timeout)
	if err != nil {
		t.Fatal(err)
	}
	return e, logs
}

func commandJSON(kv ...string) string {
	m := map[string]string{"Type": Type}
	for i := 0; i < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	b, _ := json.Marshal(m)
	return string(b)
}

func TestArgvSplitAndExpand(t *testing.T) {
	t.Setenv("EXT_TEST_HOME", "/h")
	c := parseCommand("SubnetAddCommand", "  ip route  replace $SUBNET\tvia ${PUBLIC_IP} ; $EXT_TEST_HOME/x '$NOPE' \"a b\"")
	got := c.argv(map[string]string{"SUBNET": "10.5.2.0/24", "PUBLIC_IP": "192.168.9.2"})
	want := []string{"ip", "route", "replace", "10.5.2.0/24", "via", "192.168.9.2", ";", "/h/x", "''", `"a`, `b"`}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("argv = %q, want %q (split on white space, expanded, no shell, no quoting)", got, want)
	}
	if parseCommand("X", " \t ").set() {
		t.Error("a blank command counts as set")
	}
}

func TestConfigErrors(t *testing.T) {
	for _, tc := range []struct{ raw, want string }{
		{`[1]`, "not a JSON object"},
		{`{"SubnetAddCommand":5}`, "SubnetAddCommand must be a string"},
	} {
		_, err := parseConfig(json.RawMessage(tc.raw))
		if err == nil || !strings.Contains(err.Error(), tc.want) || !errors.Is(err, subnet.ErrInvalidConfig) {
			t.Errorf("parseConfig(%s) = %v, want a config error containing %q", tc.raw, err, tc.want)
		}
	}
	k, err := parseConfig(json.RawMessage(`{"type":"extension","subnetaddcommand":"a b","Other":1}`))
	if err != nil || k.SubnetAddCommand != "a b" {
		t.Errorf("keys match case-insensitively and unknown keys are ignored: got %+v, %v", k, err)
	}
}

// TestPreStartupBackendData: the trimmed combined output, stdin "\n", as a
// JSON string; a failure stops Init with its exit status and output.
func TestPreStartupBackendData(t *testing.T) {
	dir := t.TempDir()
	pre := script(t, dir, "pre.sh", `read -r line; echo "stdin=[$line] $1"; echo "  err-part  " >&2`)
	e, _ := newTest(t, commandJSON("PreStartupCommand", pre+" aa:bb"), DefaultTimeout)
	pub, err := e.Init(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if want := `"stdin=[] aa:bb\n  err-part"`; string(pub.BackendData) != want {
		t.Errorf("BackendData = %s, want %s", pub.BackendData, want)
	}
	if pub.MTU != 1400 {
		t.Errorf("MTU = %d, want the interface's 1400", pub.MTU)
	}

	e, _ = newTest(t, commandJSON("PreStartupCommand", script(t, dir, "bad.sh", "echo no key here; exit 7")), DefaultTimeout)
	_, err = e.Init(context.Background())
	if err == nil || !strings.Contains(err.Error(), "exit status 7") || !strings.Contains(err.Error(), "no key here") || !strings.Contains(err.Error(), "PreStartupCommand") {
		t.Errorf("failing PreStartupCommand: Init = %v, want the key, exit status 7 and the output", err)
	}

	e, _ = newTest(t, commandJSON("PreStartupCommand", "head -c 100000 /dev/zero"), DefaultTimeout)
	if _, err = e.Init(context.Background()); err == nil || !strings.Contains(err.Error(), "more than the 65536") {
		t.Errorf("PreStartupCommand printing 100000 bytes: Init = %v, want an error naming the bound", err)
	}

	e, _ = newTest(t, commandJSON(), DefaultTimeout)
	if pub, err = e.Init(context.Background()); err != nil || pub.BackendData != nil {
		t.Errorf("no PreStartupCommand: Init = %s, %v; want no BackendData", pub.BackendData, err)
	}
}

// TestHangingCommandKilled: a command that does not finish is killed at the
// timeout with the children it started, and the failure is logged once per
// Apply with the reason and the start of its output.
func TestHangingCommandKilled(t *testing.T) {
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "child.pid")
	hang := script(t, dir, "hang.sh", `echo started; sleep 600 & echo $! > `+pidFile+`; wait`)
	e, logs := newTest(t, commandJSON("SubnetAddCommand", hang), 2*time.Second)
	if _, err := e.Init(context.Background()); err != nil {
		t.Fatal(err)
	}
	own := lease("10.5.1.0/24", "192.168.9.1", "")
	peer := lease("10.5.2.0/24", "192.168.9.2", `"x"`)
	start := time.Now()
	if err := e.Apply(context.Background(), own, []subnet.Lease{peer}); err != nil {
		t.Fatalf("Apply = %v; a failing SubnetAddCommand is logged, not returned", err)
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Errorf("Apply took %v with a 2s timeout", d)
	}
	lines := logs.matching("SubnetAddCommand failed")
	if len(lines) != 1 || !strings.Contains(lines[0], "timed out after 2s and was killed") || !strings.Contains(lines[0], "started") {
		t.Errorf("log lines for the hung command = %q, want one saying it was killed, with its output", lines)
	}
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	// Killed with its group: gone, or a zombie left for init to reap.
	alive := func() bool {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return false
		}
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		return len(f) > 0 && f[0] != "Z" && f[0] != "X"
	}
	deadline := time.Now().Add(10 * time.Second)
	for alive() {
		if time.Now().After(deadline) {
			syscall.Kill(pid, syscall.SIGKILL)
			t.Fatalf("the command's child %d still runs after the timeout", pid)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if len(e.added) != 0 {
		t.Errorf("a killed SubnetAddCommand counts as added: %v", e.added)
	}
}

func lease(sn, pub, data string) subnet.Lease {
	l := subnet.Lease{Subnet: netip.MustParsePrefix(sn), Attrs: subnet.LeaseAttrs{PublicIP: netip.MustParseAddr(pub), BackendType: Type}}
	if data != "" {
		l.Attrs.BackendData = json.RawMessage(data)
	}
	return l
}

// TestApplyReconciles runs recording scripts: the environment and stdin of
// each command, Add once per lease (again when it changes), Remove for a
// lease gone, a bad BackendData skipped and logged once, and a failing
// Remove retried.
func TestApplyReconciles(t *testing.T) {
	dir := t.TempDir()
	rec := filepath.Join(dir, "rec")
	failRemove := filepath.Join(dir, "fail-remove")
	record := func(name string) string {
		return script(t, dir, name+".sh", `read -r in; echo "`+name+` $SUBNET $PUBLIC_IP [$in] $*" >> `+rec+"\n"+
			`[ "`+name+`" = remove ] && [ -e `+failRemove+` ] && { echo refusing; exit 4; }; exit 0`)
	}
	post := script(t, dir, "post.sh", `echo "post $NETWORK $SUBNET [$IPV6SUBNET] $PUBLIC_IP [$PUBLIC_IPV6]" >> `+rec)
	e, logs := newTest(t, commandJSON(
		"PostStartupCommand", post,
		"SubnetAddCommand", record("add")+" ${PUBLIC_IP}",
		"SubnetRemoveCommand", record("remove")), DefaultTimeout)
	if _, err := e.Init(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	own := lease("10.5.1.0/24", "192.168.9.1", "")
	a := lease("10.5.2.0/24", "192.168.9.2", `"mac-a"`)
	b := lease("10.5.3.0/24", "192.168.9.3", "")
	bad := lease("10.5.4.0/24", "192.168.9.4", `{"VtepMAC":"x"}`)
	steps := []struct {
		remote []subnet.Lease
		setup  func()
		want   []string
	}{
		{[]subnet.Lease{a, b, bad}, nil, []string{
			"post 10.5.0.0/16 10.5.1.0/24 [] 192.168.9.1 []",
			"add 10.5.2.0/24 192.168.9.2 [mac-a] 192.168.9.2",
			"add 10.5.3.0/24 192.168.9.3 [] 192.168.9.3",
		}},
		{[]subnet.Lease{a, b, bad}, nil, nil}, // idempotent
		{[]subnet.Lease{lease("10.5.2.0/24", "192.168.9.22", `"mac-a"`), bad}, func() { os.WriteFile(failRemove, nil, 0o644) }, []string{
			"add 10.5.2.0/24 192.168.9.22 [mac-a] 192.168.9.22",
			"remove 10.5.3.0/24 192.168.9.3 []",
		}},
		{[]subnet.Lease{}, func() { os.Remove(failRemove) }, []string{
			"remove 10.5.2.0/24 192.168.9.22 [mac-a]",
			"remove 10.5.3.0/24 192.168.9.3 []",
		}},
		{[]subnet.Lease{}, nil, nil},
	}
	for i, s := range steps {
		os.Remove(rec)
		if s.setup != nil {
			s.setup()
		}
		if err := e.Apply(ctx, own, s.remote); err != nil {
			t.Fatalf("step %d: Apply = %v", i, err)
		}
		got, _ := os.ReadFile(rec)
		lines := strings.Split(strings.TrimSpace(string(got)), "\n")
		if len(got) == 0 {
			lines = nil
		}
		for j := range lines {
			lines[j] = strings.TrimSpace(lines[j])
		}
		if strings.Join(slices.Sorted(slices.Values(lines)), "\n") != strings.Join(slices.Sorted(slices.Values(s.want)), "\n") {
			t.Errorf("step %d: commands run:\n%s\nwant:\n%s", i, strings.Join(lines, "\n"), strings.Join(s.want, "\n"))
		}
	}
	if n := len(logs.matching("BackendData is not a JSON string")); n != 1 {
		t.Errorf("the lease with a bad BackendData was logged %d times, want once", n)
	}
	if l := logs.matching("SubnetRemoveCommand failed"); len(l) != 1 || !strings.Contains(l[0], "exit status 4") || !strings.Contains(l[0], "refusing") {
		t.Errorf("failing remove logged as %q, want one line with exit status 4 and its output", l)
	}
}

// TestPostStartupFailure: a failing PostStartupCommand is returned (the
// daemon stops at start, as flannel's) and run again at the next Apply.
func TestPostStartupFailure(t *testing.T) {
	dir := t.TempDir()
	flag := filepath.Join(dir, "ok")
	post := script(t, dir, "post.sh", `[ -e `+flag+` ] || { echo not yet; exit 2; }`)
	e, _ := newTest(t, commandJSON("PostStartupCommand", post), DefaultTimeout)
	own := lease("10.5.1.0/24", "192.168.9.1", "")
	err := e.Apply(context.Background(), own, nil)
	if err == nil || !strings.Contains(err.Error(), "exit status 2") || !strings.Contains(err.Error(), "not yet") {
		t.Fatalf("Apply = %v, want PostStartupCommand's failure", err)
	}
	os.WriteFile(flag, nil, 0o644)
	if err := e.Apply(context.Background(), own, nil); err != nil {
		t.Fatalf("Apply after the command is fixed = %v", err)
	}
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
