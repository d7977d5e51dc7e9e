package dist

import (
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/flanneld-go/flanneld/subnet"
)

const (
	script     = "mk-docker-opts.sh"
	sampleFile = "sample_subnet.env"
)

// The lines mk-docker-opts.sh writes for sample_subnet.env, in flannel's
// format.
const (
	bip     = `DOCKER_OPT_BIP="--bip=10.1.74.1/24"` + "\n"
	masqOn  = `DOCKER_OPT_IPMASQ="--ip-masq=true"` + "\n"  // flanneld does not masquerade
	masqOff = `DOCKER_OPT_IPMASQ="--ip-masq=false"` + "\n" // flanneld masquerades
	mtu     = `DOCKER_OPT_MTU="--mtu=1472"` + "\n"
)

// scriptShells are the ways the script is run: through its #! line, then
// with every other POSIX shell installed here.
func scriptShells(t *testing.T) map[string][]string {
	t.Helper()
	path, err := filepath.Abs(script)
	if err != nil {
		t.Fatal(err)
	}
	shells := map[string][]string{"exec": {path}}
	binSh, _ := filepath.EvalSymlinks("/bin/sh")
	for _, sh := range [][]string{{"dash"}, {"bash"}, {"busybox", "sh"}, {"mksh"}, {"posh"}} {
		bin, err := exec.LookPath(sh[0])
		if err != nil {
			continue
		}
		if real, _ := filepath.EvalSymlinks(bin); real == binSh && len(sh) == 1 {
			continue // the #! line runs this one
		}
		shells[strings.Join(sh, "-")] = append(append([]string{bin}, sh[1:]...), path)
	}
	return shells
}

// sampleWithIPMasq returns the sample subnet file with FLANNEL_IPMASQ set to
// v, or without the line if v is "".
func sampleWithIPMasq(t *testing.T, v string) string {
	t.Helper()
	sample := readFile(t, sampleFile)
	const line = "FLANNEL_IPMASQ=false\n"
	if !strings.Contains(sample, line) {
		t.Fatalf("%s has no line %q", sampleFile, line)
	}
	if v == "" {
		return strings.Replace(sample, line, "", 1)
	}
	return strings.Replace(sample, line, "FLANNEL_IPMASQ="+v+"\n", 1)
}

// TestSampleSubnetEnv checks that the sample is exactly what the daemon
// writes for its content.
func TestSampleSubnetEnv(t *testing.T) {
	data := readFile(t, sampleFile)
	env, err := subnet.ParseEnv([]byte(data))
	if err != nil {
		t.Fatalf("the daemon cannot read %s: %v", sampleFile, err)
	}
	if got := string(env.Marshal()); got != data {
		t.Errorf("%s differs from what the daemon writes for it:\n%s\nwant:\n%s", sampleFile, data, got)
	}
}

func TestMkDockerOptsOutput(t *testing.T) {
	const k = "DOCKER_NETWORK_OPTIONS"
	tests := []struct {
		args   []string
		ipmasq string // FLANNEL_IPMASQ in the subnet file; "" leaves it out
		want   string
	}{
		{nil, "false", bip + masqOn + mtu + `DOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"` + "\n"},
		{[]string{"-i"}, "false", bip + masqOn + mtu},
		{[]string{"-c"}, "false", `DOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"` + "\n"},
		{[]string{"-m"}, "false", bip + mtu + `DOCKER_OPTS=" --bip=10.1.74.1/24 --mtu=1472"` + "\n"},
		{[]string{"-k", k}, "false", bip + masqOn + mtu + k + `=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"` + "\n"},
		{[]string{"-i", "-c"}, "false", bip + masqOn + mtu + `DOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"` + "\n"},
		{[]string{"-i", "-m"}, "false", bip + mtu},
		{[]string{"-i", "-k", k}, "false", bip + masqOn + mtu},
		{[]string{"-c", "-m"}, "false", `DOCKER_OPTS=" --bip=10.1.74.1/24 --mtu=1472"` + "\n"},
		{[]string{"-c", "-k", k}, "false", k + `=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"` + "\n"},
		{[]string{"-m", "-k", k}, "false", bip + mtu + k + `=" --bip=10.1.74.1/24 --mtu=1472"` + "\n"},
		{[]string{"-i", "-c", "-m"}, "false", bip + mtu + `DOCKER_OPTS=" --bip=10.1.74.1/24 --mtu=1472"` + "\n"},
		{[]string{"-i", "-c", "-k", k}, "false", bip + masqOn + mtu + k + `=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"` + "\n"},
		{[]string{"-i", "-m", "-k", k}, "false", bip + mtu},
		{[]string{"-c", "-m", "-k", k}, "false", k + `=" --bip=10.1.74.1/24 --mtu=1472"` + "\n"},
		{[]string{"-i", "-c", "-m", "-k", k}, "false", bip + mtu + k + `=" --bip=10.1.74.1/24 --mtu=1472"` + "\n"},

		{nil, "true", bip + masqOff + mtu + `DOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=false --mtu=1472"` + "\n"},
		{[]string{"-i"}, "true", bip + masqOff + mtu},
		{[]string{"-c"}, "true", `DOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=false --mtu=1472"` + "\n"},
		{[]string{"-m"}, "true", bip + mtu + `DOCKER_OPTS=" --bip=10.1.74.1/24 --mtu=1472"` + "\n"},
		{[]string{"-k", k}, "true", bip + masqOff + mtu + k + `=" --bip=10.1.74.1/24 --ip-masq=false --mtu=1472"` + "\n"},
		{[]string{"-i", "-c"}, "true", bip + masqOff + mtu + `DOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=false --mtu=1472"` + "\n"},
		{[]string{"-i", "-m"}, "true", bip + mtu},
		{[]string{"-i", "-k", k}, "true", bip + masqOff + mtu},
		{[]string{"-c", "-m"}, "true", `DOCKER_OPTS=" --bip=10.1.74.1/24 --mtu=1472"` + "\n"},
		{[]string{"-c", "-k", k}, "true", k + `=" --bip=10.1.74.1/24 --ip-masq=false --mtu=1472"` + "\n"},
		{[]string{"-m", "-k", k}, "true", bip + mtu + k + `=" --bip=10.1.74.1/24 --mtu=1472"` + "\n"},
		{[]string{"-i", "-c", "-m"}, "true", bip + mtu + `DOCKER_OPTS=" --bip=10.1.74.1/24 --mtu=1472"` + "\n"},
		{[]string{"-i", "-c", "-k", k}, "true", bip + masqOff + mtu + k + `=" --bip=10.1.74.1/24 --ip-masq=false --mtu=1472"` + "\n"},
		{[]string{"-i", "-m", "-k", k}, "true", bip + mtu},
		{[]string{"-c", "-m", "-k", k}, "true", k + `=" --bip=10.1.74.1/24 --mtu=1472"` + "\n"},
		{[]string{"-i", "-c", "-m", "-k", k}, "true", bip + mtu + k + `=" --bip=10.1.74.1/24 --mtu=1472"` + "\n"},

		// Without FLANNEL_IPMASQ (older flannel) there is no --ip-masq.
		{nil, "", bip + mtu + `DOCKER_OPTS=" --bip=10.1.74.1/24 --mtu=1472"` + "\n"},
		{[]string{"-i"}, "", bip + mtu},
		// Flags in another order, and given twice, mean the same.
		{[]string{"-k", k, "-m", "-c", "-i"}, "true", bip + mtu + k + `=" --bip=10.1.74.1/24 --mtu=1472"` + "\n"},
		{[]string{"-k", "X", "-c", "-k", k, "-c"}, "false", k + `=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"` + "\n"},
	}
	// Values already in the environment are not carried into the output.
	env := append(os.Environ(), "DOCKER_OPTS=--stale", "DOCKER_NETWORK_OPTIONS=--stale", "DOCKER_OPT_STALE=--stale",
		"FLANNEL_SUBNET=10.9.9.1/24", "FLANNEL_MTU=9000", "FLANNEL_IPMASQ=true")
	for shell, argv := range scriptShells(t) {
		for _, tt := range tests {
			name := shell + "/ipmasq=" + tt.ipmasq + "/" + strings.Join(tt.args, "_")
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				dir := t.TempDir()
				in := filepath.Join(dir, "subnet.env")
				writeFile(t, in, sampleWithIPMasq(t, tt.ipmasq), 0o644)
				outDir := filepath.Join(dir, "out")
				out := filepath.Join(outDir, "docker_opts.env")
				// A previous output is replaced, not appended to.
				writeFile(t, out, "STALE=1\n", 0o600)

				args := append(slices.Clone(argv), "-f", in, "-d", out)
				res := run(t, env, append(args, tt.args...)...)
				if res.code != 0 || res.stdout != "" || res.stderr != "" {
					t.Fatalf("%q: exit %d, stdout %q, stderr %q; want exit 0 and no output", tt.args, res.code, res.stdout, res.stderr)
				}
				if got := readFile(t, out); got != tt.want {
					t.Errorf("%q wrote:\n%s\nwant:\n%s", tt.args, got, tt.want)
				}
				fi, err := os.Stat(out)
				if err != nil {
					t.Fatal(err)
				}
				if fi.Mode().Perm() != 0o644 {
					t.Errorf("output mode %v, want 0644", fi.Mode().Perm())
				}
				if names := listDir(t, outDir); !slices.Equal(names, []string{"docker_opts.env"}) {
					t.Errorf("output directory holds %q, want only docker_opts.env (no temporary file left)", names)
				}
			})
		}
	}
}

// TestMkDockerOptsDefaults runs the script without -f and -d in a private
// mount namespace whose /run is a fresh tmpfs.
func TestMkDockerOptsDefaults(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: mounts a private /run in a new mount namespace to test the default paths")
	}
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Skip("needs unshare (util-linux) to test the default paths in a private mount namespace")
	}
	path, err := filepath.Abs(script)
	if err != nil {
		t.Fatal(err)
	}
	sample, err := filepath.Abs(sampleFile)
	if err != nil {
		t.Fatal(err)
	}
	const sh = `set -e
mount -t tmpfs tmpfs /run
mkdir /run/flannel
cp "$2" /run/flannel/subnet.env
"$1" "$3"
cat /run/docker_opts.env`
	for _, tt := range []struct{ flag, want string }{
		{"-i", bip + masqOn + mtu},
		{"-c", `DOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"` + "\n"},
	} {
		res := run(t, nil, unshare, "--mount", "--propagation", "private", "sh", "-c", sh, "sh", path, sample, tt.flag)
		if res.code != 0 || res.stderr != "" {
			t.Fatalf("%s with the default paths: exit %d, stderr %q", tt.flag, res.code, res.stderr)
		}
		if res.stdout != tt.want {
			t.Errorf("%s with the default paths wrote /run/docker_opts.env:\n%s\nwant:\n%s", tt.flag, res.stdout, tt.want)
		}
	}
}

func TestMkDockerOptsBadSubnetFile(t *testing.T) {
	sample := readFile(t, sampleFile)
	replace := func(old, new string) string {
		t.Helper()
		if !strings.Contains(sample, old) {
			t.Fatalf("%s has no %q", sampleFile, old)
		}
		return strings.Replace(sample, old, new, 1)
	}
	const (
		subnetLine = "FLANNEL_SUBNET=10.1.74.1/24\n"
		mtuLine    = "FLANNEL_MTU=1472\n"
	)
	tests := []struct {
		name    string
		content string // "-" means no file at all
		want    []string
	}{
		{"missing file", "-", []string{"does not exist", "-f"}},
		{"empty file", "", []string{"has no FLANNEL_SUBNET"}},
		{"no subnet", replace(subnetLine, ""), []string{"has no FLANNEL_SUBNET"}},
		{"no mtu", replace(mtuLine, ""), []string{"has no FLANNEL_MTU"}},
		{"subnet without prefix", replace(subnetLine, "FLANNEL_SUBNET=10.1.74.1\n"), []string{":2:", `FLANNEL_SUBNET "10.1.74.1"`}},
		{"subnet octet too big", replace(subnetLine, "FLANNEL_SUBNET=10.1.274.1/24\n"), []string{"FLANNEL_SUBNET"}},
		{"subnet three octets", replace(subnetLine, "FLANNEL_SUBNET=10.1.74/24\n"), []string{"FLANNEL_SUBNET"}},
		{"subnet five octets", replace(subnetLine, "FLANNEL_SUBNET=10.1.74.1.1/24\n"), []string{"FLANNEL_SUBNET"}},
		{"subnet leading zero", replace(subnetLine, "FLANNEL_SUBNET=10.01.74.1/24\n"), []string{"FLANNEL_SUBNET"}},
		{"subnet prefix 31", replace(subnetLine, "FLANNEL_SUBNET=10.1.74.1/31\n"), []string{"FLANNEL_SUBNET"}},
		{"subnet empty", replace(subnetLine, "FLANNEL_SUBNET=\n"), []string{"FLANNEL_SUBNET"}},
		{"subnet ipv6", replace(subnetLine, "FLANNEL_SUBNET=fd00::1/64\n"), []string{"FLANNEL_SUBNET"}},
		{"subnet with extra words", replace(subnetLine, "FLANNEL_SUBNET=10.1.74.1/24 --foo\n"), []string{"FLANNEL_SUBNET"}},
		{"mtu not a number", replace(mtuLine, "FLANNEL_MTU=abc\n"), []string{"FLANNEL_MTU \"abc\""}},
		{"mtu zero", replace(mtuLine, "FLANNEL_MTU=0\n"), []string{"FLANNEL_MTU"}},
		{"mtu too small", replace(mtuLine, "FLANNEL_MTU=67\n"), []string{"FLANNEL_MTU"}},
		{"mtu too big", replace(mtuLine, "FLANNEL_MTU=65536\n"), []string{"FLANNEL_MTU"}},
		{"mtu huge", replace(mtuLine, "FLANNEL_MTU=99999999999999999999\n"), []string{"FLANNEL_MTU"}},
		{"mtu negative", replace(mtuLine, "FLANNEL_MTU=-1\n"), []string{"FLANNEL_MTU"}},
		{"mtu leading zero", replace(mtuLine, "FLANNEL_MTU=01472\n"), []string{"FLANNEL_MTU"}},
		{"mtu empty", replace(mtuLine, "FLANNEL_MTU=\n"), []string{"FLANNEL_MTU"}},
		{"ipmasq yes", replace("FLANNEL_IPMASQ=false", "FLANNEL_IPMASQ=yes"), []string{"FLANNEL_IPMASQ \"yes\""}},
		{"ipmasq upper case", replace("FLANNEL_IPMASQ=false", "FLANNEL_IPMASQ=TRUE"), []string{"FLANNEL_IPMASQ"}},
		{"network without prefix", replace("FLANNEL_NETWORK=10.1.0.0/16", "FLANNEL_NETWORK=10.1.0.0"), []string{":1:", "FLANNEL_NETWORK"}},
		{"line without =", sample + "garbage\n", []string{":5:", "expected KEY=VALUE"}},
		{"key with a blank", "export " + sample, []string{":1:", "not a variable name"}},
		{"key with a dash", sample + "FLANNEL-X=1\n", []string{":5:", "not a variable name"}},
		{"key starting with a digit", sample + "1X=1\n", []string{":5:", "expected KEY=VALUE"}},
		{"command line", sample + "touch MARKER\n", []string{":5:"}},
		{"command substitution", replace(mtuLine, "FLANNEL_MTU=$(touch MARKER)\n"), []string{"FLANNEL_MTU"}},
		{"backquotes", replace(subnetLine, "FLANNEL_SUBNET=`touch MARKER`\n"), []string{"FLANNEL_SUBNET"}},
		{"directory", "/", []string{"not a readable file"}},
	}
	for shell, argv := range scriptShells(t) {
		for _, tt := range tests {
			t.Run(shell+"/"+tt.name, func(t *testing.T) {
				t.Parallel()
				dir := t.TempDir()
				in := filepath.Join(dir, "subnet.env")
				switch tt.content {
				case "-":
				case "/":
					if err := os.Mkdir(in, 0o755); err != nil {
						t.Fatal(err)
					}
				default:
					writeFile(t, in, tt.content, 0o644)
				}
				outDir := filepath.Join(dir, "out")
				if err := os.Mkdir(outDir, 0o755); err != nil {
					t.Fatal(err)
				}
				out := filepath.Join(outDir, "docker_opts.env")
				cmd := append(slices.Clone(argv), "-f", in, "-d", out)
				// Run in dir: a sourced file would create dir/MARKER.
				res := runDir(t, dir, nil, cmd...)
				checkOneLineError(t, res, 1, append([]string{in}, tt.want...))
				if names := listDir(t, outDir); len(names) != 0 {
					t.Errorf("output directory holds %q after a failure, want nothing", names)
				}
				if _, err := os.Stat(filepath.Join(dir, "MARKER")); err == nil {
					t.Errorf("the subnet file was executed: MARKER exists")
				}

				// A previous output stays as it was.
				writeFile(t, out, "PREVIOUS=1\n", 0o644)
				res = runDir(t, dir, nil, cmd...)
				checkOneLineError(t, res, 1, tt.want)
				if got := readFile(t, out); got != "PREVIOUS=1\n" {
					t.Errorf("a failed run changed the previous output to %q", got)
				}
				if names := listDir(t, outDir); len(names) != 1 {
					t.Errorf("output directory holds %q after a failure, want only the previous output", names)
				}
			})
		}
	}
}

func TestMkDockerOptsUsage(t *testing.T) {
	dir := t.TempDir()
	in := filepath.Join(dir, "subnet.env")
	copyFile(t, sampleFile, in, 0o644)
	out := filepath.Join(dir, "docker_opts.env")
	tests := []struct {
		name string
		args []string
		code int
		want []string
	}{
		{"unknown option", []string{"-x"}, 2, []string{"unknown option -x", "-h"}},
		{"-f without a file", []string{"-d", out, "-f"}, 2, []string{"option -f needs an argument"}},
		{"-k without a key", []string{"-f", in, "-d", out, "-k"}, 2, []string{"option -k needs an argument"}},
		{"argument", []string{"-f", in, "-d", out, "extra"}, 2, []string{`unexpected argument "extra"`}},
		{"key with a dash", []string{"-f", in, "-d", out, "-k", "DOCKER-OPTS"}, 2, []string{`-k "DOCKER-OPTS" is not a valid variable name`}},
		{"key starting with a digit", []string{"-f", in, "-d", out, "-k", "1OPTS"}, 2, []string{`-k "1OPTS"`}},
		{"empty key", []string{"-f", in, "-d", out, "-k", ""}, 2, []string{`-k ""`}},
		{"key with a quote", []string{"-f", in, "-d", out, "-k", `A"`}, 2, []string{`-k "A""`}},
		{"empty -f", []string{"-f", "", "-d", out}, 2, []string{"-f needs a file name"}},
		{"empty -d", []string{"-f", in, "-d", ""}, 2, []string{"-d needs a file name"}},
		{"output directory missing", []string{"-f", in, "-d", filepath.Join(dir, "nope", "x.env")}, 1, []string{"directory " + filepath.Join(dir, "nope") + " for the output file does not exist"}},
		{"output is a directory", []string{"-f", in, "-d", dir}, 1, []string{"output " + dir + " is a directory"}},
	}
	for shell, argv := range scriptShells(t) {
		for _, tt := range tests {
			t.Run(shell+"/"+tt.name, func(t *testing.T) {
				res := run(t, nil, append(slices.Clone(argv), tt.args...)...)
				checkOneLineError(t, res, tt.code, tt.want)
				if _, err := os.Stat(out); err == nil {
					t.Errorf("%q wrote %s", tt.args, out)
				}
			})
		}
		t.Run(shell+"/help", func(t *testing.T) {
			res := run(t, nil, append(slices.Clone(argv), "-h")...)
			if res.code != 0 || res.stderr != "" {
				t.Fatalf("-h: exit %d, stderr %q; want 0 and none", res.code, res.stderr)
			}
			for _, opt := range []string{"-f FILE", "-d FILE", "-i", "-c", "-k KEY", "-m", "-h", "/run/flannel/subnet.env", "/run/docker_opts.env", "DOCKER_OPTS"} {
				if !strings.Contains(res.stdout, opt) {
					t.Errorf("-h does not mention %q:\n%s", opt, res.stdout)
				}
			}
		})
	}
}

// TestMkDockerOptsShellcheck lints the script as POSIX sh.
func TestMkDockerOptsShellcheck(t *testing.T) {
	sc, err := exec.LookPath("shellcheck")
	if err != nil {
		t.Skip("shellcheck is not installed (apt-get install shellcheck)")
	}
	if res := run(t, nil, sc, "--shell=sh", "--severity=style", script); res.code != 0 {
		t.Errorf("shellcheck %s: exit %d\n%s%s", script, res.code, res.stdout, res.stderr)
	}
}

// TestMkDockerOptsExecutable checks the mode the image and the install
// instructions rely on.
func TestMkDockerOptsExecutable(t *testing.T) {
	fi, err := os.Stat(script)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm()&0o111 != 0o111 {
		t.Errorf("%s has mode %v, want it executable by all", script, fi.Mode().Perm())
	}
	if first, _, _ := strings.Cut(readFile(t, script), "\n"); first != "#!/bin/sh" {
		t.Errorf("%s starts with %q, want #!/bin/sh", script, first)
	}
}

// checkOneLineError checks a failed run: the exit code, nothing on stdout,
// one line on stderr naming the script and containing each of want.
func checkOneLineError(t *testing.T, res result, code int, want []string) {
	t.Helper()
	if res.code != code {
		t.Errorf("exit code %d, want %d (stderr %q)", res.code, code, res.stderr)
	}
	if res.stdout != "" {
		t.Errorf("stdout %q, want nothing", res.stdout)
	}
	if strings.Count(res.stderr, "\n") != 1 || !strings.HasSuffix(res.stderr, "\n") {
		t.Errorf("stderr %q, want exactly one line", res.stderr)
	}
	if !strings.HasPrefix(res.stderr, script+": ") {
		t.Errorf("stderr %q does not start with %q", res.stderr, script+": ")
	}
	for _, w := range want {
		if !strings.Contains(res.stderr, w) {
			t.Errorf("stderr %q does not contain %q", res.stderr, w)
		}
	}
}

// TestMkDockerOptsDualStack: a dual-stack subnet.env as the daemon writes
// it (FLANNEL_IPV6_NETWORK and FLANNEL_IPV6_SUBNET added) gives docker the
// same options as the IPv4 lines alone, as flannel's script does.
func TestMkDockerOptsDualStack(t *testing.T) {
	e := subnet.Env{Network: netip.MustParsePrefix("10.1.0.0/16"), Subnet: netip.MustParsePrefix("10.1.74.0/24"), MTU: 1472, IPMasq: true}
	for shell, argv := range scriptShells(t) {
		t.Run(shell, func(t *testing.T) {
			var outs []string
			for _, v6 := range []bool{false, true} {
				if v6 {
					e.IPv6Network, e.IPv6Subnet = netip.MustParsePrefix("fc00::/48"), netip.MustParsePrefix("fc00:0:0:4a::/64")
				}
				dir := t.TempDir()
				in, out := filepath.Join(dir, "subnet.env"), filepath.Join(dir, "docker_opts.env")
				if err := subnet.WriteEnv(in, e); err != nil {
					t.Fatal(err)
				}
				if v6 && !strings.Contains(readFile(t, in), "FLANNEL_IPV6_SUBNET=fc00:0:0:4a::1/64\n") {
					t.Fatalf("subnet.env lacks the IPv6 subnet:\n%s", readFile(t, in))
				}
				res := run(t, os.Environ(), append(slices.Clone(argv), "-f", in, "-d", out)...)
				if res.code != 0 || res.stderr != "" {
					t.Fatalf("exit %d, stderr %q", res.code, res.stderr)
				}
				outs = append(outs, readFile(t, out))
			}
			if outs[0] != outs[1] || !strings.Contains(outs[1], "--bip=10.1.74.1/24") {
				t.Errorf("IPv4 only:\n%s\ndual stack:\n%s", outs[0], outs[1])
			}
		})
	}
}
