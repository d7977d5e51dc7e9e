package dist

import (
	goflag "flag"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/e2e/lab"
)

const (
	unitFile    = "flanneld.service"
	defaultFile = "flanneld.default"
	dropInFile  = "docker-flannel.conf"
)

// unit is a parsed systemd unit file or drop-in: section -> settings in
// file order.
type unit map[string][]setting

type setting struct{ key, value string }

// parseUnit parses the systemd unit file syntax: [Section], Key=Value,
// comments starting with # or ;, lines continued with a trailing backslash.
func parseUnit(t *testing.T, path string) unit {
	t.Helper()
	u := unit{}
	section := ""
	var cont string
	for i, line := range strings.Split(readFile(t, path), "\n") {
		line = strings.TrimSpace(line)
		if cont == "" && (line == "" || line[0] == '#' || line[0] == ';') {
			continue
		}
		if strings.HasSuffix(line, `\`) {
			cont += strings.TrimSuffix(line, `\`) + " "
			continue
		}
		line, cont = cont+line, ""
		if strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]") {
			section = line[1 : len(line)-1]
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok || section == "" {
			t.Fatalf("%s:%d: %q is neither a [Section] nor a Key=Value in a section", path, i+1, line)
		}
		u[section] = append(u[section], setting{strings.TrimSpace(k), strings.TrimSpace(v)})
	}
	return u
}

// raw returns every value of key in section, in order.
func (u unit) raw(section, key string) []string {
	var out []string
	for _, s := range u[section] {
		if s.key == key {
			out = append(out, s.value)
		}
	}
	return out
}

// last returns the effective value of a single-valued setting.
func (u unit) last(section, key string) string {
	v := u.raw(section, key)
	if len(v) == 0 {
		return ""
	}
	return v[len(v)-1]
}

// list returns the effective words of a list setting: values add words, an
// empty value clears the list.
func (u unit) list(section, key string) []string {
	var out []string
	for _, v := range u.raw(section, key) {
		if v == "" {
			out = nil
			continue
		}
		out = append(out, strings.Fields(v)...)
	}
	return out
}

func TestFlanneldUnit(t *testing.T) {
	u := parseUnit(t, unitFile)
	for _, c := range []struct{ section, key, want string }{
		{"Unit", "After", "network-online.target"},
		{"Unit", "Wants", "network-online.target"},
		{"Unit", "Before", "docker.service"},
		{"Service", "EnvironmentFile", "-/etc/default/flanneld"},
		{"Install", "WantedBy", "multi-user.target"},
	} {
		if got := u.list(c.section, c.key); !slices.Contains(got, c.want) {
			t.Errorf("[%s] %s=%q, want it to include %s", c.section, c.key, got, c.want)
		}
	}
	if got := u.last("Service", "Type"); got != "notify" {
		t.Errorf("Type=%s, want notify: the daemon sends READY=1 once subnet.env is written", got)
	}
	if got := u.last("Service", "Restart"); got != "on-failure" {
		t.Errorf("Restart=%s, want on-failure", got)
	}
	execStart := u.raw("Service", "ExecStart")
	if len(execStart) != 1 {
		t.Fatalf("ExecStart=%q, want one command", execStart)
	}
	if argv := strings.Fields(execStart[0]); argv[0] != "/usr/local/bin/flanneld" || !slices.Contains(argv, "$FLANNELD_OPTS") {
		t.Errorf("ExecStart=%s, want /usr/local/bin/flanneld with $FLANNELD_OPTS as a separate word", execStart[0])
	}

	// The hardening must leave the daemon what it needs: root, the host
	// network, netlink, raw sockets and iptables, /dev/net/tun, the notify
	// socket and a writable /run/flannel (and /run/xtables.lock).
	if user := u.last("Service", "User"); user != "" && user != "root" {
		t.Errorf("User=%s: the daemon runs as root", user)
	}
	for _, key := range []string{"PrivateNetwork", "PrivateDevices", "PrivateUsers", "DynamicUser"} {
		if v := u.last("Service", key); v == "yes" || v == "true" {
			t.Errorf("%s=%s would cut the daemon off the host network or devices", key, v)
		}
	}
	for _, key := range []string{"IPAddressDeny", "SystemCallFilter", "NetworkNamespacePath", "RootDirectory", "RootImage"} {
		if v := u.raw("Service", key); len(v) != 0 {
			t.Errorf("%s=%q: not checked by this test to keep the daemon working; review and extend the test", key, v)
		}
	}
	if caps := u.list("Service", "CapabilityBoundingSet"); len(caps) != 0 {
		deny := strings.HasPrefix(caps[0], "~")
		for _, c := range []string{"CAP_NET_ADMIN", "CAP_NET_RAW"} {
			listed := slices.Contains(caps, c) || slices.Contains(caps, "~"+c)
			if listed == deny {
				t.Errorf("CapabilityBoundingSet=%q takes %s from the daemon", caps, c)
			}
		}
	}
	if fams := u.list("Service", "RestrictAddressFamilies"); len(fams) != 0 {
		if strings.HasPrefix(fams[0], "~") {
			t.Errorf("RestrictAddressFamilies=%q: use an allow list", fams)
		}
		for _, f := range []string{"AF_UNIX", "AF_INET", "AF_NETLINK"} {
			if !slices.Contains(fams, f) {
				t.Errorf("RestrictAddressFamilies=%q lacks %s", fams, f)
			}
		}
	}
	if p := u.last("Service", "DevicePolicy"); p == "closed" || p == "strict" {
		if !slices.ContainsFunc(u.raw("Service", "DeviceAllow"), func(v string) bool {
			f := strings.Fields(v)
			return len(f) == 2 && f[0] == "/dev/net/tun" && strings.Contains(f[1], "r") && strings.Contains(f[1], "w")
		}) {
			t.Errorf("DevicePolicy=%s without DeviceAllow=/dev/net/tun rw: the udp backend opens it", p)
		}
	}
	if na := u.last("Service", "NotifyAccess"); na != "" && na != "main" && na != "all" {
		t.Errorf("NotifyAccess=%s: the main process must be able to notify", na)
	}
	if ps := u.last("Service", "ProtectSystem"); ps == "strict" {
		rw := u.list("Service", "ReadWritePaths")
		for _, need := range []string{"/run/flannel/subnet.env", "/run/xtables.lock"} {
			if !slices.ContainsFunc(rw, func(p string) bool {
				p = strings.TrimPrefix(p, "-")
				return need == p || strings.HasPrefix(need, strings.TrimSuffix(p, "/")+"/")
			}) {
				t.Errorf("ProtectSystem=strict with ReadWritePaths=%q: %s is read-only", rw, need)
			}
		}
	}
}

// dockerOpts runs the drop-in's ExecStartPre (mk-docker-opts.sh with its
// arguments, the -f and -d files moved into dir) on subnetEnv and returns
// the variables it wrote, read the way systemd reads an EnvironmentFile.
func dockerOpts(t *testing.T, u unit, dir, subnetEnv string) map[string]string {
	t.Helper()
	pre := u.raw("Service", "ExecStartPre")
	if len(pre) != 1 {
		t.Fatalf("ExecStartPre=%q, want one command", pre)
	}
	argv := strings.Fields(pre[0])
	if argv[0] != "/usr/local/bin/mk-docker-opts.sh" {
		t.Fatalf("ExecStartPre runs %s, want /usr/local/bin/mk-docker-opts.sh", argv[0])
	}
	envFiles := u.raw("Service", "EnvironmentFile")
	if len(envFiles) != 1 {
		t.Fatalf("EnvironmentFile=%q, want one", envFiles)
	}
	in := filepath.Join(dir, "subnet.env")
	out := filepath.Join(dir, "docker_opts.env")
	writeFile(t, in, subnetEnv, 0o644)
	args := slices.Clone(argv[1:])
	for i := 0; i+1 < len(args); i++ {
		switch args[i] {
		case "-f":
			if args[i+1] != "/run/flannel/subnet.env" {
				t.Errorf("ExecStartPre reads %s, want flanneld's default subnet file /run/flannel/subnet.env", args[i+1])
			}
			args[i+1] = in
		case "-d":
			if want := strings.TrimPrefix(envFiles[0], "-"); args[i+1] != want {
				t.Errorf("ExecStartPre writes %s, but EnvironmentFile is %s", args[i+1], want)
			}
			args[i+1] = out
		}
	}
	if !slices.Contains(args, in) || !slices.Contains(args, out) {
		t.Fatalf("ExecStartPre=%s: give -f and -d explicitly", pre[0])
	}
	res := run(t, nil, append([]string{"./" + script}, args...)...)
	if res.code != 0 {
		t.Fatalf("ExecStartPre %q: exit %d: %s", args, res.code, res.stderr)
	}
	vars := map[string]string{}
	for _, line := range strings.Split(strings.TrimSuffix(readFile(t, out), "\n"), "\n") {
		k, v, ok := strings.Cut(line, "=")
		if !ok || len(v) < 2 || v[0] != '"' || v[len(v)-1] != '"' {
			t.Fatalf("output line %q is not KEY=\"VALUE\"", line)
		}
		vars[k] = v[1 : len(v)-1]
	}
	return vars
}

// expandExec expands a command line the way systemd does for $NAME and
// ${NAME} standing as words: split at blanks into zero or more arguments.
func expandExec(t *testing.T, cmdline string, env map[string]string) []string {
	t.Helper()
	word := regexp.MustCompile(`^\$(?:\{(\w+)\}|(\w+))$`)
	var argv []string
	for _, w := range strings.Fields(cmdline) {
		m := word.FindStringSubmatch(w)
		switch {
		case m != nil:
			argv = append(argv, strings.Fields(env[m[1]+m[2]])...)
		case strings.Contains(w, "$"):
			t.Fatalf("ExecStart word %q: use $NAME as a whole word", w)
		default:
			argv = append(argv, w)
		}
	}
	return argv
}

func TestDockerDropIn(t *testing.T) {
	u := parseUnit(t, dropInFile)
	for _, key := range []string{"After", "Requires"} {
		if got := u.list("Unit", key); !slices.Contains(got, "flanneld.service") {
			t.Errorf("[Unit] %s=%q, want it to include flanneld.service", key, got)
		}
	}
	execStart := u.raw("Service", "ExecStart")
	if len(execStart) != 2 || execStart[0] != "" || execStart[1] == "" {
		t.Fatalf("ExecStart=%q: want an empty ExecStart= that clears docker's, then one command", execStart)
	}

	for _, tt := range []struct {
		name       string
		ipmasq     string
		dockerOpts string // DOCKER_OPTS of /etc/default/docker
		want       []string
	}{
		{"flanneld does not masquerade", "false", "", []string{"--bip=10.1.74.1/24", "--ip-masq=true", "--mtu=1472"}},
		{"flanneld masquerades", "true", "", []string{"--bip=10.1.74.1/24", "--ip-masq=false", "--mtu=1472"}},
		{"administrator's DOCKER_OPTS kept", "false", "--debug  --log-level=warn", []string{"--debug", "--log-level=warn", "--bip=10.1.74.1/24", "--ip-masq=true", "--mtu=1472"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			vars := dockerOpts(t, u, t.TempDir(), sampleWithIPMasq(t, tt.ipmasq))
			if _, ok := vars["DOCKER_OPTS"]; ok {
				t.Errorf("the drop-in's options file sets DOCKER_OPTS, overriding the administrator's")
			}
			for k := range vars {
				if !slices.Contains(strings.Fields(execStart[1]), "$"+k) {
					t.Errorf("ExecStart does not pass $%s, which mk-docker-opts.sh wrote", k)
				}
			}
			env := map[string]string{"DOCKER_OPTS": tt.dockerOpts}
			for k, v := range vars {
				env[k] = v
			}
			want := append([]string{"dockerd", "-H", "fd://", "--containerd=/run/containerd/containerd.sock"}, tt.want...)
			if got := expandExec(t, execStart[1], env); !slices.Equal(got, want) {
				t.Errorf("dockerd runs with\n%q\nwant\n%q", got, want)
			}
		})
	}
}

// systemdUnitDir is the distribution's unit directory, which holds the
// targets the units refer to.
func systemdUnitDir() string {
	for _, d := range []string{"/usr/lib/systemd/system", "/lib/systemd/system"} {
		if _, err := os.Stat(filepath.Join(d, "multi-user.target")); err == nil {
			return d
		}
	}
	return ""
}

// Stand-ins for the docker packages' units: docker is not installed here.
// They are modelled on Debian's docker.io 20.10 units.
const (
	dockerService = `[Unit]
Description=Docker Application Container Engine (test stand-in)
After=network-online.target docker.socket containerd.service
Wants=network-online.target containerd.service
Requires=docker.socket

[Service]
Type=notify
EnvironmentFile=-/etc/default/docker
ExecStart=/usr/sbin/dockerd -H fd:// --containerd=/run/containerd/containerd.sock $DOCKER_OPTS
TimeoutStartSec=0
Delegate=yes
KillMode=process
Restart=on-failure

[Install]
WantedBy=multi-user.target
`
	dockerSocket = `[Unit]
Description=Docker Socket for the API (test stand-in)

[Socket]
ListenStream=/run/docker.sock
SocketMode=0660

[Install]
WantedBy=sockets.target
`
)

// TestSystemdVerify installs the unit, the drop-in, the daemon and the
// script into a directory tree laid out like a host (with the
// distribution's units and stand-ins for docker's) and runs
// systemd-analyze verify --root on it.
func TestSystemdVerify(t *testing.T) {
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze is not installed (Debian package systemd)")
	}
	unitDir := systemdUnitDir()
	if unitDir == "" {
		t.Skip("no systemd unit directory with multi-user.target on this host")
	}
	daemon := lab.BuildDaemon(t)

	root := t.TempDir()
	sys := filepath.Join(root, "usr/lib/systemd/system")
	if err := os.MkdirAll(filepath.Dir(sys), 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cp", "-a", unitDir, sys).CombinedOutput(); err != nil {
		t.Fatalf("copying %s: %v: %s", unitDir, err, out)
	}
	etc := filepath.Join(root, "etc/systemd/system")
	flanneld := filepath.Join(root, "usr/local/bin/flanneld")
	dropIn := filepath.Join(etc, "docker.service.d/flannel.conf")
	copyFile(t, daemon, flanneld, 0o755)
	copyFile(t, script, filepath.Join(root, "usr/local/bin/mk-docker-opts.sh"), 0o755)
	copyFile(t, unitFile, filepath.Join(etc, "flanneld.service"), 0o644)
	copyFile(t, dropInFile, dropIn, 0o644)
	writeFile(t, filepath.Join(sys, "docker.service"), dockerService, 0o644)
	writeFile(t, filepath.Join(sys, "docker.socket"), dockerSocket, 0o644)
	writeFile(t, filepath.Join(root, "usr/sbin/dockerd"), "#!/bin/sh\n# stand-in: verify only checks that it is executable\nexit 1\n", 0o755)

	verify := func() result {
		return run(t, nil, sa, "verify", "--root="+root, "flanneld.service", "docker.service")
	}
	if res := verify(); res.code != 0 || res.stdout != "" || res.stderr != "" {
		t.Fatalf("systemd-analyze verify: exit %d, want 0 and no warnings:\n%s%s", res.code, res.stdout, res.stderr)
	}

	// The same check finds the mistakes it is here for.
	t.Run("detects a missing ExecStart binary", func(t *testing.T) {
		if err := os.Rename(flanneld, flanneld+".away"); err != nil {
			t.Fatal(err)
		}
		defer os.Rename(flanneld+".away", flanneld)
		if res := verify(); res.code == 0 || !strings.Contains(res.stderr, "/usr/local/bin/flanneld") {
			t.Errorf("verify without the daemon: exit %d, stderr %q; want a failure naming it", res.code, res.stderr)
		}
	})
	t.Run("detects a drop-in that does not clear ExecStart", func(t *testing.T) {
		orig := readFile(t, dropIn)
		defer writeFile(t, dropIn, orig, 0o644)
		broken := strings.Replace(orig, "\nExecStart=\n", "\n", 1)
		if broken == orig {
			t.Fatalf("%s has no empty ExecStart= line", dropInFile)
		}
		writeFile(t, dropIn, broken, 0o644)
		if res := verify(); res.code == 0 || !strings.Contains(res.stderr, "more than one ExecStart") {
			t.Errorf("verify with two ExecStart: exit %d, stderr %q; want a failure", res.code, res.stderr)
		}
	})
	t.Run("exposure", func(t *testing.T) {
		// Scored offline from the unit file; fails if hardening is removed.
		res := run(t, nil, sa, "security", "--offline=true", "--root="+root, "--threshold=50", "flanneld.service")
		if strings.Contains(res.stderr, "unrecognized option") {
			t.Skipf("this systemd-analyze cannot score units offline: %s", strings.TrimSpace(res.stderr))
		}
		if res.code != 0 {
			t.Errorf("systemd-analyze security: exit %d, want exposure at most 5.0 (threshold 50):\n%s%s", res.code, lastLines(res.stdout, 3), res.stderr)
		}

		// Without the hardening block the same check fails.
		unitPath := filepath.Join(etc, "flanneld.service")
		orig := readFile(t, unitPath)
		defer writeFile(t, unitPath, orig, 0o644)
		start, end := strings.Index(orig, "\n# Hardening"), strings.Index(orig, "\n[Install]")
		if start < 0 || end < start {
			t.Fatalf("%s has no hardening block before [Install]", unitFile)
		}
		writeFile(t, unitPath, orig[:start]+orig[end:], 0o644)
		if res := run(t, nil, sa, "security", "--offline=true", "--root="+root, "--threshold=50", "flanneld.service"); res.code == 0 {
			t.Errorf("systemd-analyze security passes the unit without hardening too:\n%s", lastLines(res.stdout, 1))
		}
	})
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n") + "\n"
}

// TestDefaultFile checks that /etc/default/flanneld documents every flag of
// the daemon, only flags it has, and values it accepts.
func TestDefaultFile(t *testing.T) {
	examples := map[string]string{}
	assign := regexp.MustCompile(`^#(FLANNELD_[A-Z0-9_]+)=(.*)$`)
	for i, line := range strings.Split(readFile(t, defaultFile), "\n") {
		if strings.HasPrefix(line, "FLANNELD_") {
			t.Errorf("%s:%d: %q is set; leave every example commented out", defaultFile, i+1, line)
		}
		m := assign.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		v := m[2]
		if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
			v = v[1 : len(v)-1]
		}
		if strings.ContainsAny(v, `\$'"`) {
			t.Errorf("%s:%d: %q: keep examples free of quotes, backslashes and $ that systemd would interpret", defaultFile, i+1, line)
		}
		examples[m[1]] = v
	}

	daemon := lab.BuildDaemon(t)
	env := envWithout("FLANNELD_")
	res := run(t, env, daemon, "--help")
	if res.code != 0 {
		t.Fatalf("flanneld --help: exit %d: %s", res.code, res.stderr)
	}
	flags := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^\s+(?:-\w, )?--([\w-]+)`).FindAllStringSubmatch(res.stderr+res.stdout, -1) {
		flags[m[1]] = true
	}
	klogFlags := goflag.NewFlagSet("klog", goflag.ContinueOnError)
	klog.InitFlags(klogFlags)
	if !flags["etcd-endpoints"] || !flags["v"] {
		t.Fatalf("cannot find the flags in flanneld --help:\n%s", res.stderr)
	}
	varName := func(flag string) string { return "FLANNELD_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_")) }
	known := map[string]bool{"FLANNELD_OPTS": true}
	for f := range flags {
		known[varName(f)] = true
		// --version, --help and --check are one-shot commands, not settings
		// of the service.
		if f == "version" || f == "help" || f == "check" || klogFlags.Lookup(f) != nil {
			continue
		}
		if _, ok := examples[varName(f)]; !ok {
			t.Errorf("%s has no example for --%s (%s)", defaultFile, f, varName(f))
		}
	}
	for name := range examples {
		if !known[name] {
			t.Errorf("%s sets %s, but flanneld has no such flag", defaultFile, name)
		}
	}

	// With every example uncommented the daemon accepts its flags
	// (--version exits after parsing and checking them).
	var args []string
	for name, v := range examples {
		if name == "FLANNELD_OPTS" {
			args = strings.Fields(v)
			continue
		}
		env = append(env, name+"="+v)
	}
	res = run(t, env, append([]string{daemon}, append(args, "--version")...)...)
	if res.code != 0 || res.stderr != "" {
		t.Errorf("flanneld with the examples of %s: exit %d, stderr %q; want them accepted", defaultFile, res.code, res.stderr)
	}
	// ... and it does read them: a bad value is refused.
	res = run(t, append(env, "FLANNELD_SUBNET_LEASE_RENEW_MARGIN=0"), daemon, "--version")
	if res.code == 0 || !strings.Contains(res.stderr, "renew-margin") {
		t.Errorf("flanneld with FLANNELD_SUBNET_LEASE_RENEW_MARGIN=0: exit %d, stderr %q; want it refused", res.code, res.stderr)
	}
}
