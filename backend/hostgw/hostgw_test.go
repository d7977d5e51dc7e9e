package hostgw

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/pkg/nlbatch"
	"github.com/flanneld-go/flanneld/subnet"
)

// fakeKernel is the main routing table and the interface addresses, keyed
// the simple way: one route per destination, as host-gw installs them.
type fakeKernel struct {
	routes map[netip.Prefix]netlink.Route
	addrs  map[int][]netip.Prefix // link index -> addresses with prefix length
	names  map[int]string
	calls  []string // mutating calls, in order
	dumps  int
}

func newFakeKernel() *fakeKernel {
	return &fakeKernel{
		routes: map[netip.Prefix]netlink.Route{},
		addrs: map[int][]netip.Prefix{
			2: {netip.MustParsePrefix("192.168.1.1/24")},
			3: {netip.MustParsePrefix("10.0.0.1/24")},
		},
		names: map[int]string{2: "eth0", 3: "eth1", 4: "cni0"},
	}
}

func (f *fakeKernel) RouteListFilteredIter(family int, filter *netlink.Route, mask uint64, fn func(netlink.Route) bool) error {
	f.dumps++
	for _, r := range f.routes {
		if (r.Dst.IP.To4() != nil) != (family == netlink.FAMILY_V4) {
			continue
		}
		if !fn(r) {
			break
		}
	}
	return nil
}

// RouteReplace refuses a gateway that is not on a network connected to the
// link, as the kernel does.
func (f *fakeKernel) RouteReplace(r *netlink.Route) error {
	f.calls = append(f.calls, "replace "+f.format(r))
	gw, _ := ip.FromIP(r.Gw)
	ok := r.Flags&int(netlink.FLAG_ONLINK) != 0
	for _, a := range f.addrs[r.LinkIndex] {
		ok = ok || a.Masked().Contains(gw)
	}
	if !ok {
		return unix.ENETUNREACH
	}
	c := *r
	c.Type = unix.RTN_UNICAST
	dst, _ := ip.FromIPNet(r.Dst)
	f.routes[dst] = c
	return nil
}

// ListRoutes is the dump ListRoutes makes, through RouteListFilteredIter.
func (f *fakeKernel) ListRoutes(fn func(*nlbatch.Route) bool) error {
	return f.RouteListFilteredIter(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE, func(r netlink.Route) bool {
		e := nlbatch.RouteOf(&r)
		return fn(&e)
	})
}

// ListRoutes6 is ListRoutes for the IPv6 routes.
func (f *fakeKernel) ListRoutes6(fn func(*nlbatch.Route) bool) error {
	return f.RouteListFilteredIter(netlink.FAMILY_V6, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE, func(r netlink.Route) bool {
		e := nlbatch.RouteOf(&r)
		return fn(&e)
	})
}

// The fake models no nexthop objects.
func (f *fakeKernel) ReplaceNexthops([]nlbatch.Nexthop, []error) error { return unix.EOPNOTSUPP }
func (f *fakeKernel) DeleteNexthops([]uint32, []error) error           { return unix.EOPNOTSUPP }

// ReplaceRoutes and DeleteRoutes are the batched calls, one route at a time.
func (f *fakeKernel) ReplaceRoutes(rs []nlbatch.Route, errs []error) error {
	for i := range rs {
		errs[i] = f.RouteReplace(rs[i].Netlink())
	}
	return nil
}

func (f *fakeKernel) DeleteRoutes(rs []nlbatch.Route, errs []error) error {
	for i := range rs {
		errs[i] = f.RouteDel(rs[i].Netlink())
	}
	return nil
}

func (f *fakeKernel) RouteDel(r *netlink.Route) error {
	f.calls = append(f.calls, "del "+f.format(r))
	dst, _ := ip.FromIPNet(r.Dst)
	c, ok := f.routes[dst]
	if !ok || (r.Gw != nil && !r.Gw.Equal(c.Gw)) || (r.LinkIndex != 0 && r.LinkIndex != c.LinkIndex) {
		return unix.ESRCH
	}
	delete(f.routes, dst)
	return nil
}

func (f *fakeKernel) AddrList(link netlink.Link, family int) ([]netlink.Addr, error) {
	var as []netlink.Addr
	for _, p := range f.addrs[link.Attrs().Index] {
		as = append(as, netlink.Addr{IPNet: ip.HostNet(p.Addr(), p.Bits()), LinkIndex: link.Attrs().Index})
	}
	return as, nil
}

// add puts a route in the table behind the backend's back:
// "DST [via GW] dev NAME [scope link]".
func (f *fakeKernel) add(s string) {
	w := strings.Fields(s)
	r := netlink.Route{Table: unix.RT_TABLE_MAIN, Type: unix.RTN_UNICAST}
	r.Dst = ip.IPNet(netip.MustParsePrefix(w[0]))
	for i := 1; i < len(w); i += 2 {
		switch w[i] {
		case "via":
			r.Gw = ip.IP(netip.MustParseAddr(w[i+1]))
		case "dev":
			for idx, n := range f.names {
				if n == w[i+1] {
					r.LinkIndex = idx
				}
			}
		case "scope":
			r.Scope = unix.RT_SCOPE_LINK
		}
	}
	f.routes[netip.MustParsePrefix(w[0])] = r
}

func (f *fakeKernel) format(r *netlink.Route) string {
	s := r.Dst.String()
	if r.Gw != nil {
		s += " via " + r.Gw.String()
	}
	s += " dev " + f.names[r.LinkIndex]
	if r.Scope == unix.RT_SCOPE_LINK {
		s += " scope link"
	}
	return s
}

func (f *fakeKernel) dump() string {
	var lines []string
	for _, r := range f.routes {
		lines = append(lines, f.format(&r))
	}
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}

func (f *fakeKernel) takeCalls() string {
	s := strings.Join(f.calls, "\n")
	f.calls = nil
	return s
}

// logSink collects log lines.
type logSink struct {
	mu    sync.Mutex
	lines []string
}

func (l *logSink) logger() logr.Logger {
	return funcr.New(func(prefix, args string) {
		l.mu.Lock()
		defer l.mu.Unlock()
		l.lines = append(l.lines, args)
	}, funcr.Options{})
}

func (l *logSink) take(substr string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, s := range l.lines {
		if strings.Contains(s, substr) {
			out = append(out, s)
		}
	}
	l.lines = nil
	return out
}

func mustConfig(t testing.TB, s string) *subnet.Config {
	t.Helper()
	c, err := subnet.ParseConfig([]byte(s))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func lease(sub, publicIP, typ string) subnet.Lease {
	return subnet.Lease{
		Subnet: netip.MustParsePrefix(sub),
		Attrs:  subnet.LeaseAttrs{PublicIP: netip.MustParseAddr(publicIP), BackendType: typ},
	}
}

func testOptions(t testing.TB, logs *logSink) backend.Options {
	o := backend.Options{
		Ext: backend.ExternalInterface{
			Iface:     &net.Interface{Index: 2, Name: "eth0", MTU: 1500},
			IfaceAddr: netip.MustParseAddr("192.168.1.1"),
			PublicIP:  netip.MustParseAddr("192.168.1.1"),
		},
		Config: mustConfig(t, `{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}`),
	}
	if logs != nil {
		o.Logger = logs.logger()
	}
	return o
}

// Routes the backend must never touch.
var foreign = []string{
	"192.168.1.0/24 dev eth0 scope link",
	"10.5.1.0/24 dev cni0 scope link",        // own subnet
	"10.5.0.0/16 via 192.168.1.254 dev eth0", // the whole Network
	"10.5.8.0/24 via 10.0.0.8 dev eth1",      // another link
	"172.16.0.0/24 via 192.168.1.7 dev eth0", // outside Network
	"10.5.7.0/24 dev eth0 scope link",        // no gateway
}

func TestApplyStates(t *testing.T) {
	f := newFakeKernel()
	for _, s := range foreign {
		f.add(s)
	}
	f.add("10.5.9.0/24 via 192.168.1.9 dev eth0") // a lease that expired while we were down
	logs := &logSink{}
	b, err := newHostGW(testOptions(t, logs), f)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := b.Init(ctx); err != nil {
		t.Fatal(err)
	}
	own := lease("10.5.1.0/24", "192.168.1.1", Type)

	steps := []struct {
		name      string
		hand      func()
		remote    []subnet.Lease
		wantCalls string
		wantOurs  string
		wantLogs  []string // subnets logged as ignored in this step
	}{
		{
			name: "first apply routes host-gw leases and removes stale routes",
			// The caller admits the leases: none is ours, outside Network
			// or of another type.
			remote: []subnet.Lease{
				lease("10.5.2.0/24", "192.168.1.2", Type),
				lease("10.5.3.0/24", "192.168.1.3", Type),
				lease("10.5.5.0/24", "10.9.9.5", Type), // not on a connected network
			},
			wantCalls: `replace 10.5.2.0/24 via 192.168.1.2 dev eth0
replace 10.5.3.0/24 via 192.168.1.3 dev eth0
del 10.5.9.0/24 via 192.168.1.9 dev eth0`,
			wantOurs: `10.5.2.0/24 via 192.168.1.2 dev eth0
10.5.3.0/24 via 192.168.1.3 dev eth0`,
			wantLogs: []string{"10.5.5.0/24"},
		},
		{
			name: "same leases again: no kernel changes, no new logs",
			remote: []subnet.Lease{
				lease("10.5.3.0/24", "192.168.1.3", Type),
				lease("10.5.2.0/24", "192.168.1.2", Type),
				lease("10.5.5.0/24", "10.9.9.5", Type),
			},
			wantOurs: `10.5.2.0/24 via 192.168.1.2 dev eth0
10.5.3.0/24 via 192.168.1.3 dev eth0`,
		},
		{
			name: "changed PublicIP updates the route; a new lease is routed",
			remote: []subnet.Lease{
				lease("10.5.2.0/24", "192.168.1.2", Type),
				lease("10.5.3.0/24", "192.168.1.33", Type),
				lease("10.5.4.0/24", "192.168.1.4", Type),
				lease("10.5.5.0/24", "10.9.9.5", Type),
			},
			wantCalls: `replace 10.5.3.0/24 via 192.168.1.33 dev eth0
replace 10.5.4.0/24 via 192.168.1.4 dev eth0`,
			wantOurs: `10.5.2.0/24 via 192.168.1.2 dev eth0
10.5.3.0/24 via 192.168.1.33 dev eth0
10.5.4.0/24 via 192.168.1.4 dev eth0`,
		},
		{
			name: "route deleted by hand is restored; lease removed is unrouted",
			hand: func() { delete(f.routes, netip.MustParsePrefix("10.5.2.0/24")) },
			remote: []subnet.Lease{
				lease("10.5.2.0/24", "192.168.1.2", Type),
				lease("10.5.3.0/24", "192.168.1.33", Type),
				lease("10.5.5.0/24", "10.9.9.5", Type),
			},
			wantCalls: `replace 10.5.2.0/24 via 192.168.1.2 dev eth0
del 10.5.4.0/24 via 192.168.1.4 dev eth0`,
			wantOurs: `10.5.2.0/24 via 192.168.1.2 dev eth0
10.5.3.0/24 via 192.168.1.33 dev eth0`,
		},
		{
			name: "a lease skipped again after being fine is logged again",
			remote: []subnet.Lease{
				lease("10.5.2.0/24", "10.9.9.2", Type),
				lease("10.5.3.0/24", "192.168.1.33", Type),
			},
			wantCalls: `del 10.5.2.0/24 via 192.168.1.2 dev eth0`,
			wantOurs:  `10.5.3.0/24 via 192.168.1.33 dev eth0`,
			wantLogs:  []string{"10.5.2.0/24"},
		},
		{
			name:      "no leases",
			wantCalls: `del 10.5.3.0/24 via 192.168.1.33 dev eth0`,
		},
	}
	for _, st := range steps {
		if st.hand != nil {
			st.hand()
		}
		if err := b.Apply(ctx, own, st.remote); err != nil {
			t.Fatalf("%s: Apply: %v", st.name, err)
		}
		if calls := sortedLines(f.takeCalls()); calls != sortedLines(st.wantCalls) {
			t.Errorf("%s: calls:\n%s\nwant:\n%s", st.name, calls, sortedLines(st.wantCalls))
		}
		if ours := ours(t, f); ours != st.wantOurs {
			t.Errorf("%s: routes:\n%s\nwant:\n%s", st.name, ours, st.wantOurs)
		}
		var logged []string
		for _, l := range logs.take(`"msg"="Ignoring lease"`) {
			for _, w := range strings.Fields(l) {
				if s, ok := strings.CutPrefix(w, `"subnet"="`); ok {
					logged = append(logged, strings.TrimSuffix(s, `"`))
				}
			}
		}
		slices.Sort(logged)
		if !slices.Equal(logged, st.wantLogs) {
			t.Errorf("%s: ignored leases logged: %q, want %q", st.name, logged, st.wantLogs)
		}
	}
}

func sortedLines(s string) string {
	l := strings.Split(s, "\n")
	slices.Sort(l)
	return strings.Join(l, "\n")
}

// ours is the table minus the foreign routes, which must all be intact.
func ours(t *testing.T, f *fakeKernel) string {
	t.Helper()
	lines := strings.Split(f.dump(), "\n")
	var out []string
	for _, l := range lines {
		if l != "" && !slices.Contains(foreign, l) {
			out = append(out, l)
		}
	}
	for _, fr := range foreign {
		if !slices.Contains(lines, fr) {
			t.Errorf("foreign route %q was touched", fr)
		}
	}
	return strings.Join(out, "\n")
}

func TestApplyLogsReasons(t *testing.T) {
	f := newFakeKernel()
	logs := &logSink{}
	b, err := newHostGW(testOptions(t, logs), f)
	if err != nil {
		t.Fatal(err)
	}
	err = b.Apply(context.Background(), lease("10.5.1.0/24", "192.168.1.1", Type), []subnet.Lease{
		lease("10.5.5.0/24", "10.9.9.5", Type),
	})
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Join(logs.take("Ignoring lease"), "\n")
	for _, want := range []string{
		`its PublicIP 10.9.9.5 is not on a network directly connected to eth0 ([192.168.1.0/24])`,
	} {
		if !strings.Contains(got, want) {
			t.Errorf("logs lack %q:\n%s", want, got)
		}
	}
}

// A lease the kernel refuses does not stop the others; the error names it.
func TestApplyKeepsGoingWhenTheKernelRefusesOne(t *testing.T) {
	f := newFakeKernel()
	nl := &staleAddrs{fakeKernel: f}
	b, err := newHostGW(testOptions(t, nil), nl)
	if err != nil {
		t.Fatal(err)
	}
	err = b.Apply(context.Background(), lease("10.5.1.0/24", "192.168.1.1", Type), []subnet.Lease{
		lease("10.5.2.0/24", "192.168.1.2", Type),
		lease("10.5.3.0/24", "192.168.2.3", Type),
	})
	if !errors.Is(err, unix.ENETUNREACH) {
		t.Fatalf("err = %v, want ENETUNREACH", err)
	}
	if !strings.Contains(err.Error(), "10.5.3.0/24 via 192.168.2.3") {
		t.Errorf("err = %q does not name the refused route", err)
	}
	if d := f.dump(); d != "10.5.2.0/24 via 192.168.1.2 dev eth0" {
		t.Errorf("routes = %q, want the good lease routed", d)
	}
}

// staleAddrs reports 192.168.1.1/16 on eth0 while the kernel routes only
// 192.168.1.0/24 there: the address changed between the two reads.
type staleAddrs struct{ *fakeKernel }

func (s *staleAddrs) AddrList(link netlink.Link, family int) ([]netlink.Addr, error) {
	return []netlink.Addr{{IPNet: ip.HostNet(netip.MustParseAddr("192.168.1.1"), 16), LinkIndex: 2}}, nil
}

func TestInit(t *testing.T) {
	tests := []struct {
		name    string
		config  string
		edit    func(*backend.Options)
		wantMTU int
		wantErr error
		errHas  []string
	}{
		{name: "defaults", config: `{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}`, wantMTU: 1500},
		{name: "unknown keys ignored", config: `{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw","VNI":7,"Foo":"bar"}}`, wantMTU: 1500},
		{name: "jumbo MTU", config: `{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}`, wantMTU: 9000,
			edit: func(o *backend.Options) { o.Ext.Iface.MTU = 9000 }},
		{
			name:    "public IP is not the interface's",
			config:  `{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}`,
			edit:    func(o *backend.Options) { o.Ext.PublicIP = netip.MustParseAddr("203.0.113.9") },
			wantErr: ErrPublicIP,
			errHas:  []string{"--public-ip 203.0.113.9", "192.168.1.1", "eth0"},
		},
		{
			name:   "no IPv4 address",
			config: `{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}`,
			edit: func(o *backend.Options) {
				o.Ext.IfaceAddr, o.Ext.PublicIP = netip.Addr{}, netip.Addr{}
			},
			errHas: []string{"eth0 has no IPv4 address"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := testOptions(t, nil)
			o.Config = mustConfig(t, tt.config)
			if tt.edit != nil {
				tt.edit(&o)
			}
			b, err := newHostGW(o, newFakeKernel())
			if err != nil {
				t.Fatal(err)
			}
			pub, err := b.Init(context.Background())
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
			if len(tt.errHas) > 0 {
				if err == nil {
					t.Fatal("no error")
				}
				for _, s := range tt.errHas {
					if !strings.Contains(err.Error(), s) {
						t.Errorf("error %q lacks %q", err, s)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if pub.MTU != tt.wantMTU || pub.BackendData != nil {
				t.Errorf("Publish = %+v, want MTU %d and no BackendData", pub, tt.wantMTU)
			}
		})
	}
}

func TestRegistered(t *testing.T) {
	if !slices.Contains(backend.Types(), Type) {
		t.Fatalf("backend types %v lack %s", backend.Types(), Type)
	}
	o := testOptions(t, nil)
	be, err := backend.New(Type, o)
	if err != nil {
		t.Fatal(err)
	}
	if err := be.Close(); err != nil {
		t.Fatal(err)
	}
	if err := be.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	o.Ext.Iface = nil
	if _, err := backend.New(Type, o); err == nil {
		t.Error("New without an interface succeeded")
	}
}

func TestApplyHonoursContext(t *testing.T) {
	f := newFakeKernel()
	b, err := newHostGW(testOptions(t, nil), f)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := b.Apply(ctx, lease("10.5.1.0/24", "192.168.1.1", Type), []subnet.Lease{lease("10.5.2.0/24", "192.168.1.2", Type)}); !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	if f.dumps != 0 || len(f.calls) != 0 {
		t.Errorf("kernel touched after cancel: %d dumps, calls %q", f.dumps, f.calls)
	}
}

func BenchmarkApply(b *testing.B) {
	for _, n := range []int{10000, 50000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			f := newFakeKernel()
			o := testOptions(b, nil)
			o.Config = mustConfig(b, `{"Network":"10.0.0.0/8","Backend":{"Type":"host-gw"}}`)
			o.Ext.Iface.MTU = 1500
			f.addrs[2] = []netip.Prefix{netip.MustParsePrefix("192.168.0.1/16")}
			o.Ext.IfaceAddr = netip.MustParseAddr("192.168.0.1")
			o.Ext.PublicIP = o.Ext.IfaceAddr
			hg, err := newHostGW(o, f)
			if err != nil {
				b.Fatal(err)
			}
			own := lease("10.255.255.0/24", "192.168.0.1", Type)
			remote := make([]subnet.Lease, n)
			for i := range remote {
				remote[i] = subnet.Lease{
					Subnet: netip.PrefixFrom(ip.FromUint32(0x0a000000+uint32(i+1)<<8), 24),
					Attrs:  subnet.LeaseAttrs{PublicIP: ip.FromUint32(0xc0a80000 + uint32(i%60000+2)), BackendType: Type},
				}
			}
			if err := hg.Apply(context.Background(), own, remote); err != nil {
				b.Fatal(err)
			}
			f.calls = nil
			b.ReportAllocs()
			for b.Loop() {
				if err := hg.Apply(context.Background(), own, remote); err != nil {
					b.Fatal(err)
				}
			}
			if len(f.calls) != 0 {
				b.Fatalf("no-op Apply changed the kernel: %d calls", len(f.calls))
			}
		})
	}
}
