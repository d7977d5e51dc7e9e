package udp

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/flanneld-go/flanneld/internal/metrics"
)

// The data path keeps its own atomic counters (cheap on the fast path);
// this collector reads them when /metrics is scraped, summed over the live
// backends (the daemon has one).
var (
	liveMu sync.Mutex
	live   = map[*Backend]bool{}

	packetsDesc = prometheus.NewDesc("flannel_udp_packets_total",
		"Inner packets moved by the udp backend, by direction (tx: TUN to peers, rx: peers to TUN).", []string{"direction"}, nil)
	dropsDesc = prometheus.NewDesc("flannel_udp_drops_total",
		"Packets the udp backend dropped, by reason.", []string{"reason"}, nil)
	unreachableDesc = prometheus.NewDesc("flannel_udp_unreachable_total",
		"ICMP net-unreachable errors written into the TUN for destinations no lease holds.", nil, nil)
)

type collector struct{}

func init() { metrics.Registry.MustRegister(collector{}) }

func (collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- packetsDesc
	ch <- dropsDesc
	ch <- unreachableDesc
}

func (collector) Collect(ch chan<- prometheus.Metric) {
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
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	counter(packetsDesc, sum.UDPSent, "tx")
	counter(packetsDesc, sum.TUNWritten, "rx")
	counter(unreachableDesc, sum.Unreachable)
	for _, d := range []struct {
		reason string
		v      uint64
	}{
		{"unknown_sender", sum.UnknownSender}, {"spoofed_source", sum.SpoofedSource}, {"no_route", sum.NoRoute},
		{"ttl", sum.TTL}, {"not_ipv4", sum.NonIPv4}, {"malformed", sum.Malformed},
		{"send_error", sum.SendErrors}, {"tun_write_error", sum.TUNWriteErrors},
	} {
		counter(dropsDesc, d.v, d.reason)
	}
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
