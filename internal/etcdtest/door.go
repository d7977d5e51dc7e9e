package etcdtest

import (
	"context"
	"fmt"
	"io"
	"net"
	"sync"
)

// door is a server's client port as its clients see it: a TCP relay in
// front of etcd's own client listener. embed.Etcd.Close leaves open client
// connections hanging (a v2 watch long poll stays open, unanswered, for
// ever) and waits for them before it returns; a member that dies closes
// them all at once. Closing the door first makes Stop look like that death
// to every client, and makes it quick. The relay copies bytes, so TLS goes
// through it end to end.
type door struct {
	ln      net.Listener
	backend string // etcd's own client listener, host:port
	dial    func(ctx context.Context, network, addr string) (net.Conn, error)

	mu     sync.Mutex
	thawed *sync.Cond // signalled when frozen or closed changes
	conns  map[net.Conn]struct{}
	closed bool
	frozen bool // no byte passes, nothing is closed: a partition
	wg     sync.WaitGroup
}

// openDoor listens on addr inside the namespace at nsPath ("" for the
// caller's) and relays each connection to backend, dialled from the
// namespace at backendNS.
func openDoor(nsPath, addr, backendNS, backend string) (*door, error) {
	var ln net.Listener
	err := InNetNS(nsPath, func() error {
		var err error
		ln, err = net.Listen("tcp", addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listening on %s for etcd clients: %w", addr, err)
	}
	d := &door{ln: ln, backend: backend, dial: DialContextIn(backendNS), conns: map[net.Conn]struct{}{}}
	d.thawed = sync.NewCond(&d.mu)
	d.wg.Add(1)
	go d.serve()
	return d, nil
}

func (d *door) serve() {
	defer d.wg.Done()
	for {
		c, err := d.ln.Accept()
		if err != nil {
			return // closed; Accept errors on a live listener are not retried
		}
		if !d.track(c) {
			c.Close()
			return
		}
		d.wg.Add(1)
		go d.relay(c)
	}
}

// track records c so that close can close it; false once the door is
// closed.
func (d *door) track(c net.Conn) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return false
	}
	d.conns[c] = struct{}{}
	return true
}

func (d *door) untrack(c net.Conn) {
	d.mu.Lock()
	delete(d.conns, c)
	d.mu.Unlock()
	c.Close()
}

// relay copies between the client connection c and a new connection to
// etcd until either side is done.
func (d *door) relay(c net.Conn) {
	defer d.wg.Done()
	defer d.untrack(c)
	if !d.wait() {
		return
	}
	up, err := d.dial(context.Background(), "tcp", d.backend)
	if err != nil {
		return // the client sees its connection closed, as by a dying member
	}
	if !d.track(up) {
		up.Close()
		return
	}
	defer d.untrack(up)
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		err := d.copy(dst, src)
		if tc, ok := dst.(*net.TCPConn); ok && err == nil {
			tc.CloseWrite() // pass the half close on
		} else {
			dst.Close()
		}
		done <- struct{}{}
	}
	go pipe(up, c)
	go pipe(c, up)
	<-done
	<-done
}

// copy is io.Copy that holds each chunk while the door is frozen.
func (d *door) copy(dst, src net.Conn) error {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if !d.wait() {
				return net.ErrClosed
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return werr
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// wait blocks while the door is frozen; false once it is closed.
func (d *door) wait() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	for d.frozen && !d.closed {
		d.thawed.Wait()
	}
	return !d.closed
}

// freeze stops (true) or resumes (false) every byte through the door.
func (d *door) freeze(on bool) {
	d.mu.Lock()
	d.frozen = on
	d.mu.Unlock()
	d.thawed.Broadcast()
}

// close closes the listener and every connection, and waits for the relay
// goroutines. It is idempotent.
func (d *door) close() {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return
	}
	d.closed = true
	d.thawed.Broadcast()
	d.ln.Close()
	for c := range d.conns {
		c.Close()
	}
	d.mu.Unlock()
	d.wg.Wait()
}
