// Package nstest creates network namespaces for tests: uniquely named,
// never entered by the calling thread, and deleted with everything in them
// when the test ends, even when it fails. Only tests import it.
package nstest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/flanneld-go/flanneld/pkg/nlbatch"
)

// NS is a named network namespace made for one test.
type NS struct {
	Name   string          // as `ip netns` knows it: PREFIX-PID-N
	Path   string          // /run/netns/NAME
	Handle netns.NsHandle  // open until the test ends
	NL     *nlbatch.Handle // netlink in the namespace, open until the test ends
}

var seq atomic.Int64

// New creates a network namespace named prefix-PID-N (lo is left down, as
// the kernel makes it) and deletes it in Cleanup. It skips the test when not
// running as root. The calling thread never enters the namespace.
func New(tb testing.TB, prefix string) *NS {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("skipping: needs root to create network namespaces")
	}
	name := fmt.Sprintf("%s-%d-%d", prefix, os.Getpid(), seq.Add(1))
	n := &NS{Name: name, Path: filepath.Join("/run/netns", name)}
	tb.Cleanup(func() {
		if err := netns.DeleteNamed(name); err != nil && !os.IsNotExist(err) {
			tb.Errorf("deleting network namespace %s: %v", name, err)
		}
		if _, err := os.Stat(n.Path); !os.IsNotExist(err) {
			tb.Errorf("network namespace %s left behind", name)
		}
	})
	type result struct {
		ns  netns.NsHandle
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// NewNamed moves this thread into the new namespace; move it back.
		// If that fails the thread stays locked and dies with the goroutine.
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: err}
			return
		}
		defer orig.Close()
		ns, err := netns.NewNamed(name)
		if err == nil && ns.Equal(orig) {
			err = errors.New("the new namespace is the test's own")
		}
		if serr := netns.Set(orig); serr != nil {
			if err == nil {
				ns.Close()
			}
			ch <- result{err: fmt.Errorf("returning to the original namespace: %w", serr)}
			return
		}
		runtime.UnlockOSThread()
		ch <- result{ns, err}
	}()
	r := <-ch
	if r.err != nil {
		if r.ns.IsOpen() {
			r.ns.Close()
		}
		tb.Fatalf("creating network namespace %s: %v", name, r.err)
	}
	n.Handle = r.ns
	tb.Cleanup(func() { r.ns.Close() })
	h, err := nlbatch.NewHandleAt(r.ns)
	if err != nil {
		tb.Fatalf("opening netlink in %s: %v", name, err)
	}
	tb.Cleanup(h.Close)
	n.NL = h
	return n
}

// Up gives link name in n the addresses addrs (CIDR, "10.0.0.1/24"), sets
// it up and returns it as it is then.
func (n *NS) Up(tb testing.TB, name string, addrs ...string) netlink.Link {
	tb.Helper()
	l, err := n.NL.LinkByName(name)
	if err != nil {
		tb.Fatalf("finding %s in %s: %v", name, n.Name, err)
	}
	for _, a := range addrs {
		addr, err := netlink.ParseAddr(a)
		if err != nil {
			tb.Fatalf("parsing address %q: %v", a, err)
		}
		if err := n.NL.AddrAdd(l, addr); err != nil {
			tb.Fatalf("adding %s to %s in %s: %v", a, name, n.Name, err)
		}
	}
	if err := n.NL.LinkSetUp(l); err != nil {
		tb.Fatalf("setting %s up in %s: %v", name, n.Name, err)
	}
	if l, err = n.NL.LinkByName(name); err != nil {
		tb.Fatalf("finding %s in %s: %v", name, n.Name, err)
	}
	return l
}

// Veth creates a veth pair, name in n and peerName in peer (in n too when
// peer is nil), with the given MTU (0: the kernel's default). It sets the
// peer end up, so name has carrier, gives name the addresses addrs, sets it
// up and returns it. The peer end gets no address; use peer.Up for that.
func (n *NS) Veth(tb testing.TB, name string, mtu int, peer *NS, peerName string, addrs ...string) netlink.Link {
	tb.Helper()
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: mtu}, PeerName: peerName}
	if peer == nil {
		peer = n
	} else {
		veth.PeerNamespace = netlink.NsFd(int(peer.Handle))
	}
	if err := n.NL.LinkAdd(veth); err != nil {
		tb.Fatalf("creating veth pair %s/%s in %s: %v", name, peerName, n.Name, err)
	}
	peer.Up(tb, peerName)
	return n.Up(tb, name, addrs...)
}

// Command is argv run inside n by `ip netns exec`.
func (n *NS) Command(ctx context.Context, argv ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name}, argv...)...)
}
