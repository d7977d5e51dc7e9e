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

// fakeLinks is a netlink handle over a map of links.
type fakeLinks struct {
	links map[string]netlink.Link
	added []netlink.Link
	mtus  map[string]int
}

func (f *fakeLinks) LinkAdd(l netlink.Link) error {
	if _, ok := f.links[l.Attrs().Name]; ok {
		return unix.EEXIST
	}
	f.added = append(f.added, l)
	f.links[l.Attrs().Name] = l
	return nil
}

func (f *fakeLinks) LinkByName(name string) (netlink.Link, error) {
	if l, ok := f.links[name]; ok {
		return l, nil
	}
	return nil, netlink.LinkNotFoundError{}
}

func (f *fakeLinks) LinkSetMTU(l netlink.Link, mtu int) error {
	f.mtus[l.Attrs().Name] = mtu
	return nil
}

// The kernel path creates a link of type wireguard with the MTU, reuses one
// left by an earlier run (keeping its peers and sessions) after putting its
// MTU back, and refuses a device of another type.
func TestOpenKernel(t *testing.T) {
	f := &fakeLinks{links: map[string]netlink.Link{}, mtus: map[string]int{}}
	if _, err := openKernel(f, "flannel-wg", 1420); err != nil {
		t.Fatal(err)
	}
	if len(f.added) != 1 {
		t.Fatalf("%d links added, want 1", len(f.added))
	}
	if g, ok := f.added[0].(*netlink.GenericLink); !ok || g.LinkType != "wireguard" || g.MTU != 1420 {
		t.Errorf("added %#v, want a wireguard link with MTU 1420", f.added[0])
	}
	left := &netlink.GenericLink{LinkAttrs: netlink.LinkAttrs{Name: "flannel-wg-v6", MTU: 1500}, LinkType: "wireguard"}
	f.links["flannel-wg-v6"] = left
	if _, err := openKernel(f, "flannel-wg-v6", 1420); err != nil {
		t.Fatal(err)
	}
	if len(f.added) != 1 || f.mtus["flannel-wg-v6"] != 1420 {
		t.Errorf("existing link: %d added, MTU set to %d; want it reused with MTU 1420", len(f.added)-1, f.mtus["flannel-wg-v6"])
	}
	f.links["flannel-wg"] = &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: "flannel-wg"}}
	if _, err := openKernel(f, "flannel-wg", 1420); err == nil || !strings.Contains(err.Error(), "of type dummy exists; delete it") {
		t.Errorf("foreign device: %v", err)
	}
}
