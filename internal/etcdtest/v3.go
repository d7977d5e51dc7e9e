package etcdtest

import (
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"
)

// WithoutV2 serves only the v3 API, as etcd 3.6 and later do (and 3.4/3.5
// without --enable-v2): v2 requests are answered 404.
func WithoutV2() Option { return func(o *options) { o.noV2 = true } }

// Wipe stops the server, deletes its data and starts it again, empty, on the
// same address and ports: to its clients, the store was lost (or replaced by
// an older one), its revision starts again at 1.
func (s *Server) Wipe() error {
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return ErrStopped
	}
	s.Stop()
	if err := os.RemoveAll(s.dataDir()); err != nil {
		return fmt.Errorf("wiping etcd data: %w", err)
	}
	var err error
	for attempt := 0; attempt < 20; attempt++ {
		if err = s.start(); err == nil || !errors.Is(err, syscall.EADDRINUSE) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("starting wiped etcd: %w", err)
	}
	return nil
}
