package udp

import (
	"bytes"
	"encoding/binary"
	"testing"
)

// seg builds a TCP segment of flow f (source port) with n payload bytes
// derived from seq, and flags.
func seg(f uint16, seq uint32, id uint16, n int, flags byte) []byte {
	payload := make([]byte, n)
	for i := range payload {
		payload[i] = byte(seq + uint32(i))
	}
	p := mkTCP([4]byte{10, 5, 2, 7}, [4]byte{10, 5, 1, 1}, f, 5001, seq, id, payload)
	if flags != tcpFlagACK {
		p[33] = flags
		binary.BigEndian.PutUint16(p[36:], 0)
		binary.BigEndian.PutUint16(p[36:], ^fold(sum(p[20:], pseudoSum(p, protoTCP, len(p)-20))))
	}
	return p
}

// train is n segments of size each of flow f starting at seq, the last one
// lastSize bytes with lastFlags.
func train(f uint16, seq uint32, n, size, lastSize int, lastFlags byte) [][]byte {
	var out [][]byte
	for i := 0; i < n; i++ {
		sz, fl := size, byte(tcpFlagACK)
		if i == n-1 {
			sz, fl = lastSize, lastFlags
		}
		out = append(out, seg(f, seq, uint16(100+i), sz, fl))
		seq += uint32(sz)
	}
	return out
}

func TestTUNWriterCoalesces(t *testing.T) {
	udpPkt := mkIPv4([4]byte{10, 5, 2, 7}, [4]byte{10, 5, 1, 1}, protoUDP, 64, nil, []byte("12345678abc"))
	badSum := seg(1, 1000, 1, 1000, tcpFlagACK)
	badSum[60] ^= 0xff
	withOpts := mkIPv4([4]byte{10, 5, 2, 7}, [4]byte{10, 5, 1, 1}, protoTCP, 64, []byte{1, 1, 1, 0}, seg(1, 0, 0, 100, tcpFlagACK)[20:])
	cat := func(parts ...[][]byte) [][]byte {
		var out [][]byte
		for _, p := range parts {
			out = append(out, p...)
		}
		return out
	}
	for _, tc := range []struct {
		name   string
		in     [][]byte
		writes int
	}{
		{"one train with a short PSH tail", train(1, 1000, 11, 1000, 300, tcpFlagACK|tcpFlagPSH), 1},
		{"equal sizes", train(1, 1000, 8, 1000, 1000, tcpFlagACK), 1},
		{"single segment", train(1, 1000, 1, 1000, 1000, tcpFlagACK), 1},
		{"sequence gap", cat(train(1, 1000, 3, 1000, 1000, tcpFlagACK), train(1, 9000, 3, 1000, 1000, tcpFlagACK)), 2},
		{"two flows interleaved", [][]byte{seg(1, 0, 1, 1000, tcpFlagACK), seg(2, 0, 1, 1000, tcpFlagACK), seg(1, 1000, 2, 1000, tcpFlagACK), seg(2, 1000, 2, 1000, tcpFlagACK)}, 4},
		{"larger after smaller", [][]byte{seg(1, 0, 1, 500, tcpFlagACK), seg(1, 500, 2, 1000, tcpFlagACK)}, 2},
		{"short segment closes the run", [][]byte{seg(1, 0, 1, 1000, tcpFlagACK), seg(1, 1000, 2, 500, tcpFlagACK), seg(1, 1500, 3, 500, tcpFlagACK)}, 2},
		{"bad checksum stands alone", cat(train(1, 0, 2, 1000, 1000, tcpFlagACK), [][]byte{badSum}, train(1, 3000, 2, 1000, 1000, tcpFlagACK)), 3},
		{"syn and fin stand alone", [][]byte{seg(1, 0, 1, 10, tcpFlagSYN), seg(1, 10, 2, 1000, tcpFlagACK), seg(1, 1010, 3, 1000, tcpFlagACK|tcpFlagFIN)}, 3},
		{"udp stands alone", [][]byte{seg(1, 0, 1, 1000, tcpFlagACK), udpPkt, seg(1, 1000, 2, 1000, tcpFlagACK)}, 3},
		{"ip options stand alone", [][]byte{withOpts, withOpts}, 2},
		{"more than 64 segments", train(1, 0, 70, 900, 900, tcpFlagACK), 2},
		{"64 KB limit", train(1, 0, 46, 1460, 1460, tcpFlagACK), 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w, writes := recordingWriter(true, nil)
			var in [][]byte
			for _, p := range tc.in {
				c := bytes.Clone(p)
				in = append(in, c)
				w.add(c)
			}
			w.flush()
			if len(*writes) != tc.writes {
				t.Fatalf("%d writes, want %d", len(*writes), tc.writes)
			}
			var got [][]byte
			for _, b := range *writes {
				got = append(got, splitWrite(t, b)...)
			}
			if len(got) != len(tc.in) {
				t.Fatalf("split back into %d packets, want %d", len(got), len(tc.in))
			}
			for i := range got {
				if !bytes.Equal(got[i], tc.in[i]) {
					t.Fatalf("packet %d differs after coalescing and splitting:\n got % x\nwant % x", i, got[i][:40], tc.in[i][:40])
				}
			}
			n, errs, _ := w.take()
			if n != uint64(len(tc.in)) || errs != 0 {
				t.Fatalf("take = %d written, %d errors; want %d, 0", n, errs, len(tc.in))
			}
		})
	}
}

func TestTUNWriterWithoutVnet(t *testing.T) {
	w, writes := recordingWriter(false, nil)
	in := train(1, 0, 5, 1000, 1000, tcpFlagACK)
	for _, p := range in {
		w.add(p)
	}
	w.flush()
	if len(*writes) != len(in) {
		t.Fatalf("%d writes for %d packets without vnet", len(*writes), len(in))
	}
	for i := range in {
		if !bytes.Equal((*writes)[i], in[i]) {
			t.Fatalf("packet %d written with extra bytes", i)
		}
	}
}

func TestTUNWriterDoesNotAllocate(t *testing.T) {
	w := &tunWriter{vnet: true, pieces: make([][]byte, 0, maxCoalesceSegs+2), write: func([][]byte) error { return nil }}
	in := train(1, 0, 40, 1400, 1400, tcpFlagACK)
	if n := testing.AllocsPerRun(100, func() {
		for _, p := range in {
			w.add(p)
		}
		w.flush()
	}); n != 0 {
		t.Fatalf("coalescing allocates %v times per run", n)
	}
}
