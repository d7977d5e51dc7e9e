package udp

import (
	"bytes"
	"context"
	"encoding/binary"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/tun"

	"github.com/flanneld-go/flanneld/pkg/ip"
)

// tcpChecksumOK verifies the TCP checksum of an IPv4 packet.
func tcpChecksumOK(pkt []byte) bool {
	hl := int(pkt[0]&0xf) * 4
	seg := pkt[hl:]
	var ph [12]byte
	copy(ph[0:8], pkt[12:20])
	ph[9] = protoTCP
	binary.BigEndian.PutUint16(ph[10:], uint16(len(seg)))
	return fold(sum(seg, sum(ph[:], 0))) == 0xffff
}

// mkTCP builds an IPv4 TCP segment with valid checksums.
func mkTCP(src, dst [4]byte, sport, dport uint16, seq uint32, id uint16, payload []byte) []byte {
	tcp := make([]byte, 20+len(payload))
	binary.BigEndian.PutUint16(tcp[0:], sport)
	binary.BigEndian.PutUint16(tcp[2:], dport)
	binary.BigEndian.PutUint32(tcp[4:], seq)
	binary.BigEndian.PutUint32(tcp[8:], 1)
	tcp[12] = 5 << 4
	tcp[13] = 0x10 // ACK
	binary.BigEndian.PutUint16(tcp[14:], 65535)
	copy(tcp[20:], payload)
	pkt := mkIPv4(src, dst, protoTCP, 64, nil, tcp)
	binary.BigEndian.PutUint16(pkt[4:], id)
	pkt[6] = 0x40 // DF
	binary.BigEndian.PutUint16(pkt[10:], 0)
	binary.BigEndian.PutUint16(pkt[10:], checksum(pkt[:20]))
	var ph [12]byte
	copy(ph[0:8], pkt[12:20])
	ph[9] = protoTCP
	binary.BigEndian.PutUint16(ph[10:], uint16(len(tcp)))
	binary.BigEndian.PutUint16(pkt[20+16:], ^fold(sum(pkt[20:], sum(ph[:], 0))))
	return pkt
}

// TestNetnsOffloadRoundTrip checks our coalescing and wireguard-go's
// splitting against the kernel: segments written to the TUN in one batch
// are coalesced into a GSO packet, the kernel forwards it back out of the
// same TUN (the destination is routed there), and one read splits it into
// the original segments again, with the TTL forwarding took off and valid
// checksums.
func TestNetnsOffloadRoundTrip(t *testing.T) {
	needRoot(t)
	x := &labHost{NS: newNS(t)}
	ns, h := x.Handle, x.NL
	var dev tun.Device
	var vnet bool
	var err error
	inNS(t, ns, func() { dev, vnet, err = createTUN(DeviceName, 1472, true) })
	if err != nil {
		t.Fatalf("creating the TUN: %v", err)
	}
	defer dev.Close()
	if !vnet {
		t.Fatal("the TUN has no virtio header; offloads are off")
	}
	l, err := h.LinkByName(DeviceName)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.AddrAdd(l, &netlink.Addr{IPNet: ip.HostNet(netip.MustParseAddr("10.5.1.0"), 16)}); err != nil {
		t.Fatal(err)
	}
	if err := h.LinkSetUp(l); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, kv := range []string{
		"net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.flannel0.rp_filter=0",
		"net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf.flannel0.send_redirects=0",
	} {
		if out, err := x.run(ctx, "sysctl", "-q", "-w", kv); err != nil {
			t.Fatalf("sysctl %s: %v %s", kv, err, out)
		}
	}

	const segs, mss = 20, 1000
	r := rand.New(rand.NewPCG(3, 4))
	src, dst := [4]byte{10, 5, 9, 1}, [4]byte{10, 5, 7, 1}
	var orig [][]byte
	bufs := make([][]byte, segs)
	for i := 0; i < segs; i++ {
		payload := make([]byte, mss)
		for j := range payload {
			payload[j] = byte(r.Uint32())
		}
		p := mkTCP(src, dst, 40000, 5001, 1000+uint32(i*mss), uint16(100+i), payload)
		orig = append(orig, p)
		bufs[i] = make([]byte, tunOffset+maxPacket)
		bufs[i] = bufs[i][:tunOffset+copy(bufs[i][tunOffset:], p)]
	}

	type readResult struct {
		pkts  [][]byte
		reads int
	}
	got := make(chan readResult, 1)
	go func() {
		var res readResult
		rb := make([][]byte, batchSize)
		sizes := make([]int, batchSize)
		for i := range rb {
			rb[i] = make([]byte, tunOffset+maxPacket)
		}
		for len(res.pkts) < segs {
			n, err := dev.Read(rb, sizes, tunOffset)
			if err != nil && n == 0 {
				break
			}
			res.reads++
			for i := 0; i < n; i++ {
				p := rb[i][tunOffset : tunOffset+sizes[i]]
				if len(p) >= 20 && p[0]>>4 == 4 && p[9] == protoTCP {
					res.pkts = append(res.pkts, bytes.Clone(p))
				}
			}
		}
		got <- res
	}()
	rc, err := dev.File().SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	w := newTUNWriter(rc, true)
	for _, b := range bufs {
		w.add(b[tunOffset:])
	}
	w.flush()
	if n, errs, err := w.take(); n != segs || errs != 0 {
		t.Fatalf("writing %d segments: %d written, %d errors (%v)", segs, n, errs, err)
	}
	var res readResult
	select {
	case res = <-got:
	case <-time.After(20 * time.Second):
		dev.Close()
		res = <-got
	}
	if len(res.pkts) != segs {
		t.Fatalf("read back %d TCP segments in %d reads, want %d", len(res.pkts), res.reads, segs)
	}
	if res.reads >= segs {
		t.Fatalf("%d segments came back in %d reads: the kernel did not see one coalesced packet", segs, res.reads)
	}
	for i, p := range res.pkts {
		o := orig[i]
		if len(p) != len(o) {
			t.Fatalf("segment %d: %d bytes, want %d", i, len(p), len(o))
		}
		if p[8] != o[8]-1 {
			t.Fatalf("segment %d: TTL %d, want %d", i, p[8], o[8]-1)
		}
		if !headerChecksumOK(p[:20]) || !tcpChecksumOK(p) {
			t.Fatalf("segment %d: bad checksum (ip ok %v, tcp ok %v)", i, headerChecksumOK(p[:20]), tcpChecksumOK(p))
		}
		// Addresses, ports, sequence numbers, flags and payload are the
		// original's.
		if !bytes.Equal(p[12:20], o[12:20]) || !bytes.Equal(p[20:32], o[20:32]) || p[33] != o[33] || !bytes.Equal(p[40:], o[40:]) {
			t.Fatalf("segment %d differs from the original", i)
		}
	}
	t.Logf("%d segments written in one batch came back in %d read(s)", segs, res.reads)
}
