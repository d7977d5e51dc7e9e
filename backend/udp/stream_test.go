package udp

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"testing"
	"time"
)

// pattern is the data the TCP streams carry: 1 MiB of seeded random bytes,
// repeated.
var pattern = func() []byte {
	r := rand.New(rand.NewPCG(1, 2))
	b := make([]byte, 1<<20)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}()

// streamResult is what one TCP stream moved.
type streamResult struct {
	bytes   int64
	elapsed time.Duration
	sentSum []byte // sha256 of the bytes written, when hashing
	recvSum []byte // sha256 of the bytes read, when hashing
}

// tcpStream connects from host src to dst (listening on dstAddr inside
// dst's namespace) and sends limit bytes, or for dur when limit is 0. Each
// side's sockets are created inside its namespace. With hash, both ends
// hash what they moved. Every call is bounded by deadlines.
func tcpStream(tb testing.TB, src, dst *labHost, dstAddr string, limit int64, dur time.Duration, hash bool) (streamResult, error) {
	tb.Helper()
	var ln net.Listener
	var err error
	inNS(tb, dst.Handle, func() { ln, err = net.Listen("tcp4", net.JoinHostPort(dstAddr, "0")) })
	if err != nil {
		return streamResult{}, fmt.Errorf("listening in %s: %w", dst.Name, err)
	}
	defer ln.Close()
	overall := time.Now().Add(dur + 60*time.Second)
	type recv struct {
		n   int64
		sum []byte
		err error
	}
	got := make(chan recv, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- recv{err: err}
			return
		}
		defer c.Close()
		_ = c.SetDeadline(overall)
		h := sha256.New()
		var w io.Writer = io.Discard
		if hash {
			w = h
		}
		n, err := io.CopyBuffer(w, c, make([]byte, 256<<10))
		got <- recv{n: n, sum: h.Sum(nil), err: err}
	}()
	var c net.Conn
	inNS(tb, src.Handle, func() {
		d := net.Dialer{Timeout: 10 * time.Second}
		c, err = d.Dial("tcp4", ln.Addr().String())
	})
	if err != nil {
		return streamResult{}, fmt.Errorf("dialing %s from %s: %w", ln.Addr(), src.Name, err)
	}
	_ = c.SetDeadline(overall)
	h := sha256.New()
	start := time.Now()
	var sent int64
	var werr error
	for {
		if limit > 0 && sent >= limit {
			break
		}
		if limit == 0 && time.Since(start) >= dur {
			break
		}
		chunk := pattern
		if limit > 0 && int64(len(chunk)) > limit-sent {
			chunk = chunk[:limit-sent]
		}
		n, err := c.Write(chunk)
		if hash {
			h.Write(chunk[:n])
		}
		sent += int64(n)
		if err != nil {
			werr = err
			break
		}
	}
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.CloseWrite()
	}
	r := <-got
	elapsed := time.Since(start)
	c.Close()
	if werr != nil {
		return streamResult{}, fmt.Errorf("writing after %d bytes: %w", sent, werr)
	}
	if r.err != nil && !errors.Is(r.err, io.EOF) {
		return streamResult{}, fmt.Errorf("reading after %d bytes: %w", r.n, r.err)
	}
	if r.n != sent {
		return streamResult{}, fmt.Errorf("sent %d bytes, received %d", sent, r.n)
	}
	res := streamResult{bytes: r.n, elapsed: elapsed}
	if hash {
		res.sentSum, res.recvSum = h.Sum(nil), r.sum
		if !bytes.Equal(res.sentSum, res.recvSum) {
			return res, fmt.Errorf("content differs: sent sha256 %x, received %x", res.sentSum, res.recvSum)
		}
	}
	return res, nil
}
