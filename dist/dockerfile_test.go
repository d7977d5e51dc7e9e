package dist

import (
	"bytes"
	"debug/elf"
	"encoding/json"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// instruction is one Dockerfile instruction with its continuation lines
// joined.
type instruction struct {
	line int    // first line
	cmd  string // upper case: FROM, RUN, ...
	args string
}

// stage is one FROM and the instructions after it.
type stage struct {
	name, image string
	flags       []string // --platform=... of FROM
	body        []instruction
}

// parseDockerfile splits a Dockerfile into instructions: comments and blank
// lines are skipped (also inside continued lines, as Docker does) and a
// trailing backslash continues the line.
func parseDockerfile(t *testing.T, text string) []instruction {
	t.Helper()
	var out []instruction
	var cur *instruction
	for i, line := range strings.Split(text, "\n") {
		trimmed := strings.TrimSpace(line)
		if trimmed == "" || strings.HasPrefix(trimmed, "#") {
			continue
		}
		cont := strings.HasSuffix(trimmed, `\`)
		trimmed = strings.TrimSpace(strings.TrimSuffix(trimmed, `\`))
		if cur == nil {
			cmd, args, _ := strings.Cut(trimmed, " ")
			cur = &instruction{line: i + 1, cmd: strings.ToUpper(cmd), args: strings.TrimSpace(args)}
		} else {
			cur.args += " " + trimmed
		}
		if !cont {
			out = append(out, *cur)
			cur = nil
		}
	}
	if cur != nil {
		t.Fatalf("Dockerfile:%d: the last instruction ends with a backslash", cur.line)
	}
	return out
}

// shellWords splits a command line at blanks, honouring single and double
// quotes (no other shell syntax).
func shellWords(t *testing.T, s string) []string {
	t.Helper()
	var words []string
	var w strings.Builder
	inWord := false
	var quote rune
	for _, r := range s {
		switch {
		case quote != 0 && r == quote:
			quote = 0
		case quote != 0:
			w.WriteRune(r)
		case r == '"' || r == '\'':
			quote, inWord = r, true
		case r == ' ' || r == '\t':
			if inWord {
				words = append(words, w.String())
				w.Reset()
				inWord = false
			}
		default:
			w.WriteRune(r)
			inWord = true
		}
	}
	if quote != 0 {
		t.Fatalf("unterminated quote in %q", s)
	}
	if inWord {
		words = append(words, w.String())
	}
	return words
}

// expandArgs substitutes ${NAME} and $NAME from args; unknown names expand
// to "" as in Docker.
func expandArgs(s string, args map[string]string) string {
	return os.Expand(s, func(k string) string { return args[k] })
}

// dockerfile is the parsed Dockerfile: global ARG defaults and the stages.
type dockerfile struct {
	globals map[string]string
	stages  []stage
}

func loadDockerfile(t *testing.T) dockerfile {
	t.Helper()
	df := dockerfile{globals: map[string]string{}}
	for _, in := range parseDockerfile(t, readFile(t, filepath.Join(repoRoot(t), "Dockerfile"))) {
		switch {
		case in.cmd == "FROM":
			f := strings.Fields(in.args)
			var st stage
			for len(f) > 0 && strings.HasPrefix(f[0], "--") {
				st.flags, f = append(st.flags, f[0]), f[1:]
			}
			switch {
			case len(f) == 1:
			case len(f) == 3 && strings.EqualFold(f[1], "AS"):
				st.name = f[2]
			default:
				t.Fatalf("Dockerfile:%d: FROM %s: want FROM [--flags] IMAGE [AS NAME]", in.line, in.args)
			}
			st.image = expandArgs(f[0], df.globals)
			df.stages = append(df.stages, st)
		case len(df.stages) == 0:
			if in.cmd != "ARG" {
				t.Fatalf("Dockerfile:%d: %s before the first FROM", in.line, in.cmd)
			}
			k, v, _ := strings.Cut(in.args, "=")
			df.globals[k] = v
		default:
			last := &df.stages[len(df.stages)-1]
			last.body = append(last.body, in)
		}
	}
	return df
}

// find returns the instructions cmd of a stage.
func (s stage) find(cmd string) []instruction {
	var out []instruction
	for _, in := range s.body {
		if in.cmd == cmd {
			out = append(out, in)
		}
	}
	return out
}

// goDirective returns the go line of go.mod, e.g. "1.26.8".
func goDirective(t *testing.T) string {
	t.Helper()
	m := regexp.MustCompile(`(?m)^go (\S+)$`).FindStringSubmatch(readFile(t, filepath.Join(repoRoot(t), "go.mod")))
	if m == nil {
		t.Fatal("go.mod has no go line")
	}
	return m[1]
}

// versionLess compares dotted version numbers.
func versionLess(a, b string) bool {
	as, bs := strings.Split(a, "."), strings.Split(b, ".")
	for i := 0; i < max(len(as), len(bs)); i++ {
		var x, y int
		if i < len(as) {
			x, _ = strconv.Atoi(as[i])
		}
		if i < len(bs) {
			y, _ = strconv.Atoi(bs[i])
		}
		if x != y {
			return x < y
		}
	}
	return false
}

// goBuild is the parsed go build command of the builder stage.
type goBuild struct {
	env     []string // VAR=value before go
	args    []string // after "go build"
	output  string   // -o
	pkg     string   // the last argument
	ldflags string
}

// parseGoBuild parses a RUN [VAR=value ...] go build ...; args nil leaves
// $NAME unexpanded.
func parseGoBuild(t *testing.T, run instruction, args map[string]string) goBuild {
	t.Helper()
	var b goBuild
	text := run.args
	if args != nil {
		text = expandArgs(text, args)
	}
	words := shellWords(t, text)
	for len(words) > 0 && strings.Contains(words[0], "=") {
		b.env, words = append(b.env, words[0]), words[1:]
	}
	if len(words) < 3 || words[0] != "go" || words[1] != "build" {
		t.Fatalf("Dockerfile:%d: RUN %s: want [VAR=value ...] go build ...", run.line, run.args)
	}
	b.args = words[2:]
	for i, w := range b.args {
		switch {
		case w == "-o" && i+1 < len(b.args):
			b.output = b.args[i+1]
		case w == "-ldflags" && i+1 < len(b.args):
			b.ldflags = b.args[i+1]
		case strings.HasPrefix(w, "-ldflags="):
			b.ldflags = strings.TrimPrefix(w, "-ldflags=")
		}
	}
	b.pkg = b.args[len(b.args)-1]
	return b
}

func TestDockerfile(t *testing.T) {
	root := repoRoot(t)
	df := loadDockerfile(t)
	if len(df.stages) < 2 {
		t.Fatalf("Dockerfile has %d stage(s), want a builder and a runtime stage", len(df.stages))
	}
	names := map[string]int{}
	for i, st := range df.stages {
		if st.name != "" {
			if _, dup := names[st.name]; dup {
				t.Errorf("stage name %q is used twice", st.name)
			}
			names[st.name] = i
		}
		if strings.Contains(st.image, "$") || strings.HasSuffix(st.image, ":") || strings.Contains(st.image, ":-") {
			t.Errorf("stage %d image %q has an undefined ARG", i, st.image)
		}
		for _, fl := range st.flags {
			if fl != "--platform=$BUILDPLATFORM" && fl != "--platform=${BUILDPLATFORM}" {
				t.Errorf("FROM %s %s: unexpected flag", fl, st.image)
			}
		}
		for _, in := range st.body {
			if in.cmd == "ADD" && strings.Contains(in.args, "://") {
				t.Errorf("Dockerfile:%d: ADD from a URL: %s; download in a RUN with a checksum, or COPY", in.line, in.args)
			}
			if in.cmd != "COPY" && in.cmd != "ADD" {
				continue
			}
			for _, f := range strings.Fields(in.args) {
				from, ok := strings.CutPrefix(f, "--from=")
				if !ok {
					continue
				}
				// An unknown name would silently pull an image of that name.
				j, known := names[from]
				if n, err := strconv.Atoi(from); err == nil {
					j, known = n, n >= 0 && n < len(df.stages)
				}
				if !known || j >= i {
					t.Errorf("Dockerfile:%d: COPY --from=%s does not name an earlier stage", in.line, from)
				}
			}
		}
	}

	builder := df.stages[0]
	final := df.stages[len(df.stages)-1]
	m := regexp.MustCompile(`^golang:(\d+\.\d+(?:\.\d+)?)(?:-\S+)?$`).FindStringSubmatch(builder.image)
	if m == nil {
		t.Fatalf("builder image %q: want golang:<version>[-variant]", builder.image)
	}
	if want := goDirective(t); versionLess(m[1], want) {
		t.Errorf("builder image %s is older than go.mod's go %s", builder.image, want)
	}
	if strings.HasPrefix(final.image, "golang") {
		t.Errorf("runtime image %s: want a small base without the toolchain", final.image)
	}

	// The builder copies the source into its WORKDIR and builds the
	// repository root package there: static, -trimpath, and the version
	// stamped into main.version from ARG VERSION.
	var build *goBuild
	workdir, copiedSource, versionArg := false, false, false
	for _, in := range builder.body {
		switch in.cmd {
		case "WORKDIR":
			workdir = true
		case "ARG":
			if k, _, _ := strings.Cut(in.args, "="); k == "VERSION" {
				versionArg = true
			}
		case "COPY":
			if in.args == ". ." {
				if !workdir {
					t.Errorf("Dockerfile:%d: COPY . . before WORKDIR", in.line)
				}
				copiedSource = true
			}
		case "RUN":
			if strings.Contains(in.args, "go build") {
				if !copiedSource {
					t.Errorf("Dockerfile:%d: go build before COPY . .", in.line)
				}
				if !versionArg {
					t.Errorf("Dockerfile:%d: go build before ARG VERSION", in.line)
				}
				b := parseGoBuild(t, in, nil)
				build = &b
			}
		}
	}
	if build == nil {
		t.Fatal("the builder stage has no RUN go build")
	}
	if !slices.Contains(build.env, "CGO_ENABLED=0") {
		t.Errorf("go build runs with %q, without CGO_ENABLED=0", build.env)
	}
	if !slices.Contains(build.args, "-trimpath") {
		t.Errorf("go build %q without -trimpath", build.args)
	}
	if !regexp.MustCompile(`-X main\.version=\$(\{VERSION\}|VERSION\b)`).MatchString(build.ldflags) {
		t.Errorf("go build -ldflags %q does not set main.version from ARG VERSION", build.ldflags)
	}
	if build.pkg != "." {
		t.Errorf("go build builds %q, want the repository root package \".\"", build.pkg)
	}
	if !strings.HasPrefix(build.output, "/") {
		t.Errorf("go build -o %q: want an absolute path for COPY --from", build.output)
	}

	// The runtime stage: tools, the binary and the script, exec-form
	// ENTRYPOINT on the binary.
	var finalRuns string
	for _, in := range final.find("RUN") {
		finalRuns += in.args + "\n"
	}
	for _, pkg := range []string{"iptables", "iproute2"} {
		if !regexp.MustCompile(`(apt-get install -y --no-install-recommends|apk add --no-cache)[^\n]*\b` + pkg + `\b`).MatchString(finalRuns) {
			t.Errorf("the runtime stage does not install %s (apt-get install --no-install-recommends or apk add --no-cache)", pkg)
		}
	}
	if strings.Contains(finalRuns, "apt-get") && !strings.Contains(finalRuns, "rm -rf /var/lib/apt/lists/*") {
		t.Error("the runtime stage keeps the apt lists: rm -rf /var/lib/apt/lists/*")
	}
	copies := map[string]string{} // destination -> source
	for _, in := range final.find("COPY") {
		f := strings.Fields(in.args)
		var from string
		for len(f) > 0 && strings.HasPrefix(f[0], "--") {
			if v, ok := strings.CutPrefix(f[0], "--from="); ok {
				from = v
			}
			f = f[1:]
		}
		if len(f) != 2 {
			t.Errorf("Dockerfile:%d: COPY %s: want one source and one destination", in.line, in.args)
			continue
		}
		if from != "" {
			copies[f[1]] = from + ":" + f[0]
		} else {
			copies[f[1]] = f[0]
		}
	}
	eps := final.find("ENTRYPOINT")
	if len(eps) != 1 {
		t.Fatalf("the runtime stage has %d ENTRYPOINT, want one", len(eps))
	}
	var entrypoint []string
	if err := json.Unmarshal([]byte(eps[0].args), &entrypoint); err != nil || len(entrypoint) == 0 {
		t.Fatalf("ENTRYPOINT %s is not in exec form [\"/path\", ...]: %v", eps[0].args, err)
	}
	if want := builder.name + ":" + build.output; copies[entrypoint[0]] != want {
		t.Errorf("ENTRYPOINT runs %s, which is %q; want the binary the builder writes, %s", entrypoint[0], copies[entrypoint[0]], want)
	}
	scriptCopied := false
	for dst, src := range copies {
		if src == "dist/"+script {
			scriptCopied = true
			if filepath.Dir(dst) != filepath.Dir(entrypoint[0]) {
				t.Errorf("%s is copied to %s, not beside the daemon in %s", script, dst, filepath.Dir(entrypoint[0]))
			}
		}
	}
	if !scriptCopied {
		t.Errorf("the runtime stage does not copy dist/%s", script)
	}

	// Every file copied from the build context exists and is not excluded
	// by .dockerignore, and neither is any Go source of the module.
	ignore := loadDockerignore(t, root)
	for _, st := range df.stages {
		for _, in := range st.find("COPY") {
			f := strings.Fields(in.args)
			if strings.HasPrefix(f[0], "--from=") {
				continue
			}
			for _, src := range f[:len(f)-1] {
				if src == "." {
					continue
				}
				if _, err := os.Stat(filepath.Join(root, src)); err != nil {
					t.Errorf("Dockerfile:%d: COPY %s: %v", in.line, src, err)
				}
				if ignore.excluded(src) {
					t.Errorf("Dockerfile:%d: COPY %s, but .dockerignore excludes it", in.line, src)
				}
			}
		}
	}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		if d.IsDir() && (rel == ".git" || rel == "tmp" || rel == "bin") {
			return filepath.SkipDir
		}
		if !d.IsDir() && (rel == "go.mod" || rel == "go.sum" || strings.HasSuffix(rel, ".go") && !strings.HasSuffix(rel, "_test.go")) && ignore.excluded(rel) {
			t.Errorf(".dockerignore excludes %s, which the build needs", rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{".git", ".git/HEAD", "bin/flanneld"} {
		if !ignore.excluded(p) {
			t.Errorf(".dockerignore does not exclude %s", p)
		}
	}

	// The update-alternatives paths exist in Debian's iptables package.
	if strings.Contains(finalRuns, "update-alternatives") {
		t.Run("iptables alternatives", func(t *testing.T) {
			ua, err := exec.LookPath("update-alternatives")
			if err != nil {
				t.Skip("update-alternatives is not installed: not a Debian host")
			}
			res := run(t, nil, ua, "--list", "iptables")
			if res.code != 0 {
				t.Skipf("no iptables alternatives on this host: %s", res.stderr)
			}
			for _, mode := range []string{"nft", "legacy"} {
				for _, m := range regexp.MustCompile(`--set (\S+) (\S+)`).FindAllStringSubmatch(finalRuns, -1) {
					path := expandArgs(m[2], map[string]string{"IPTABLES": mode})
					list := run(t, nil, ua, "--list", m[1])
					if !slices.Contains(strings.Fields(list.stdout), path) {
						t.Errorf("update-alternatives --set %s %s: not an alternative here (%q)", m[1], path, list.stdout)
					}
				}
			}
		})
	}

	// Run the builder's go build here, as the image build would.
	t.Run("build", func(t *testing.T) {
		goBin, err := exec.LookPath("go")
		if err != nil {
			goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
		}
		const version = "v0.0.0-dockerfile-test"
		args := map[string]string{"VERSION": version, "TARGETOS": runtime.GOOS, "TARGETARCH": runtime.GOARCH}
		b := parseGoBuild(t, findRun(t, builder, "go build"), args)
		out := filepath.Join(t.TempDir(), "flanneld")
		argv := slices.Clone(b.args)
		for i := range argv {
			if argv[i] == b.output {
				argv[i] = out
			}
		}
		cmd := exec.Command(goBin, append([]string{"build"}, argv...)...)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), b.env...)
		if res, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build %q: %v\n%s", argv, err, res)
		}
		f, err := elf.Open(out)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP {
				t.Error("the binary has an ELF interpreter: it is not static")
			}
		}
		if libs, _ := f.ImportedLibraries(); len(libs) != 0 {
			t.Errorf("the binary links %q: it is not static", libs)
		}
		data, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(data, []byte(root+"/")) {
			t.Errorf("the binary contains the build directory %s: -trimpath is missing", root)
		}
		if res := run(t, envWithout("FLANNELD_"), out, "--version"); res.code != 0 || res.stdout != version+"\n" {
			t.Errorf("flanneld --version: exit %d, %q; want %q", res.code, res.stdout, version+"\n")
		}
	})
}

// findRun returns the RUN of a stage containing s.
func findRun(t *testing.T, st stage, s string) instruction {
	t.Helper()
	for _, in := range st.find("RUN") {
		if strings.Contains(in.args, s) {
			return in
		}
	}
	t.Fatalf("stage %s has no RUN with %q", st.name, s)
	return instruction{}
}

// dockerignore holds .dockerignore's patterns, as regular expressions.
type dockerignore []struct {
	re     *regexp.Regexp
	negate bool
}

func loadDockerignore(t *testing.T, root string) dockerignore {
	t.Helper()
	var d dockerignore
	for _, line := range strings.Split(readFile(t, filepath.Join(root, ".dockerignore")), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		negate := strings.HasPrefix(line, "!")
		pat := filepath.Clean(strings.TrimPrefix(strings.TrimPrefix(line, "!"), "/"))
		var re strings.Builder
		re.WriteString("^")
		for i := 0; i < len(pat); i++ {
			switch c := pat[i]; {
			case strings.HasPrefix(pat[i:], "**/"):
				re.WriteString("(.*/)?")
				i += 2
			case strings.HasPrefix(pat[i:], "**"):
				re.WriteString(".*")
				i++
			case c == '*':
				re.WriteString("[^/]*")
			case c == '?':
				re.WriteString("[^/]")
			default:
				re.WriteString(regexp.QuoteMeta(string(c)))
			}
		}
		re.WriteString("$")
		d = append(d, struct {
			re     *regexp.Regexp
			negate bool
		}{regexp.MustCompile(re.String()), negate})
	}
	return d
}

// excluded reports whether the context path p (slash separated, relative)
// is left out: the last pattern matching p or one of its parent
// directories decides.
func (d dockerignore) excluded(p string) bool {
	p = filepath.ToSlash(filepath.Clean(p))
	var paths []string
	for q := p; q != "." && q != "/"; q = filepath.Dir(q) {
		paths = append(paths, q)
	}
	out := false
	for _, pat := range d {
		for _, q := range paths {
			if pat.re.MatchString(q) {
				out = !pat.negate
				break
			}
		}
	}
	return out
}
