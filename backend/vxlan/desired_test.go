package vxlan

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/subnet"
)

// render prints a desired set in ip/bridge syntax, one entry a line, sorted;
// neighbours and fdb entries are on the VTEP device, routes name the device
// index.
func (d *desired) render() string {
	var lines []string
	for i := range d.neighs.Len() {
		k, v := d.neighs.Key(i), d.neighs.Val(i)
		lines = append(lines, fmt.Sprintf("neigh %s lladdr %s nud %s", k.ip(), v.mac, nud(v.state)))
	}
	for i := range d.fdbs.Len() {
		k, v := d.fdbs.Key(i), d.fdbs.Val(i)
		lines = append(lines, fmt.Sprintf("fdb %s self dst %s %s", k, v.dst.ip(), nud(v.state)))
	}
	for i := range d.routes.Len() {
		r := d.routes.Route(i)
		line := fmt.Sprintf("route %s via %s dev %d", r.Dst, r.Gw, r.LinkIndex)
		if r.Onlink {
			line += " onlink"
		}
		lines = append(lines, line)
	}
	for _, s := range d.skips {
		lines = append(lines, fmt.Sprintf("skip %s: %s", s.Subnet, s.Reason))
	}
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}

// checkSearch checks that the neighbour and fdb sets are sorted and find
// each of their keys by Search (from the bytes peerRef holds, and the
// MACs as numbers), and no other key.
func checkSearch(t *testing.T, d *desired) {
	t.Helper()
	for i := range d.neighs.Len() {
		k := d.neighs.Key(i)
		if i > 0 && compareAddrs(d.neighs.Key(i-1), k) >= 0 {
			t.Errorf("neighbours not sorted at %d: %s", i, k.ip())
		}
		if got := d.neighs.Search(k); got != i {
			t.Errorf("neighbour %s found at %d, want %d", k.ip(), got, i)
		}
		for _, miss := range []netip.Addr{k.ip().Next(), k.ip().Prev(), netip.MustParseAddr("10.0.0.0"), netip.MustParseAddr("fc00::1"), netip.MustParseAddr("::")} {
			if miss.IsValid() && backend.Search[addr, neighVal](neighSearch{&d.neighs}, addrOf(miss), compareAddrs) < 0 {
				if got := d.neighs.Search(addrOf(miss)); got >= 0 {
					t.Errorf("neighbour %s, not desired, found at %d", miss, got)
				}
			}
		}
	}
	for i := range d.fdbs.Len() {
		k := d.fdbs.Key(i)
		if i > 0 && compareMACs(d.fdbs.Key(i-1), k) >= 0 {
			t.Errorf("fdb entries not sorted at %d: %s", i, k)
		}
		if got := d.fdbs.Search(k); got != i {
			t.Errorf("fdb entry %s found at %d, want %d", k, got, i)
		}
		miss := k
		miss[5]++
		if backend.Search[hwAddr, fdbVal](fdbSearch{&d.fdbs}, miss, compareMACs) < 0 {
			if got := d.fdbs.Search(miss); got >= 0 {
				t.Errorf("fdb entry %s, not desired, found at %d", miss, got)
			}
		}
	}
}

// fdbSearch is an fdbSet without its Search: searched by Key.
type fdbSearch struct{ s *fdbSet }

func (f fdbSearch) Len() int         { return f.s.Len() }
func (f fdbSearch) Key(i int) hwAddr { return f.s.Key(i) }
func (f fdbSearch) Val(i int) fdbVal { return f.s.Val(i) }

func nud(state uint16) string {
	if state == 0x80 {
		return "permanent"
	}
	return fmt.Sprintf("state %#x", state)
}

func lease(sn, pub, typ, data string) subnet.Lease {
	l := subnet.Lease{Subnet: netip.MustParsePrefix(sn), Attrs: subnet.LeaseAttrs{BackendType: typ}}
	if pub != "" {
		l.Attrs.PublicIP = netip.MustParseAddr(pub)
	}
	if data != "" {
		l.Attrs.BackendData = json.RawMessage(data)
	}
	return l
}

func vx(sn, pub, mac string) subnet.Lease {
	return lease(sn, pub, "vxlan", `{"VtepMAC":"`+mac+`"}`)
}

func TestDesiredCompute(t *testing.T) {
	base := world{vtep: 7, ext: 2}
	direct := base
	direct.direct = true
	direct.extNets = []netip.Prefix{netip.MustParsePrefix("192.168.8.0/24")}

	tests := []struct {
		name   string
		w      world
		remote []subnet.Lease
		want   string
	}{
		{"none", base, nil, ``},
		{
			"two peers, in any order",
			base,
			[]subnet.Lease{
				vx("10.5.3.0/24", "192.168.8.3", "0e:00:00:00:00:03"),
				vx("10.5.2.0/24", "192.168.9.2", "82:4b:b6:2f:54:4e"),
			},
			`fdb 0e:00:00:00:00:03 self dst 192.168.8.3 permanent
fdb 82:4b:b6:2f:54:4e self dst 192.168.9.2 permanent
neigh 10.5.2.0 lladdr 82:4b:b6:2f:54:4e nud permanent
neigh 10.5.3.0 lladdr 0e:00:00:00:00:03 nud permanent
route 10.5.2.0/24 via 10.5.2.0 dev 7 onlink
route 10.5.3.0/24 via 10.5.3.0 dev 7 onlink`,
		},
		{
			"every kind of unusable BackendData is skipped, the good lease stays",
			base,
			[]subnet.Lease{ // admitted by the caller: subnets and PublicIPs are fine
				vx("10.5.2.0/24", "192.168.8.2", "0e:00:00:00:00:02"),
				lease("10.5.6.0/24", "192.168.8.6", "vxlan", ""),
				lease("10.5.7.0/24", "192.168.8.7", "vxlan", `{"Mac":"0e:00:00:00:00:07"}`),
				lease("10.5.8.0/24", "192.168.8.8", "vxlan", `["0e:00:00:00:00:08"]`),
				vx("10.5.9.0/24", "192.168.8.9", "garbage"),
				vx("10.5.10.0/24", "192.168.8.10", "01:00:5e:00:00:01"),
				vx("10.5.11.0/24", "192.168.8.11", "00:00:00:00:00:00"),
				vx("10.5.12.0/24", "192.168.8.12", "02:00:5e:10:00:00:00:01"),
				lease("10.5.13.0/24", "192.168.8.13", "vxlan", `{"VtepMAC":7}`),
				vx("10.5.14.0/24", "192.168.8.14", "0e:00:00:00:00:02"),
			},
			`fdb 0e:00:00:00:00:02 self dst 192.168.8.2 permanent
neigh 10.5.2.0 lladdr 0e:00:00:00:00:02 nud permanent
route 10.5.2.0/24 via 10.5.2.0 dev 7 onlink
skip 10.5.10.0/24: VtepMAC "01:00:5e:00:00:01" is unusable: 01:00:5e:00:00:01 is not a unicast address
skip 10.5.11.0/24: VtepMAC "00:00:00:00:00:00" is unusable: 00:00:00:00:00:00 is not a unicast address
skip 10.5.12.0/24: VtepMAC "02:00:5e:10:00:00:00:01" is unusable: "02:00:5e:10:00:00:00:01" is not a 6-byte Ethernet address
skip 10.5.13.0/24: BackendData {"VtepMAC":7} is not a JSON object with a VtepMAC string
skip 10.5.14.0/24: VtepMAC 0e:00:00:00:00:02 is already used by the lease 10.5.2.0/24
skip 10.5.6.0/24: BackendData is missing; a vxlan lease carries {"VtepMAC":"xx:xx:xx:xx:xx:xx"}
skip 10.5.7.0/24: BackendData {"Mac":"0e:00:00:00:00:07"} has no VtepMAC
skip 10.5.8.0/24: BackendData ["0e:00:00:00:00:08"] is not a JSON object with a VtepMAC string
skip 10.5.9.0/24: VtepMAC "garbage" is unusable: address garbage: invalid MAC address`,
		},
		{
			"DirectRouting: peers on the external network get a plain route, others the tunnel",
			direct,
			[]subnet.Lease{
				vx("10.5.2.0/24", "192.168.8.2", "0e:00:00:00:00:02"),
				vx("10.5.3.0/24", "172.16.0.3", "0e:00:00:00:00:03"),
			},
			`fdb 0e:00:00:00:00:03 self dst 172.16.0.3 permanent
neigh 10.5.3.0 lladdr 0e:00:00:00:00:03 nud permanent
route 10.5.2.0/24 via 192.168.8.2 dev 2
route 10.5.3.0/24 via 10.5.3.0 dev 7 onlink`,
		},
		{
			"DirectRouting: a VtepMAC is taken by a direct or a tunnelled lease alike",
			direct,
			[]subnet.Lease{
				vx("10.5.2.0/24", "192.168.8.2", "0e:00:00:00:00:02"),
				vx("10.5.3.0/24", "172.16.0.3", "0e:00:00:00:00:03"),
				vx("10.5.4.0/24", "172.16.0.4", "0e:00:00:00:00:02"),
				vx("10.5.5.0/24", "192.168.8.5", "0e:00:00:00:00:03"),
				vx("10.5.6.0/24", "172.16.0.6", "0e:00:00:00:00:03"),
			},
			`fdb 0e:00:00:00:00:03 self dst 172.16.0.3 permanent
neigh 10.5.3.0 lladdr 0e:00:00:00:00:03 nud permanent
route 10.5.2.0/24 via 192.168.8.2 dev 2
route 10.5.3.0/24 via 10.5.3.0 dev 7 onlink
skip 10.5.4.0/24: VtepMAC 0e:00:00:00:00:02 is already used by the lease 10.5.2.0/24
skip 10.5.5.0/24: VtepMAC 0e:00:00:00:00:03 is already used by the lease 10.5.3.0/24
skip 10.5.6.0/24: VtepMAC 0e:00:00:00:00:03 is already used by the lease 10.5.3.0/24`,
		},
		{
			"without DirectRouting the same peer is tunnelled",
			base,
			[]subnet.Lease{vx("10.5.2.0/24", "192.168.8.2", "0e:00:00:00:00:02")},
			`fdb 0e:00:00:00:00:02 self dst 192.168.8.2 permanent
neigh 10.5.2.0 lladdr 0e:00:00:00:00:02 nud permanent
route 10.5.2.0/24 via 10.5.2.0 dev 7 onlink`,
		},
	}
	d := newDesired() // reused across cases, as a plane does
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d.compute(tt.w, tt.remote)
			checkSearch(t, d)
			if got := d.render(); got != tt.want {
				t.Errorf("desired set:\n%s\n\nwant:\n%s", got, tt.want)
			}
			// The input order does not matter.
			rev := slices.Clone(tt.remote)
			slices.Reverse(rev)
			d.compute(tt.w, rev)
			checkSearch(t, d)
			if got := d.render(); got != tt.want {
				t.Errorf("desired set from reversed leases:\n%s\n\nwant:\n%s", got, tt.want)
			}
		})
	}
}

// TestColonMAC: the allocation-free parser agrees with net.ParseMAC on the
// colon form and rejects everything else.
func TestColonMAC(t *testing.T) {
	for _, s := range []string{"0e:00:00:00:00:03", "AA:bb:Cc:dD:ee:FF", "00:00:00:00:00:00", "0e-00-00-00-00-03", "0e:00:00:00:00:0g",
		"0e:00:00:00:00:033", "0e:00:00:00:00", "0e:00:00:00:00:0", "0e00:00:00:00:003", ":0e:00:00:00:00:0", ""} {
		got, ok := colonMAC([]byte(s))
		want, err := net.ParseMAC(s)
		colon := len(s) == 17 && strings.Count(s, ":") == 5
		if ok != (err == nil && colon) {
			t.Errorf("colonMAC(%q) ok = %v; net.ParseMAC: %v", s, ok, err)
			continue
		}
		if ok && !bytes.Equal(got[:], want) {
			t.Errorf("colonMAC(%q) = %s, net.ParseMAC %s", s, got, want)
		}
	}
}

func vx6(sn6, pub6, mac6 string) subnet.Lease {
	l := vx("10.5.9.0/24", "192.168.8.9", "0e:00:00:00:00:09")
	l.IPv6Subnet = netip.MustParsePrefix(sn6)
	if pub6 != "" {
		l.Attrs.PublicIPv6 = netip.MustParseAddr(pub6)
	}
	if mac6 != "" {
		l.Attrs.BackendV6Data = json.RawMessage(`{"VNI":1,"VtepMAC":"` + mac6 + `"}`)
	}
	return l
}

// TestDesiredComputeIPv6: the IPv6 overlay reads IPv6Subnet, PublicIPv6 and
// BackendV6Data, and checks them as the IPv4 one does its own.
func TestDesiredComputeIPv6(t *testing.T) {
	w := world{v6: true, vtep: 8, ext: 2}
	direct := w
	direct.direct = true
	direct.extNets = []netip.Prefix{netip.MustParsePrefix("fd5e::/64")}
	noSubnet := vx("10.5.3.0/24", "192.168.8.3", "0e:00:00:00:00:03")
	same := vx6("fc00:5:0:2::/64", "fd5e::5", "0e:00:00:00:06:05")
	same.Subnet = netip.MustParsePrefix("10.5.5.0/24")
	tests := []struct {
		name   string
		w      world
		remote []subnet.Lease
		want   string
	}{
		{"two peers", w, []subnet.Lease{
			vx6("fc00:5:0:2::/64", "fd5e::2", "0e:00:00:00:06:02"),
			vx6("fc00:5:0:3::/64", "fd99::3", "0e:00:00:00:06:03"),
		}, `fdb 0e:00:00:00:06:02 self dst fd5e::2 permanent
fdb 0e:00:00:00:06:03 self dst fd99::3 permanent
neigh fc00:5:0:2:: lladdr 0e:00:00:00:06:02 nud permanent
neigh fc00:5:0:3:: lladdr 0e:00:00:00:06:03 nud permanent
route fc00:5:0:2::/64 via fc00:5:0:2:: dev 8 onlink
route fc00:5:0:3::/64 via fc00:5:0:3:: dev 8 onlink`},
		{"direct routing on the shared network only", direct, []subnet.Lease{
			vx6("fc00:5:0:2::/64", "fd5e::2", "0e:00:00:00:06:02"),
			vx6("fc00:5:0:3::/64", "fd99::3", "0e:00:00:00:06:03"),
		}, `fdb 0e:00:00:00:06:03 self dst fd99::3 permanent
neigh fc00:5:0:3:: lladdr 0e:00:00:00:06:03 nud permanent
route fc00:5:0:2::/64 via fd5e::2 dev 2
route fc00:5:0:3::/64 via fc00:5:0:3:: dev 8 onlink`},
		{"unusable leases; an IPv4-only one is not programmed, silently", w, []subnet.Lease{
			noSubnet,
			vx6("fc00:5:0:5::/64", "fd5e::5", ""),
			vx6("fc00:5:0:2::/64", "fd5e::2", "0e:00:00:00:06:02"),
			same,
		}, `fdb 0e:00:00:00:06:02 self dst fd5e::2 permanent
neigh fc00:5:0:2:: lladdr 0e:00:00:00:06:02 nud permanent
route fc00:5:0:2::/64 via fc00:5:0:2:: dev 8 onlink
skip fc00:5:0:2::/64: another lease has the same subnet
skip fc00:5:0:5::/64: BackendV6Data is missing; a vxlan lease carries {"VtepMAC":"xx:xx:xx:xx:xx:xx"}`},
	}
	d := newDesired()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, rev := range []bool{false, true} {
				remote := slices.Clone(tt.remote)
				if rev {
					slices.Reverse(remote)
				}
				d.compute(tt.w, remote)
				checkSearch(t, d)
				if got := d.render(); got != tt.want {
					t.Errorf("desired set (reversed %t):\n%s\n\nwant:\n%s", rev, got, tt.want)
				}
			}
		})
	}
}
