package wireguard

import (
	"fmt"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The data path is the kernel's when it creates (or already has) a link of
// type wireguard, and wireguard-go's when the kernel has no WireGuard.
func TestChoosePath(t *testing.T) {
	wgLink := &netlink.GenericLink{LinkType: "wireguard"}
	tunLink := &netlink.Tuntap{}
	for _, c := range []struct {
		name     string
		err      error
		existing netlink.Link
		want     dataPath
		wantErr  string
	}{
		{"created", nil, nil, kernelPath, ""},
		{"no module", fmt.Errorf("operation not supported: %w", unix.EOPNOTSUPP), nil, userspacePath, ""},
		{"kernel link left", unix.EEXIST, wgLink, kernelPath, ""},
		{"tun left", unix.EEXIST, tunLink, userspacePath, ""},
		{"foreign link", unix.EEXIST, &netlink.Dummy{}, 0, "a device flannel-wg of type dummy exists; delete it (ip link del flannel-wg)"},
		{"permission", unix.EPERM, nil, 0, "creating the WireGuard device flannel-wg: operation not permitted"},
	} {
		p, why, err := choosePath("flannel-wg", c.err, c.existing)
		if c.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), c.wantErr) {
				t.Errorf("%s: error %v, want %q", c.name, err, c.wantErr)
			}
			continue
		}
		if err != nil || p != c.want || why == "" {
			t.Errorf("%s: got %v (%q), %v; want %v", c.name, p, why, err, c.want)
		}
	}
}
