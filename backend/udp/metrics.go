package udp

import (
	"io"
	"sync"

	"github.com/flanneld-go/flanneld/internal/metrics"
)

// The data path keeps its own atomic counters (cheap on the fast path);
// this collector reads them when /metrics is scraped, summed over the live
// backends (the daemon has one).
var (
	liveMu sync.Mutex
	live   = map[*Backend]bool{}
)

func init() { metrics.RegisterWriter(writeMetrics) }

// writeMetrics writes flannel_udp_packets_total{direction} (tx: TUN to
// peers, rx: peers to TUN), flannel_udp_drops_total{reason} and
// flannel_udp_unreachable_total (ICMP net-unreachable errors written into
// the TUN for destinations no lease holds).
func writeMetrics(w io.Writer) {
	var sum Stats
	liveMu.Lock()
	for b := range live {
		s := b.Stats()
		sum.UDPSent += s.UDPSent
		sum.TUNWritten += s.TUNWritten
		sum.Unreachable += s.Unreachable
		sum.UnknownSender += s.UnknownSender
		sum.SpoofedSource += s.SpoofedSource
		sum.NoRoute += s.NoRoute
		sum.TTL += s.TTL
		sum.NonIPv4 += s.NonIPv4
		sum.Malformed += s.Malformed
		sum.SendErrors += s.SendErrors
		sum.TUNWriteErrors += s.TUNWriteErrors
	}
	liveMu.Unlock()
	metrics.WriteCounters(w, "flannel_udp_packets_total",
		metrics.Sample{Labels: `direction="tx"`, Value: sum.UDPSent}, metrics.Sample{Labels: `direction="rx"`, Value: sum.TUNWritten})
	metrics.WriteCounters(w, "flannel_udp_unreachable_total", metrics.Sample{Value: sum.Unreachable})
	drops := []metrics.Sample{}
	for _, d := range []struct {
		reason string
		v      uint64
	}{
		{"unknown_sender", sum.UnknownSender}, {"spoofed_source", sum.SpoofedSource}, {"no_route", sum.NoRoute},
		{"ttl", sum.TTL}, {"not_ipv4", sum.NonIPv4}, {"malformed", sum.Malformed},
		{"send_error", sum.SendErrors}, {"tun_write_error", sum.TUNWriteErrors},
	} {
		drops = append(drops, metrics.Sample{Labels: `reason="` + d.reason + `"`, Value: d.v})
	}
	metrics.WriteCounters(w, "flannel_udp_drops_total", drops...)
}

func track(b *Backend, on bool) {
	liveMu.Lock()
	defer liveMu.Unlock()
	if on {
		live[b] = true
	} else {
		delete(live, b)
	}
}
