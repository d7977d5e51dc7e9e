package etcdv3

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"time"
)

// diagnose connects to each endpoint the way the gRPC client does (TCP,
// then TLS for https) and returns why none answers, or nil when one does.
// The gRPC client waits for a connection without saying why it has none, so
// a request only times out; this names the cause: a refused connection, an
// unknown certificate authority, a client certificate the server requires.
func diagnose(ctx context.Context, endpoints []string, tlsCfg *tls.Config) error {
	var errs []error
	for _, ep := range endpoints {
		err := probe(ctx, ep, tlsCfg)
		if err == nil {
			return nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", ep, err))
	}
	return errors.Join(errs...)
}

func probe(ctx context.Context, endpoint string, tlsCfg *tls.Config) error {
	u, err := url.Parse(endpoint)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", u.Host)
	if err != nil {
		return err
	}
	defer conn.Close()
	if u.Scheme != "https" {
		return nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if tlsCfg != nil {
		cfg = tlsCfg.Clone()
	}
	cfg.ServerName, cfg.NextProtos = u.Hostname(), []string{"h2"}
	tc := tls.Client(conn, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		return err
	}
	// With TLS 1.3 the server judges the client certificate after the
	// client's handshake is done: its verdict is the first thing to read.
	tc.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	var b [1]byte
	if _, err := tc.Read(b[:]); err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return nil // nothing to say: the server accepted us
		}
		var alert tls.AlertError
		if errors.As(err, &alert) || !errors.Is(err, net.ErrClosed) {
			return err
		}
	}
	return nil
}
