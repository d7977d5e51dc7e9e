package subnet

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
)

func TestWriteEnv(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run", "flannel", "subnet.env")
	e := Env{Network: netip.MustParsePrefix("10.5.0.0/16"), Subnet: netip.MustParsePrefix("10.5.34.0/24"), MTU: 1450}
	for i := 0; i < 2; i++ { // second write replaces the first
		if err := WriteEnv(path, e); err != nil {
			t.Fatal(err)
		}
		e.IPMasq = true
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want := "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.34.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
	if string(got) != want {
		t.Errorf("subnet.env =\n%s\nwant\n%s", got, want)
	}
	st, _ := os.Stat(path)
	if st.Mode().Perm() != 0o644 {
		t.Errorf("mode = %v", st.Mode())
	}
	ents, _ := os.ReadDir(filepath.Dir(path))
	if len(ents) != 1 {
		t.Errorf("temp files left behind: %v", ents)
	}
	back, err := ReadEnv(path)
	if err != nil || back != e {
		t.Errorf("ReadEnv = %+v, %v; want %+v", back, err, e)
	}
}

func TestWriteEnvUnwritableDir(t *testing.T) {
	dir := t.TempDir()
	blocker := filepath.Join(dir, "file")
	os.WriteFile(blocker, nil, 0o644)
	if err := WriteEnv(filepath.Join(blocker, "subnet.env"), Env{}); err == nil {
		t.Fatal("WriteEnv under a regular file succeeded")
	}
}

func TestParseEnv(t *testing.T) {
	e, err := ParseEnv([]byte("# docker\n\nFLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=\"10.5.34.1/24\"\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\nOTHER=1\n"))
	if err != nil || e.Subnet.String() != "10.5.34.0/24" || e.MTU != 1472 || e.Network.String() != "10.5.0.0/16" {
		t.Errorf("ParseEnv = %+v, %v", e, err)
	}
	bad := []string{
		"", "FLANNEL_NETWORK=10.5.0.0/16\n", "FLANNEL_SUBNET=10.5.34.1/24\n",
		"FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=banana\n",
		"FLANNEL_NETWORK=fd00::/64\nFLANNEL_SUBNET=10.5.34.1/24\n",
		"FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.34.1/24\nFLANNEL_MTU=-1\n",
		"FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.34.1/24\nFLANNEL_IPMASQ=maybe\n",
		"FLANNEL_NETWORK=10.5.0.0/16\njunk line\n",
		"\x00\x01\x02",
	}
	for _, s := range bad {
		if _, err := ParseEnv([]byte(s)); !errors.Is(err, ErrBadEnv) {
			t.Errorf("ParseEnv(%q) = %v, want ErrBadEnv", s, err)
		}
	}
	if _, err := ReadEnv(filepath.Join(t.TempDir(), "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("ReadEnv(missing) = %v, want ErrNotExist", err)
	}
}
