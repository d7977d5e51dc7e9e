package wireguard

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

func TestKeyFileEnv(t *testing.T) {
	if got := keyFile(func(string) string { return "" }); got != "/run/flannel/wgkey" {
		t.Errorf("default key file %s", got)
	}
	env := func(k string) string {
		if k == "WIREGUARD_KEY_FILE" {
			return "/etc/wg/key"
		}
		return ""
	}
	if got := keyFile(env); got != "/etc/wg/key" {
		t.Errorf("key file with $WIREGUARD_KEY_FILE: %s", got)
	}
}

// A missing key file is created (0400, directory 0755) and read back on the
// next start: the public key survives restarts.
func TestKeyCreatedThenReused(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "run", "flannel")
	path := filepath.Join(dir, "wgkey")
	k1, created, err := loadOrCreateKey(path)
	if err != nil || !created {
		t.Fatalf("first start: created %v, %v", created, err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o400 {
		t.Errorf("key file mode %v, want 0400", fi.Mode().Perm())
	}
	di, err := os.Stat(dir)
	if err != nil || di.Mode().Perm() != 0o755 {
		t.Errorf("key directory mode %v (%v), want 0755", di.Mode().Perm(), err)
	}
	data, _ := os.ReadFile(path)
	if string(data) != k1.String() {
		t.Errorf("key file holds %q, want the base64 key without newline", data)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("key directory holds %d entries, want just the key", len(ents))
	}
	k2, created, err := loadOrCreateKey(path)
	if err != nil || created || k2 != k1 {
		t.Errorf("second start: key equal %v, created %v, %v", k2 == k1, created, err)
	}
}

// A key written by wg genkey (with its newline) is read as is.
func TestKeyFromWGGenkey(t *testing.T) {
	k, _ := wgtypes.GeneratePrivateKey()
	path := filepath.Join(t.TempDir(), "wgkey")
	if err := os.WriteFile(path, []byte(k.String()+"\n"), 0o400); err != nil {
		t.Fatal(err)
	}
	got, created, err := loadOrCreateKey(path)
	if err != nil || created || got != k {
		t.Errorf("got equal %v, created %v, %v", got == k, created, err)
	}
}

// A file that does not hold a key is one line naming the file, and the
// file is left as it was.
func TestBadKeyFile(t *testing.T) {
	for name, content := range map[string]string{
		"empty":   "",
		"garbage": "not a key at all\n",
		"short":   "aGVsbG8=",
	} {
		path := filepath.Join(t.TempDir(), "wgkey")
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		_, _, err := loadOrCreateKey(path)
		if !errors.Is(err, ErrBadKeyFile) {
			t.Errorf("%s: error %v, want ErrBadKeyFile", name, err)
			continue
		}
		if msg := err.Error(); !strings.Contains(msg, path) || strings.Contains(msg, "\n") || !strings.Contains(msg, "remove the file") {
			t.Errorf("%s: error %q, want one line naming %s and the fix", name, msg, path)
		}
		if data, _ := os.ReadFile(path); string(data) != content {
			t.Errorf("%s: the file was changed to %q", name, data)
		}
	}
	// A directory where the file should be is not replaced either.
	dir := t.TempDir()
	if _, _, err := loadOrCreateKey(dir); err == nil || !strings.Contains(err.Error(), dir) {
		t.Errorf("key file is a directory: %v", err)
	}
}
