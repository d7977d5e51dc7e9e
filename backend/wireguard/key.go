package wireguard

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// DefaultKeyFile holds the node's private key unless $WIREGUARD_KEY_FILE
// names another file (flannel's paths).
const DefaultKeyFile = "/run/flannel/wgkey"

// KeyFileEnv names the environment variable that overrides DefaultKeyFile.
const KeyFileEnv = "WIREGUARD_KEY_FILE"

// ErrBadKeyFile is returned (wrapped) for a key file that exists and does
// not hold a private key. The file is never replaced: the key in it may be
// the one every other node knows this node by.
var ErrBadKeyFile = errors.New("it holds no WireGuard private key")

// keyFile is the path of the private key file: $WIREGUARD_KEY_FILE, else
// DefaultKeyFile.
func keyFile(getenv func(string) string) string {
	if p := getenv(KeyFileEnv); p != "" {
		return p
	}
	return DefaultKeyFile
}

// loadOrCreateKey reads the private key from path, or, when the file does
// not exist, generates one and writes it there (base64, no newline, mode
// 0400, its directory created 0755), as flannel does, so that the public key
// survives restarts. created reports whether a new key was written.
func loadOrCreateKey(path string) (key wgtypes.Key, created bool, err error) {
	data, err := os.ReadFile(path)
	if err == nil {
		k, perr := wgtypes.ParseKey(strings.TrimSpace(string(data)))
		if perr != nil {
			return wgtypes.Key{}, false, fmt.Errorf("private key file %s: %w (base64 of 32 bytes); restore the node's key there, or remove the file to have a new key made (peers learn the new public key from the lease)", path, ErrBadKeyFile)
		}
		return k, false, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return wgtypes.Key{}, false, fmt.Errorf("reading the private key file %s: %w", path, err)
	}
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		return wgtypes.Key{}, false, fmt.Errorf("generating a private key: %w", err)
	}
	if err := writeKey(path, k); err != nil {
		return wgtypes.Key{}, false, fmt.Errorf("writing the private key file %s: %w", path, err)
	}
	return k, true, nil
}

// writeKey writes k to path without ever replacing an existing file: it
// writes a temporary file in the same directory and links it into place,
// which fails if another process created path meanwhile.
func writeKey(path string, k wgtypes.Key) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(dir, ".wgkey-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o400); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.WriteString(k.String()); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Link(tmp.Name(), path)
}
