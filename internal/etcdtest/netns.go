package etcdtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"runtime"

	"github.com/vishvananda/netns"
)

// InNetNS runs fn on an OS thread that has been switched into the network
// namespace bound at nsPath (for example /run/netns/NAME), then switches the
// thread back. Sockets that fn creates synchronously (net.Listen, net.Dial)
// belong to that namespace for their whole life, whichever thread later
// uses them. Goroutines started by fn run on other threads, in the caller's
// namespace. An empty nsPath runs fn directly.
//
// If the thread cannot be switched back it is left locked, so the Go runtime
// discards it when the goroutine ends; no other goroutine ever runs on a
// thread in the wrong namespace.
func InNetNS(nsPath string, fn func() error) error {
	if nsPath == "" {
		return fn()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("getting current network namespace: %w", err)
			return
		}
		defer orig.Close()
		target, err := netns.GetFromPath(nsPath)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("opening network namespace %s: %w", nsPath, err)
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("entering network namespace %s: %w", nsPath, err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			// Stay locked: the thread dies with this goroutine.
			errc <- errors.Join(ferr, fmt.Errorf("leaving network namespace %s: %w", nsPath, err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// DialContextIn returns a DialContext function whose sockets are created in
// the network namespace at nsPath ("" means the caller's namespace).
func DialContextIn(nsPath string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	d := &net.Dialer{}
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		var c net.Conn
		err := InNetNS(nsPath, func() error {
			var err error
			c, err = d.DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}
}
