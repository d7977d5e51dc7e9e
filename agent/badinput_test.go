package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"k8s.io/klog/v2/ktesting"

	"github.com/flanneld-go/flanneld/backend"
	"github.com/flanneld-go/flanneld/subnet"
	"github.com/flanneld-go/flanneld/subnet/etcdv2"
)

// recordingBackend is the fake-test backend (fakeFor works) with a memory
// of every lease the daemon ever handed it.
type recordingBackend struct {
	backend.Backend

	mu      sync.Mutex
	owns    map[netip.Prefix]bool
	remotes map[netip.Prefix]bool
}

func (r *recordingBackend) Apply(ctx context.Context, own subnet.Lease, remote []subnet.Lease) error {
	r.mu.Lock()
	r.owns[own.Subnet] = true
	for _, l := range remote {
		r.remotes[l.Subnet] = true
	}
	r.mu.Unlock()
	return r.Backend.Apply(ctx, own, remote)
}

func (r *recordingBackend) seen() (owns, remotes []netip.Prefix) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for p := range r.owns {
		owns = append(owns, p)
	}
	for p := range r.remotes {
		remotes = append(remotes, p)
	}
	return owns, remotes
}

var (
	recordersMu sync.Mutex
	recorders   = map[string]*recordingBackend{} // by test name
)

func init() {
	backend.Register("fake-recording", func(o backend.Options) (backend.Backend, error) {
		be, err := backend.New("fake-test", o)
		if err != nil {
			return nil, err
		}
		var name struct{ Test string }
		if err := json.Unmarshal(o.Config.Backend, &name); err != nil {
			return nil, err
		}
		r := &recordingBackend{Backend: be, owns: map[netip.Prefix]bool{}, remotes: map[netip.Prefix]bool{}}
		recordersMu.Lock()
		recorders[name.Test] = r
		recordersMu.Unlock()
		return r, nil
	})
}

func recorderFor(t *testing.T) *recordingBackend {
	t.Helper()
	recordersMu.Lock()
	defer recordersMu.Unlock()
	r := recorders[t.Name()]
	if r == nil {
		t.Fatal("the fake-recording backend was not created")
	}
	return r
}

// recordingConfig is the lab's network config with the recording backend
// (own lease from 10.5.100.0-10.5.199.0, as in config).
func (l *lab) recordingConfig() {
	l.set("config", `{"Network":"10.5.0.0/16","SubnetMin":"10.5.100.0","SubnetMax":"10.5.199.0","Backend":{"Type":"fake-recording","Test":"`+l.t.Name()+`"}}`, 0)
}

// startLogged is l.start with a logger whose lines the test can read
// (l.start logs to the test only).
func (l *lab) startLogged(o Options) (*running, ktesting.Buffer) {
	l.t.Helper()
	log := ktesting.NewLogger(l.t, ktesting.NewConfig(ktesting.BufferLogs(true)))
	o.Logger = &log
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{cancel: cancel, done: make(chan error, 1), ready: make(chan struct{})}
	if o.Manager == nil {
		o.Manager = l.mgr
	}
	if o.Ext.Iface == nil {
		o.Ext = backend.ExternalInterface{Iface: &net.Interface{Name: "eth0", Index: 2, MTU: 1500},
			IfaceAddr: netip.MustParseAddr("192.168.8.1"), PublicIP: netip.MustParseAddr("192.168.8.1")}
	}
	if o.SubnetFile == "" {
		o.SubnetFile = filepath.Join(l.dir, "subnet.env")
	}
	o.OnReady = func() { close(r.ready) }
	o.Coalesce = time.Millisecond
	go func() { r.done <- Run(ctx, o) }()
	l.t.Cleanup(func() {
		cancel()
		select {
		case <-r.done:
		case <-time.After(10 * time.Second):
			l.t.Error("daemon did not stop")
		}
	})
	return r, log.GetSink().(ktesting.Underlier).GetBuffer()
}

// countLog counts the entries of buf whose message contains msg and whose
// parameter key, printed, equals value ("" matches any).
func countLog(buf ktesting.Buffer, msg, key, value string) int {
	n := 0
	for _, e := range buf.Data() {
		if !strings.Contains(e.Message, msg) {
			continue
		}
		if key == "" {
			n++
			continue
		}
		kv := e.ParameterKVList
		for i := 0; i+1 < len(kv); i += 2 {
			if kv[i] == key && fmt.Sprint(kv[i+1]) == value {
				n++
				break
			}
		}
	}
	return n
}

const skipMsg = "Skipping a lease; fix or remove it in the store"

// TestRunSkipsBadLeases runs a node among leases that do not fit the
// network (outside it, another length, overlapping) or do not parse (an
// IPv6 PublicIP, an IPv6 key), present at start and written while it runs:
// none reaches the backend, each is logged once however often the daemon
// resyncs, and the node keeps running on its first lease.
func TestRunSkipsBadLeases(t *testing.T) {
	l := newLab(t)
	mgrLog := ktesting.NewLogger(t, ktesting.NewConfig(ktesting.BufferLogs(true)))
	mgr, err := etcdv2.New(etcdv2.Options{Endpoints: l.etcd.Endpoints(), Logger: mgrLog})
	if err != nil {
		t.Fatal(err)
	}
	mgrBuf := mgrLog.GetSink().(ktesting.Underlier).GetBuffer()
	l.recordingConfig()

	good := `{"PublicIP":"192.168.8.%d","BackendType":"fake-recording"}`
	l.set("subnets/10.5.5.0-24", fmt.Sprintf(good, 5), time.Hour)
	// Bad for the daemon: well-formed keys that do not fit the config.
	badFit := map[string]string{
		"10.9.0.0-24":  `{"PublicIP":"192.168.8.9"}`,  // outside Network
		"10.5.9.0-26":  `{"PublicIP":"192.168.8.1"}`,  // another SubnetLen, our own PublicIP
		"10.5.16.0-20": `{"PublicIP":"192.168.8.16"}`, // overlaps sixteen /24s
	}
	// Bad for the watcher: they never become leases.
	badParse := map[string]string{
		"10.5.7.0-24": `{"PublicIP":"fd00::7"}`,
		"fd00::-64":   `{"PublicIP":"192.168.8.64"}`,
	}
	for k, v := range badFit {
		l.set("subnets/"+k, v, time.Hour)
	}
	for k, v := range badParse {
		l.set("subnets/"+k, v, time.Hour)
	}

	var acquired atomic.Int32
	r, log := l.startLogged(Options{Manager: mgr, RouteResync: 20 * time.Millisecond, OnLease: func(subnet.Lease) { acquired.Add(1) }})
	r.waitReady(t)
	rec, fb := recorderFor(t), fakeFor(t)
	own, remote, _ := fb.state()
	if remote != "10.5.5.0/24" {
		t.Errorf("first Apply remote = %q, want only 10.5.5.0/24", remote)
	}
	for _, c := range []string{"10.5.9.0/26", "10.5.16.0/20", "10.5.7.0/24"} {
		if own.Subnet.Overlaps(netip.MustParsePrefix(c)) {
			t.Errorf("own lease %v overlaps %v, which a key claims", own.Subnet, c)
		}
	}

	// While it runs: a /16 over everything (our lease included), another
	// IPv6 PublicIP, another foreign network; then a good lease.
	badFit["10.5.0.0-16"] = `{"PublicIP":"192.168.8.100"}`
	badFit["10.10.0.0-24"] = `{"PublicIP":"192.168.8.10"}`
	badParse["10.5.6.0-24"] = `{"PublicIP":"fd00::6"}`
	for _, k := range []string{"10.5.0.0-16", "10.10.0.0-24", "10.5.6.0-24"} {
		l.set("subnets/"+k, badFit[k]+badParse[k], time.Hour)
	}
	l.set("subnets/10.5.8.0-24", fmt.Sprintf(good, 8), time.Hour)
	eventually(t, "the good lease applied", func() bool { _, r, _ := fb.state(); return r == "10.5.5.0/24 10.5.8.0/24" })

	// Renewed and changed versions of the misfits are events again; then
	// many resyncs.
	for k, v := range badFit {
		l.set("subnets/"+k, v, time.Hour)
		l.set("subnets/"+k, strings.Replace(v, "}", `,"BackendType":"fake-logged"}`, 1), time.Hour)
	}
	l.set("subnets/10.5.11.0-24", fmt.Sprintf(good, 11), time.Hour)
	eventually(t, "the last good lease applied", func() bool { _, r, _ := fb.state(); return r == "10.5.11.0/24 10.5.5.0/24 10.5.8.0/24" })
	_, _, applies := fb.state()
	eventually(t, "ten resyncs", func() bool { _, _, n := fb.state(); return n >= applies+10 })

	select {
	case err := <-r.done:
		t.Fatalf("daemon ended: %v", err)
	default:
	}
	owns, remotes := rec.seen()
	if len(owns) != 1 || owns[0] != own.Subnet || acquired.Load() != 1 {
		t.Errorf("own leases applied %v, acquired %d times; want only %v, once", owns, acquired.Load(), own.Subnet)
	}
	for _, p := range remotes {
		switch p.String() {
		case "10.5.5.0/24", "10.5.8.0/24", "10.5.11.0/24":
		default:
			t.Errorf("%v was handed to the backend", p)
		}
	}
	for k := range badFit {
		s := strings.Replace(k, "-", "/", 1)
		if n := countLog(log, skipMsg, "subnet", s); n != 1 {
			t.Errorf("%s: logged %d times by the daemon, want once", s, n)
		}
	}
	if n := countLog(log, skipMsg, "", ""); n != len(badFit) {
		t.Errorf("%d skip lines, want %d", n, len(badFit))
	}
	for k := range badParse {
		key := "/coreos.com/network/subnets/" + k
		if n := countLog(mgrBuf, "Skipping a key under the subnets prefix", "key", key); n != 1 {
			t.Errorf("%s: logged %d times by the watcher, want once", key, n)
		}
	}
	resp, err := l.keys.Get(context.Background(), "/coreos.com/network/subnets/"+strings.Replace(own.Subnet.String(), "/", "-", 1), nil)
	if err != nil || !strings.Contains(resp.Node.Value, `"PublicIP":"192.168.8.1"`) {
		t.Errorf("own lease key: %v, %v", resp, err)
	}
}

// TestRunSkipsUnusablePublicIPs runs a dual-stack node among leases that
// another etcd client wrote with a PublicIP or PublicIPv6 no node can have
// (unspecified, loopback, multicast, broadcast, link-local), present at
// start and written while it runs: none reaches the backend, each is logged
// once naming the address, and the good leases around them are applied.
func TestRunSkipsUnusablePublicIPs(t *testing.T) {
	l := newLab(t)
	l.set("config", `{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"fake-recording","Test":"`+t.Name()+`"}}`, 0)
	// key: dual-stack keys name the IPv4 and the IPv6 subnet.
	key := func(i int) string { return fmt.Sprintf("subnets/10.5.%d.0-24&fc00:0:0:%x::-64", i, i) }
	value := func(pub, pub6 string) string {
		return fmt.Sprintf(`{"PublicIP":%q,"PublicIPv6":%q,"BackendType":"fake-recording"}`, pub, pub6)
	}
	type lease struct{ pub, pub6, why string } // why: the skip line's reason
	bad := map[int]lease{                      // by third octet
		20: {"127.0.0.1", "fd5e::20", "its PublicIP 127.0.0.1 is not a usable unicast address (loopback)"},
		21: {"224.0.0.1", "fd5e::21", "its PublicIP 224.0.0.1 is not a usable unicast address (multicast)"},
		22: {"0.0.0.0", "fd5e::22", "its PublicIP 0.0.0.0 is not a usable unicast address (unspecified)"},
		23: {"255.255.255.255", "fd5e::23", "its PublicIP 255.255.255.255 is not a usable unicast address (broadcast)"},
		24: {"169.254.3.4", "fd5e::24", "its PublicIP 169.254.3.4 is not a usable unicast address (link-local)"},
		25: {"172.30.0.25", "::1", "its PublicIPv6 ::1 is not a usable unicast address (loopback)"},
		26: {"172.30.0.26", "ff02::1", "its PublicIPv6 ff02::1 is not a usable unicast address (multicast)"},
		27: {"172.30.0.27", "fe80::1", "its PublicIPv6 fe80::1 is not a usable unicast address (link-local)"},
		28: {"172.30.0.28", "::", "its PublicIPv6 :: is not a usable unicast address (unspecified)"},
	}
	later := map[int]lease{
		29: {"127.0.0.53", "fd5e::29", "its PublicIP 127.0.0.53 is not a usable unicast address (loopback)"},
		30: {"172.30.0.30", "ff05::2", "its PublicIPv6 ff05::2 is not a usable unicast address (multicast)"},
	}
	for i, a := range bad {
		l.set(key(i), value(a.pub, a.pub6), time.Hour)
	}
	l.set(key(5), value("172.30.0.5", "fd5e::5"), time.Hour)

	ext := backend.ExternalInterface{Iface: &net.Interface{Name: "eth0", Index: 2, MTU: 1500},
		IfaceAddr: netip.MustParseAddr("192.168.8.1"), PublicIP: netip.MustParseAddr("192.168.8.1"),
		IfaceAddrV6: netip.MustParseAddr("fd5e::1"), PublicIPv6: netip.MustParseAddr("fd5e::1")}
	r, log := l.startLogged(Options{Ext: ext, RouteResync: 20 * time.Millisecond})
	r.waitReady(t)
	fb := fakeFor(t)
	own, remote, _ := fb.state()
	if remote != "10.5.5.0/24" {
		t.Errorf("first Apply remote = %q, want only 10.5.5.0/24", remote)
	}
	// The leases written while it runs, on subnets other than its own.
	free := func(i int) int {
		if own.Subnet == netip.MustParsePrefix(fmt.Sprintf("10.5.%d.0/24", i)) {
			return i + 100
		}
		return i
	}
	for i, a := range later {
		bad[free(i)] = a
		l.set(key(free(i)), value(a.pub, a.pub6), time.Hour)
	}
	good := fmt.Sprintf("10.5.%d.0/24", free(8))
	l.set(key(free(8)), value("172.30.0.8", "fd5e::8"), time.Hour)
	want := []string{"10.5.5.0/24", good}
	sort.Strings(want) // as fakeBackend lists them
	eventually(t, "the good lease applied", func() bool { _, r, _ := fb.state(); return r == strings.Join(want, " ") })
	_, _, applies := fb.state()
	eventually(t, "ten resyncs", func() bool { _, _, n := fb.state(); return n >= applies+10 })

	_, remotes := recorderFor(t).seen()
	for _, p := range remotes {
		if s := p.String(); s != "10.5.5.0/24" && s != good {
			t.Errorf("%v was handed to the backend", p)
		}
	}
	for i, a := range bad {
		sub := fmt.Sprintf("10.5.%d.0/24", i)
		if n := countLog(log, skipMsg, "subnet", sub); n != 1 {
			t.Errorf("%s: logged %d times, want once", sub, n)
		}
		if n := countLog(log, skipMsg, "reason", a.why); n != 1 {
			t.Errorf("%s: %d skip lines with the reason %q, want one:\n%s", sub, n, a.why, log.String())
		}
	}
	if n := countLog(log, skipMsg, "", ""); n != len(bad) {
		t.Errorf("%d skip lines, want %d", n, len(bad))
	}
}

// TestRunIgnoresBadSubnetFile starts the daemon over a previous subnet.env
// that is garbage, for another network, IPv6, or names a subnet this
// config cannot lease. Each time the node starts, picks a fresh subnet
// (not the one the file names, which lies outside the random picks), and
// writes a good file; a file it cannot read is logged once.
func TestRunIgnoresBadSubnetFile(t *testing.T) {
	tests := []struct {
		name, content string
		logged        string // the daemon's log message, "" for none
	}{
		{"binary garbage", "\x00\x01\x02garbage\xff\n", "Ignoring the previous subnet file"},
		{"empty", "", "Ignoring the previous subnet file"},
		{"bad MTU", "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.200.1/24\nFLANNEL_MTU=banana\n", "Ignoring the previous subnet file"},
		{"other network", "FLANNEL_NETWORK=10.6.0.0/16\nFLANNEL_SUBNET=10.5.200.1/24\nFLANNEL_MTU=1400\nFLANNEL_IPMASQ=false\n", "Previous subnet file is for another network"},
		{"IPv6 network", "FLANNEL_NETWORK=fd00::/64\nFLANNEL_SUBNET=fd00::1/80\n", "Ignoring the previous subnet file"},
		{"IPv6 subnet", "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=fd00::1/80\n", "Ignoring the previous subnet file"},
		{"a /32", "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.200.1/32\n", "Ignoring the previous subnet file"},
		{"a /26", "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.200.1/26\n", ""},
		{"outside the network", "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.6.200.1/24\n", ""},
		{"1 MB line", "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.200.1/24\n#" + strings.Repeat("x", 1<<20) + "\n", "Ignoring the previous subnet file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := newLab(t)
			l.recordingConfig()
			file := filepath.Join(l.dir, "subnet.env")
			if err := os.WriteFile(file, []byte(tt.content), 0o644); err != nil {
				t.Fatal(err)
			}
			r, log := l.startLogged(Options{SubnetFile: file})
			r.waitReady(t)
			own, _, _ := fakeFor(t).state()
			cfg, _ := subnet.ParseConfig([]byte(`{"Network":"10.5.0.0/16"}`))
			if !cfg.InRange(own.Subnet) || own.Subnet == netip.MustParsePrefix("10.5.200.0/24") {
				t.Errorf("own lease %v: want a fresh one, not the file's 10.5.200.0/24", own.Subnet)
			}
			env, err := subnet.ReadEnv(file)
			if err != nil || env.Subnet != own.Subnet || env.Network != cfg.Network || env.MTU != 1400 {
				t.Errorf("subnet.env after start = %+v, %v; want the new lease %v", env, err, own.Subnet)
			}
			n := 0
			if tt.logged != "" {
				n = countLog(log, tt.logged, "", "")
				if n != 1 {
					t.Errorf("%q logged %d times, want once", tt.logged, n)
				}
			}
			if m := countLog(log, "previous subnet file", "", "") + countLog(log, "Previous subnet file", "", ""); m != n {
				t.Errorf("%d lines about the previous file, want %d", m, n)
			}
			for _, e := range log.Data() {
				if line := fmt.Sprint(e.ParameterKVList...); len(line) > 1024 {
					t.Errorf("log %q has %d bytes of parameters, want a short line", e.Message, len(line))
				}
			}
		})
	}
}
