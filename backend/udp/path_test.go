package udp

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/flanneld-go/flanneld/pkg/ip"
	"github.com/flanneld-go/flanneld/subnet"
)

func a4(s string) uint32 { return ip.Uint32(netip.MustParseAddr(s)) }

func testTable() *table {
	return newTable(map[netip.Prefix]netip.Addr{
		netip.MustParsePrefix("10.5.2.0/24"):   netip.MustParseAddr("192.0.2.2"),
		netip.MustParsePrefix("10.5.3.0/24"):   netip.MustParseAddr("192.0.2.3"),
		netip.MustParsePrefix("10.5.4.0/24"):   netip.MustParseAddr("192.0.2.3"), // two leases, one node
		netip.MustParsePrefix("10.7.0.0/16"):   netip.MustParseAddr("192.0.2.7"),
		netip.MustParsePrefix("10.7.9.0/24"):   netip.MustParseAddr("192.0.2.9"), // nested: longest wins
		netip.MustParsePrefix("2001:db8::/64"): netip.MustParseAddr("192.0.2.6"), // skipped
	}, 8285)
}

func TestTableLookup(t *testing.T) {
	tb := testTable()
	for _, tc := range []struct {
		dst, want string // want: the peer's public IP, "" for none
	}{
		{"10.5.2.0", "192.0.2.2"},
		{"10.5.2.255", "192.0.2.2"},
		{"10.5.3.7", "192.0.2.3"},
		{"10.5.4.7", "192.0.2.3"},
		{"10.5.5.1", ""},
		{"10.5.1.1", ""},
		{"10.7.1.1", "192.0.2.7"},
		{"10.7.9.1", "192.0.2.9"},
		{"10.8.0.1", ""},
	} {
		i := tb.lookup(a4(tc.dst))
		got := ""
		if i >= 0 {
			got = ip.FromUint32(tb.peers[i].publicIP).String()
			sa := tb.peers[i].sa
			port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])
			if sa.Family != unix.AF_INET || netip.AddrFrom4(sa.Addr).String() != got || port != 8285 {
				t.Errorf("%s: sockaddr %+v does not match peer %s:8285", tc.dst, sa, got)
			}
		}
		if got != tc.want {
			t.Errorf("lookup(%s) = %q, want %q", tc.dst, got, tc.want)
		}
	}
	if got := tb.lens; len(got) != 2 || got[0] != 24 || got[1] != 16 {
		t.Errorf("prefix lengths %v, want [24 16]", got)
	}
	if empty := newTable(nil, 1); empty.lookup(a4("10.5.2.1")) != -1 || empty.check(a4("192.0.2.2"), a4("10.5.2.1")) != unknownSender {
		t.Error("empty table matched something")
	}
}

func TestTableCheck(t *testing.T) {
	tb := testTable()
	for _, tc := range []struct {
		from, src string
		want      verdict
	}{
		{"192.0.2.2", "10.5.2.9", accept},
		{"192.0.2.2", "10.5.3.9", spoofedSource},
		{"192.0.2.3", "10.5.3.9", accept},
		{"192.0.2.3", "10.5.4.9", accept},
		{"192.0.2.3", "10.5.2.9", spoofedSource},
		{"192.0.2.99", "10.5.2.9", unknownSender},
		{"192.0.2.7", "10.7.9.1", accept}, // inside its /16
		{"192.0.2.9", "10.7.1.1", spoofedSource},
		{"192.0.2.6", "10.5.2.1", unknownSender}, // its lease was not IPv4
	} {
		if got := tb.check(a4(tc.from), a4(tc.src)); got != tc.want {
			t.Errorf("check(from %s, src %s) = %d, want %d", tc.from, tc.src, got, tc.want)
		}
	}
}

func TestTableLookupDoesNotAllocate(t *testing.T) {
	tb := testTable()
	dst, from, src := a4("10.7.9.1"), a4("192.0.2.3"), a4("10.5.4.1")
	if n := testing.AllocsPerRun(1000, func() {
		_ = tb.lookup(dst)
		_ = tb.check(from, src)
	}); n != 0 {
		t.Fatalf("lookup and check allocate %v times per run", n)
	}
}

func newTestPath(strict bool) *path {
	p := &path{log: klog.Background(), strict: strict}
	p.table.Store(testTable())
	return p
}

func TestOutbound(t *testing.T) {
	p := newTestPath(true)
	tb := p.table.Load()
	src := [4]byte{10, 5, 1, 5}
	ok := mkIPv4(src, [4]byte{10, 5, 3, 1}, protoTCP, 64, nil, []byte("payload"))
	padded := append(bytes.Clone(ok), 0xee, 0xee)
	idx, out, v := p.outbound(tb, padded)
	if v != outSend || ip.FromUint32(tb.peers[idx].publicIP).String() != "192.0.2.3" {
		t.Fatalf("outbound = %d, %v, want send to 192.0.2.3", idx, v)
	}
	if len(out) != len(ok) || out[8] != 63 || !headerChecksumOK(out[:20]) {
		t.Fatalf("sent packet: len %d (want %d), TTL %d (want 63), checksum ok %v", len(out), len(ok), out[8], headerChecksumOK(out[:20]))
	}

	_, out, v = p.outbound(tb, mkIPv4(src, [4]byte{10, 5, 99, 1}, protoTCP, 64, nil, nil))
	if v != outUnreachable || out == nil {
		t.Fatalf("unknown destination: verdict %v, want outUnreachable", v)
	}
	if _, _, v = p.outbound(tb, mkIPv4(src, [4]byte{10, 5, 3, 1}, protoTCP, 1, nil, nil)); v != outDrop {
		t.Fatalf("TTL 1: verdict %v, want drop", v)
	}
	v6 := make([]byte, 40)
	v6[0] = 0x60
	if _, _, v = p.outbound(tb, v6); v != outDrop {
		t.Fatalf("IPv6: verdict %v, want drop", v)
	}
	if _, _, v = p.outbound(tb, ok[:10]); v != outDrop {
		t.Fatalf("truncated: verdict %v, want drop", v)
	}
	s := p.ctr.snapshot()
	if s.NoRoute != 1 || s.TTL != 1 || s.NonIPv4 != 1 || s.Malformed != 1 {
		t.Fatalf("counters %+v, want one each of no route, ttl, non-ipv4, malformed", s)
	}
}

func TestInbound(t *testing.T) {
	from := a4("192.0.2.2")
	good := func() []byte {
		return mkIPv4([4]byte{10, 5, 2, 7}, [4]byte{10, 5, 1, 1}, protoUDP, 9, nil, []byte("x"))
	}
	badSum := good()
	badSum[10] ^= 0xff
	padded := append(good(), 0)
	for _, tc := range []struct {
		name   string
		strict bool
		from   uint32
		pkt    []byte
		ok     bool
		count  func(Stats) uint64
	}{
		{"accepted", true, from, good(), true, nil},
		{"unknown sender", true, a4("198.51.100.1"), good(), false, func(s Stats) uint64 { return s.UnknownSender }},
		{"spoofed", true, a4("192.0.2.3"), good(), false, func(s Stats) uint64 { return s.SpoofedSource }},
		{"not strict: unknown sender passes", false, a4("198.51.100.1"), good(), true, nil},
		{"not strict: spoofed passes", false, a4("192.0.2.3"), good(), true, nil},
		{"bad header checksum", true, from, badSum, false, func(s Stats) uint64 { return s.Malformed }},
		{"bytes after the packet", true, from, padded, false, func(s Stats) uint64 { return s.Malformed }},
		{"ipv6", true, from, append([]byte{0x60}, make([]byte, 39)...), false, func(s Stats) uint64 { return s.NonIPv4 }},
		{"empty", true, from, nil, false, func(s Stats) uint64 { return s.NonIPv4 }},
		{"ttl 1", true, from, mkIPv4([4]byte{10, 5, 2, 7}, [4]byte{10, 5, 1, 1}, protoUDP, 1, nil, nil), false, func(s Stats) uint64 { return s.TTL }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newTestPath(tc.strict)
			out, ok := p.inbound(p.table.Load(), tc.from, tc.pkt)
			if ok != tc.ok {
				t.Fatalf("inbound ok = %v, want %v", ok, tc.ok)
			}
			if ok && (out[8] != 8 || !headerChecksumOK(out[:20])) {
				t.Fatalf("accepted packet has TTL %d (want 8), checksum ok %v", out[8], headerChecksumOK(out[:20]))
			}
			if tc.count != nil && tc.count(p.ctr.snapshot()) != 1 {
				t.Fatalf("drop not counted: %+v", p.ctr.snapshot())
			}
		})
	}
}

// recordingWriter returns a tunWriter that records each write, the
// concatenation of its pieces, instead of writing to a TUN. fail, when
// set, makes writes fail.
func recordingWriter(vnet bool, fail *error) (*tunWriter, *[][]byte) {
	var writes [][]byte
	w := &tunWriter{vnet: vnet, pieces: make([][]byte, 0, maxCoalesceSegs+2)}
	w.write = func(pieces [][]byte) error {
		if fail != nil && *fail != nil {
			return *fail
		}
		var b []byte
		for _, p := range pieces {
			b = append(b, p...)
		}
		writes = append(writes, b)
		return nil
	}
	return w, &writes
}

// splitWrite undoes what a vnet tunWriter wrote: it checks the virtio
// header and, for a GSO TCPv4 write, cuts the super-packet back into
// segments with their own lengths, IDs, sequence numbers and checksums,
// the way the kernel segments it.
func splitWrite(t testing.TB, b []byte) [][]byte {
	t.Helper()
	if len(b) < virtioHdrLen {
		t.Fatalf("write of %d bytes has no virtio header", len(b))
	}
	v, pkt := b[:virtioHdrLen], b[virtioHdrLen:]
	if v[1] == virtioGSONone {
		if v[0] != 0 {
			t.Fatalf("single packet with virtio flags %#x", v[0])
		}
		return [][]byte{pkt}
	}
	if v[0] != virtioNeedsCsum || v[1] != virtioGSOTCPv4 {
		t.Fatalf("virtio header % x: want NEEDS_CSUM and GSO_TCPV4", v)
	}
	hdrLen := int(binary.NativeEndian.Uint16(v[2:]))
	gso := int(binary.NativeEndian.Uint16(v[4:]))
	cstart, coff := int(binary.NativeEndian.Uint16(v[6:])), int(binary.NativeEndian.Uint16(v[8:]))
	hl := int(pkt[0]&0xf) * 4
	if cstart != hl || coff != 16 || hdrLen <= hl || gso == 0 {
		t.Fatalf("virtio header % x does not fit the packet (ip header %d)", v, hl)
	}
	if int(binary.BigEndian.Uint16(pkt[2:])) != len(pkt) || !headerChecksumOK(pkt[:hl]) {
		t.Fatalf("super-packet has IP length %d for %d bytes, header checksum ok %v", binary.BigEndian.Uint16(pkt[2:]), len(pkt), headerChecksumOK(pkt[:hl]))
	}
	// The partial checksum is the pseudo-header sum over the whole TCP
	// length.
	if got, want := binary.BigEndian.Uint16(pkt[hl+16:]), fold(pseudoSum(pkt, protoTCP, len(pkt)-hl)); got != want {
		t.Fatalf("partial TCP checksum %#04x, want %#04x", got, want)
	}
	var out [][]byte
	seq := binary.BigEndian.Uint32(pkt[hl+4:])
	id := binary.BigEndian.Uint16(pkt[4:])
	for off, i := hdrLen, 0; off < len(pkt); off, i = off+gso, i+1 {
		end := min(off+gso, len(pkt))
		s := append(bytes.Clone(pkt[:hdrLen]), pkt[off:end]...)
		binary.BigEndian.PutUint16(s[2:], uint16(len(s)))
		binary.BigEndian.PutUint16(s[4:], id+uint16(i))
		binary.BigEndian.PutUint16(s[10:], 0)
		binary.BigEndian.PutUint16(s[10:], checksum(s[:hl]))
		binary.BigEndian.PutUint32(s[hl+4:], seq+uint32(off-hdrLen))
		if end < len(pkt) {
			s[hl+13] &^= tcpFlagPSH
		}
		binary.BigEndian.PutUint16(s[hl+16:], 0)
		binary.BigEndian.PutUint16(s[hl+16:], ^fold(sum(s[hl:], pseudoSum(s, protoTCP, len(s)-hl))))
		out = append(out, s)
	}
	return out
}

func TestReceiveSplitsGROSegments(t *testing.T) {
	p := newTestPath(true)
	out, writes := recordingWriter(false, nil)
	var data []byte
	var want [][]byte
	for i := 0; i < 5; i++ {
		n := 1000
		if i == 4 {
			n = 300 // the last segment is shorter
		}
		pkt := mkIPv4([4]byte{10, 5, 2, byte(i + 1)}, [4]byte{10, 5, 1, 1}, protoTCP, 64, nil, make([]byte, n-20))
		if i == 2 {
			pkt[12] = 11 // spoofed: 11.5.2.3
			binary.BigEndian.PutUint16(pkt[10:], 0)
			binary.BigEndian.PutUint16(pkt[10:], checksum(pkt[:20]))
		} else {
			w := bytes.Clone(pkt)
			decTTL(w)
			want = append(want, w)
		}
		data = append(data, pkt...)
	}
	p.receive(p.table.Load(), a4("192.0.2.2"), data, 1000, out)
	p.flushTUN(out)
	if len(*writes) != len(want) {
		t.Fatalf("wrote %d packets, want %d", len(*writes), len(want))
	}
	for i := range want {
		if !bytes.Equal((*writes)[i], want[i]) {
			t.Fatalf("packet %d differs", i)
		}
	}
	s := p.ctr.snapshot()
	if s.UDPReceived != 5 || s.TUNWritten != 4 || s.SpoofedSource != 1 {
		t.Fatalf("counters %+v", s)
	}
	// A TUN write error is counted, not fatal.
	fail := errors.New("boom")
	out, _ = recordingWriter(false, &fail)
	p.receive(p.table.Load(), a4("192.0.2.2"), bytes.Clone(want[0]), 0, out)
	p.flushTUN(out)
	if s := p.ctr.snapshot(); s.TUNWriteErrors != 1 || s.TUNWritten != 4 {
		t.Fatalf("TUN write error not counted: %+v", s)
	}
}

func TestSendBatchGrouping(t *testing.T) {
	tb := testTable()
	pa, pb := peerFor(t, tb, "10.5.2.1"), peerFor(t, tb, "10.5.3.1")
	c := &sockConn{}
	c.gso.Store(true)
	s := newSendBatch(c, 256)
	pk := func(n int) []byte { return make([]byte, n) }
	// Run 1: pa 1000,1000,1000,400 (closed by the short one).
	// Run 2: pa 1000 (new run after the short one).
	// Run 3: pb 1000.
	// Run 4: pb 1200 (larger than the run's size).
	// Run 5..: pa 70 x 900, split at 64 segments (57600 bytes fit).
	for _, n := range []int{1000, 1000, 1000, 400} {
		s.add(pa, pk(n))
	}
	s.add(pa, pk(1000))
	s.add(pb, pk(1000))
	s.add(pb, pk(1200))
	for i := 0; i < 70; i++ {
		s.add(pa, pk(900))
	}
	type m struct{ count, seg int }
	var got []m
	for _, x := range s.msgs {
		got = append(got, m{x.count, x.seg})
	}
	want := []m{{4, 1000}, {1, 1000}, {1, 1000}, {1, 1200}, {64, 900}, {6, 900}}
	if len(got) != len(want) {
		t.Fatalf("messages %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("messages %v, want %v", got, want)
		}
	}
	nh := s.pack(true, 0)
	if nh != len(want) {
		t.Fatalf("GSO pack: %d headers, want %d", nh, len(want))
	}
	for i, w := range want {
		h := &s.hdrs[i]
		if int(h.Hdr.Iovlen) != w.count {
			t.Fatalf("header %d: %d iovecs, want %d", i, h.Hdr.Iovlen, w.count)
		}
		seg := 0
		if h.Hdr.Controllen > 0 {
			oob := unsafe.Slice(h.Hdr.Control, h.Hdr.Controllen)
			cm := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
			if cm.Level != unix.SOL_UDP || cm.Type != unix.UDP_SEGMENT {
				t.Fatalf("header %d: cmsg %d/%d, want UDP_SEGMENT", i, cm.Level, cm.Type)
			}
			seg = int(*(*uint16)(unsafe.Pointer(&oob[unix.CmsgLen(0)])))
		}
		if (w.count > 1) != (seg != 0) || (seg != 0 && seg != w.seg) {
			t.Fatalf("header %d: UDP_SEGMENT %d for %d segments of %d", i, seg, w.count, w.seg)
		}
	}
	// Without GSO every packet is its own message, in order.
	if nh := s.pack(false, 0); nh != s.npkts || nh != 77 {
		t.Fatalf("plain pack: %d headers for %d packets", nh, s.npkts)
	}
	for i := 0; i < s.npkts; i++ {
		if s.hdrs[i].Hdr.Iovlen != 1 || s.hdrs[i].Hdr.Iov != &s.iovs[i] || s.hdrs[i].Hdr.Controllen != 0 {
			t.Fatalf("plain header %d: %+v", i, s.hdrs[i].Hdr)
		}
	}
	// Packing what is left after 2 messages went out: the rest, one each.
	if nh := s.pack(false, 2); nh != 77-5 {
		t.Fatalf("plain pack from message 2: %d headers, want %d", nh, 77-5)
	}
	s.reset()
	if s.npkts != 0 || len(s.msgs) != 0 {
		t.Fatal("reset left packets queued")
	}
	// With GSO off, nothing is grouped.
	c.gso.Store(false)
	s.add(pa, pk(1000))
	s.add(pa, pk(1000))
	if len(s.msgs) != 2 {
		t.Fatalf("GSO off: %d messages, want 2", len(s.msgs))
	}
}

func TestGROSize(t *testing.T) {
	oob := make([]byte, unix.CmsgSpace(4)+unix.CmsgSpace(4))
	put := func(off int, level, typ int32, v int32) {
		cm := (*unix.Cmsghdr)(unsafe.Pointer(&oob[off]))
		cm.Level, cm.Type = level, typ
		cm.SetLen(unix.CmsgLen(4))
		*(*int32)(unsafe.Pointer(&oob[off+unix.CmsgLen(0)])) = v
	}
	put(0, unix.SOL_IP, unix.IP_TTL, 9)
	put(unix.CmsgSpace(4), unix.SOL_UDP, unix.UDP_GRO, 1400)
	if got := groSize(oob); got != 1400 {
		t.Fatalf("groSize = %d, want 1400", got)
	}
	if got := groSize(oob[:unix.CmsgSpace(4)]); got != 0 {
		t.Fatalf("groSize without UDP_GRO = %d", got)
	}
	if got := groSize(nil); got != 0 {
		t.Fatalf("groSize(nil) = %d", got)
	}
	bad := bytes.Clone(oob)
	(*unix.Cmsghdr)(unsafe.Pointer(&bad[0])).SetLen(1 << 20)
	if got := groSize(bad); got != 0 {
		t.Fatalf("groSize with a bad length = %d", got)
	}
}

func TestParseConfig(t *testing.T) {
	def := config{Port: 8285, TUNOffload: true, UDPGSO: true, UDPGRO: true, StrictSource: true}
	for _, tc := range []struct {
		raw  string
		want config
	}{
		{``, def},
		{`null`, def},
		{`{"Type":"udp"}`, def},
		{`{"Type":"udp","Port":9000}`, config{9000, true, true, true, true}},
		{`{"type":"udp","port":1,"tunoffload":false,"udpgso":false,"udpgro":false,"strictsource":false}`, config{1, false, false, false, false}},
		{`{"Type":"udp","Port":65535,"Unknown":[1,2]}`, config{65535, true, true, true, true}},
	} {
		got, err := parseConfig([]byte(tc.raw))
		if err != nil || got != tc.want {
			t.Errorf("parseConfig(%s) = %+v, %v; want %+v", tc.raw, got, err, tc.want)
		}
	}
	for _, tc := range []struct{ raw, mention string }{
		{`{"Port":0}`, "Backend.Port 0 is out of range"},
		{`{"Port":65536}`, "Backend.Port 65536 is out of range"},
		{`{"Port":-1}`, "Backend.Port -1 is out of range"},
		{`{"Port":"8285"}`, `Backend.Port "8285" is not a whole number`},
		{`{"Port":82.5}`, "Backend.Port 82.5 is not a whole number"},
		{`{"UDPGSO":"yes"}`, `Backend.UDPGSO "yes" is not a boolean`},
		{`{"StrictSource":1}`, "Backend.StrictSource 1 is not a boolean"},
		{`[1]`, "Backend is not a JSON object"},
	} {
		_, err := parseConfig([]byte(tc.raw))
		if !errors.Is(err, ErrInvalidConfig) || !errors.Is(err, subnet.ErrInvalidConfig) {
			t.Errorf("parseConfig(%s) = %v, want ErrInvalidConfig", tc.raw, err)
			continue
		}
		if !bytes.Contains([]byte(err.Error()), []byte(tc.mention)) {
			t.Errorf("parseConfig(%s) = %q, want it to say %q", tc.raw, err, tc.mention)
		}
	}
}

// TestFastPathDoesNotAllocate runs both directions of the packet path,
// with the syscalls faked, and counts heap allocations.
func TestFastPathDoesNotAllocate(t *testing.T) {
	p := newTestPath(true)
	tb := p.table.Load()

	// TUN -> UDP: route, TTL, GSO grouping, sendmmsg.
	c := &sockConn{}
	c.gso.Store(true)
	snd := newSendBatch(c, batchSize)
	snd.syscall = func() error { snd.callE = nil; return nil } // all of hdrs[callAt:callN] sent
	var out [][]byte
	for i := 0; i < 40; i++ {
		pkt := mkTCP([4]byte{10, 5, 1, 1}, [4]byte{10, 5, 3, 1}, 1, 2, uint32(i*1400), uint16(i), make([]byte, 1400))
		pkt[8] = 255
		out = append(out, pkt)
	}
	if n := testing.AllocsPerRun(100, func() {
		for _, pkt := range out {
			if idx, b, v := p.outbound(tb, pkt); v == outSend {
				snd.add(&tb.peers[idx], b)
			}
		}
		p.flushUDP(snd)
	}); n != 0 {
		t.Fatalf("the send path allocates %v times per batch", n)
	}

	// UDP -> TUN: split, strict check, TTL, coalescing, writev.
	var trains [][]byte
	for r := 0; r < 102; r++ {
		var data []byte
		for i := 0; i < 40; i++ {
			pkt := mkTCP([4]byte{10, 5, 2, 7}, [4]byte{10, 5, 1, 1}, 1, 2, uint32(i*1400), uint16(i), make([]byte, 1400))
			data = append(data, pkt...)
		}
		trains = append(trains, data)
	}
	w := &tunWriter{vnet: true, pieces: make([][]byte, 0, maxCoalesceSegs+2), write: func([][]byte) error { return nil }}
	r := 0
	if n := testing.AllocsPerRun(100, func() {
		p.receive(tb, a4("192.0.2.2"), trains[r], 1440, w)
		p.flushTUN(w)
		r++
	}); n != 0 {
		t.Fatalf("the receive path allocates %v times per message", n)
	}
	if s := p.ctr.snapshot(); s.TUNWritten == 0 || s.UDPSent == 0 || s.Malformed+s.SpoofedSource+s.TTL != 0 {
		t.Fatalf("the packets did not take the fast path: %+v", s)
	}
}
