package lab

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
)

// tools are the commands the lab and its daemons run, with the Debian
// package of each: flanneld keeps its rules with iptables-save and
// iptables-restore.
var tools = []struct{ cmd, pkg string }{
	{"ip", "iproute2"},
	{"ping", "iputils-ping"},
	{"ss", "iproute2"},
	{"bash", "bash"},
	{"iptables-save", "iptables"},
	{"iptables-restore", "iptables"},
}

var toolsMu sync.Mutex

// ensureTools checks that the lab's commands exist and, as root on a
// machine with apt-get, installs the missing packages, saying so with
// logf.
func ensureTools(logf func(string, ...any)) error {
	return ensure(func(pkgs []string) error { return aptInstall(pkgs, logf) })
}

// ensure installs the packages of the missing tools with install, and
// checks that they are there afterwards.
func ensure(install func(pkgs []string) error) error {
	toolsMu.Lock()
	defer toolsMu.Unlock()
	missing := missingPackages()
	if len(missing) == 0 {
		return nil
	}
	if err := install(missing); err != nil {
		return err
	}
	if still := missingPackages(); len(still) > 0 {
		return fmt.Errorf("the lab needs the packages %s, still missing after apt-get install", strings.Join(still, ", "))
	}
	return nil
}

// aptInstall installs pkgs with apt-get (update, then install), as root
// on a Debian machine, saying so with logf; elsewhere it says what to
// install.
func aptInstall(pkgs []string, logf func(string, ...any)) error {
	if _, err := exec.LookPath("apt-get"); err != nil || os.Geteuid() != 0 {
		return fmt.Errorf("the lab needs the packages %s: install them (apt-get install %s)",
			strings.Join(pkgs, ", "), strings.Join(pkgs, " "))
	}
	logf("installing %s with apt-get", strings.Join(pkgs, " "))
	install := append([]string{"install", "-y", "-qq", "--no-install-recommends"}, pkgs...)
	for _, args := range [][]string{{"update", "-qq"}, install} {
		cmd := exec.Command("apt-get", args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("installing %s with apt-get %s: %w: %s",
				strings.Join(pkgs, " "), args[0], err, tail(string(out), 10))
		}
	}
	return nil
}

func missingPackages() []string {
	var missing []string
	seen := map[string]bool{}
	for _, t := range tools {
		if _, err := exec.LookPath(t.cmd); err != nil && !seen[t.pkg] {
			seen[t.pkg] = true
			missing = append(missing, t.pkg)
		}
	}
	return missing
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
