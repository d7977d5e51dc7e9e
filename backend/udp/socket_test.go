package udp

import (
	"bytes"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// sentHdr is what a fake sendmmsg sent for one header: the peer's
// address, the number of packets, and whether it carried UDP_SEGMENT.
type sentHdr struct {
	to   [4]byte
	pkts int
	gso  bool
}

// fakeSendmmsg makes s send through a fake that refuses headers with a
// control message (GSO) with refuse, and fails headers to failTo with
// EPERM.
func fakeSendmmsg(s *sendBatch, refuse error, failTo [4]byte) *[]sentHdr {
	var log []sentHdr
	s.syscall = func() error {
		end := s.callN
		s.callE, s.callN = nil, 0
		for i := s.callAt; i < end; i++ {
			h := &s.hdrs[i]
			sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(h.Hdr.Name))
			e := error(nil)
			if h.Hdr.Controllen > 0 && refuse != nil {
				e = refuse
			} else if sa.Addr == failTo {
				e = unix.EPERM
			}
			if e != nil {
				if s.callN == 0 {
					s.callE = e
				}
				return nil
			}
			log = append(log, sentHdr{to: sa.Addr, pkts: int(h.Hdr.Iovlen), gso: h.Hdr.Controllen > 0})
			s.callN++
		}
		return nil
	}
	return &log
}

// peerFor is the table's peer for the overlay address dst. The table is
// built from a map, so its slice order is not the tests' to rely on.
func peerFor(t *testing.T, tb *table, dst string) *peer {
	t.Helper()
	i := tb.lookup(a4(dst))
	if i < 0 {
		t.Fatalf("no peer for %s", dst)
	}
	return &tb.peers[i]
}

func TestSendBatchFallsBackWhenGSOIsRefused(t *testing.T) {
	tb := testTable()
	pa, pb := peerFor(t, tb, "10.5.2.1"), peerFor(t, tb, "10.5.3.1") // 192.0.2.2, 192.0.2.3
	c := &sockConn{}
	c.gso.Store(true)
	s := newSendBatch(c, 64)
	log := fakeSendmmsg(s, unix.EIO, [4]byte{})
	s.add(pb, make([]byte, 100)) // alone: no GSO, goes out
	for i := 0; i < 3; i++ {
		s.add(pa, make([]byte, 1000)) // GSO: refused
	}
	s.add(pb, make([]byte, 100))
	n, err := s.flush()
	var refused errGSORefused
	if n != 5 || !errors.As(err, &refused) || refused.err != nil {
		t.Fatalf("flush = %d, %v; want 5 packets and a GSO refusal that the resend fixed", n, err)
	}
	if c.gso.Load() {
		t.Fatal("GSO is still on after the kernel refused it")
	}
	want := []sentHdr{{to: pb.sa.Addr, pkts: 1}, {to: pa.sa.Addr, pkts: 1}, {to: pa.sa.Addr, pkts: 1}, {to: pa.sa.Addr, pkts: 1}, {to: pb.sa.Addr, pkts: 1}}
	if len(*log) != len(want) {
		t.Fatalf("sent %+v, want %+v", *log, want)
	}
	for i := range want {
		if (*log)[i] != want[i] {
			t.Fatalf("sent %+v, want %+v", *log, want)
		}
	}
	// From now on nothing is grouped.
	*log = (*log)[:0]
	s.add(pa, make([]byte, 1000))
	s.add(pa, make([]byte, 1000))
	if n, err := s.flush(); n != 2 || err != nil || len(*log) != 2 {
		t.Fatalf("after fallback: flush = %d, %v, sent %+v", n, err, *log)
	}
}

func TestSendBatchSkipsAFailedMessage(t *testing.T) {
	tb := testTable()
	pa, pb := peerFor(t, tb, "10.5.2.1"), peerFor(t, tb, "10.5.3.1") // 192.0.2.2, 192.0.2.3
	c := &sockConn{}
	c.gso.Store(true)
	s := newSendBatch(c, 64)
	log := fakeSendmmsg(s, nil, pb.sa.Addr)
	s.add(pa, make([]byte, 1000))
	s.add(pa, make([]byte, 1000))
	s.add(pb, make([]byte, 1000)) // EPERM (a firewall, say)
	s.add(pa, make([]byte, 1000))
	n, err := s.flush()
	if n != 3 || !errors.Is(err, unix.EPERM) {
		t.Fatalf("flush = %d, %v; want 3 sent and EPERM", n, err)
	}
	if !c.gso.Load() {
		t.Fatal("an ordinary send error turned GSO off")
	}
	if len(*log) != 2 || (*log)[0].pkts != 2 || !(*log)[0].gso || (*log)[1].pkts != 1 {
		t.Fatalf("sent %+v, want a 2-packet GSO message to A, then 1 packet to A", *log)
	}
}

// TestSocketLoopback sends a run of packets with the batch socket over
// loopback (no root needed) and checks that a GRO receiver splits it back
// into the same packets, and that a plain one-datagram-per-read receiver,
// like flannel's, gets exactly one packet per datagram.
func TestSocketLoopback(t *testing.T) {
	lo := netip.MustParseAddr("127.0.0.1")
	snd, err := listen(netip.AddrPortFrom(lo, 0), true, false)
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	defer snd.Close()
	gro, err := listen(netip.AddrPortFrom(lo, 0), false, true)
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	defer gro.Close()
	plain, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	t.Logf("sender GSO %v, receiver GRO %v", snd.gso.Load(), gro.gro)

	var pkts [][]byte
	for i := 0; i < 11; i++ {
		n := 1000
		if i == 10 {
			n = 500
		}
		pkts = append(pkts, seg(1, uint32(i*1000), uint16(i), n-40, tcpFlagACK))
	}
	for _, target := range []struct {
		name string
		port int
		recv func(t *testing.T) [][]byte
	}{
		{"gro", gro.conn.LocalAddr().(*net.UDPAddr).Port, func(t *testing.T) [][]byte {
			rx := newRecvBatch(gro, 8, maxPacket)
			_ = gro.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
			var got [][]byte
			for len(got) < len(pkts) {
				n, err := rx.read()
				if err != nil {
					t.Fatalf("after %d packets: %v", len(got), err)
				}
				for i := 0; i < n; i++ {
					from, data, seg, trunc := rx.msg(i)
					if from != a4("127.0.0.1") || trunc {
						t.Fatalf("message from %08x, truncated %v", from, trunc)
					}
					if seg == 0 {
						seg = len(data)
					}
					for off := 0; off < len(data); off += seg {
						got = append(got, bytes.Clone(data[off:min(off+seg, len(data))]))
					}
				}
			}
			return got
		}},
		{"plain", plain.LocalAddr().(*net.UDPAddr).Port, func(t *testing.T) [][]byte {
			_ = plain.SetReadDeadline(time.Now().Add(10 * time.Second))
			var got [][]byte
			buf := make([]byte, 65536)
			for len(got) < len(pkts) {
				n, _, err := plain.ReadFromUDPAddrPort(buf)
				if err != nil {
					t.Fatalf("after %d datagrams: %v", len(got), err)
				}
				got = append(got, bytes.Clone(buf[:n]))
			}
			return got
		}},
	} {
		t.Run(target.name, func(t *testing.T) {
			tb := newTable(map[netip.Prefix]netip.Addr{netip.MustParsePrefix("10.5.1.0/24"): lo}, target.port)
			s := newSendBatch(snd, 64)
			for _, p := range pkts {
				s.add(&tb.peers[0], p)
			}
			if n, err := s.flush(); n != len(pkts) || err != nil {
				t.Fatalf("flush = %d, %v", n, err)
			}
			got := target.recv(t)
			if len(got) != len(pkts) {
				t.Fatalf("received %d packets, want %d", len(got), len(pkts))
			}
			for i := range pkts {
				if !bytes.Equal(got[i], pkts[i]) {
					t.Fatalf("datagram %d is not packet %d (%d bytes, want %d)", i, i, len(got[i]), len(pkts[i]))
				}
			}
		})
	}
}
