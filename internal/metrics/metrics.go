// Package metrics holds the daemon's metrics, served in the Prometheus text
// format on the healthz listener at /metrics. Packages update them where the
// event happens; nothing here depends on the rest of the daemon.
//
// It is built on github.com/VictoriaMetrics/metrics, which writes the text
// format without the protobuf machinery of the Prometheus client: about 5 ms
// less of start-up (package initialisation and page faults) and a smaller
// binary, for the same exposition.
package metrics

import (
	"fmt"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"

	vm "github.com/VictoriaMetrics/metrics"
)

const ns = "flannel_"

var set = vm.NewSet()

func init() { vm.ExposeMetadata(true) } // # TYPE lines, as Prometheus clients write

// The metrics. Each comment is the metric's meaning.
var (
	// LeaseExpiration is when the own lease expires (Unix seconds; 0 for a
	// reservation, which never expires).
	LeaseExpiration = set.NewGauge(ns+"lease_expiration_timestamp_seconds", nil)
	// LeaseAcquisitions counts leases obtained (the first and re-acquired ones).
	LeaseAcquisitions = set.NewCounter(ns + "lease_acquisitions_total")
	// LeaseRenewals counts renewals by result: ok, error, lost.
	LeaseRenewals = CounterVec{name: ns + "lease_renewals_total", labels: []string{"result"}}
	// EtcdErrors counts failed etcd requests by operation (get, set, watch).
	EtcdErrors = CounterVec{name: ns + "etcd_request_errors_total", labels: []string{"op"}}
	// WatchResyncs counts full re-lists of the leases (etcd index cleared).
	WatchResyncs = set.NewCounter(ns + "watch_resyncs_total")
	// StoreResets counts stores found restored from a backup, wiped or
	// replaced (index gone back, cluster ID changed) under a watch.
	StoreResets = set.NewCounter(ns + "store_resets_total")
	// Leases is the number of valid leases this node knows, its own included.
	Leases = set.NewGauge(ns+"leases", nil)
	// Programmed is the number of kernel entries a backend keeps, by backend
	// and kind (route, neighbour, fdb, peer).
	Programmed = GaugeVec{name: ns + "programmed_entries", labels: []string{"backend", "kind"}}
	// ReconcileDuration is how long one backend Apply takes.
	ReconcileDuration = newHistogram(ns+"reconcile_duration_seconds", 0.0005, 4, 9)
	// Reconciles counts backend reconciles by what asked for them: start,
	// leases, lease (own lease acquired or renewed), resync, retry (after
	// a failed one), or a kernel event (route-deleted, route-changed,
	// neigh-deleted, neigh-changed, link-changed, addr-deleted,
	// ext-changed, events-lost).
	Reconciles = CounterVec{name: ns + "reconciles_total", labels: []string{"cause"}}
	// ReconcileErrors counts failed backend reconciles.
	ReconcileErrors = set.NewCounter(ns + "reconcile_errors_total")
	// EtcdAPI is 1 for the etcd API the lease manager uses (api "v2" or
	// "v3"), chosen once at start.
	EtcdAPI = GaugeVec{name: ns + "etcd_api", labels: []string{"api"}}
	// IPTablesRestores counts chains (re)installed by the iptables keeper.
	IPTablesRestores = set.NewCounter(ns + "iptables_restores_total")
	// NetworkConfig is 1 for the state the stored network config was last
	// seen in and 0 for the others (see NetworkConfigStates).
	NetworkConfig = GaugeVec{name: ns + "network_config_state", labels: []string{"state"}}
)

// NetworkConfigStates are the states of the stored network config: current
// (what the daemon runs on), changed (a restart applies it), missing (the
// key or file is gone) and invalid (it does not parse).
var NetworkConfigStates = []string{"current", "changed", "missing", "invalid"}

// SetNetworkConfig makes state the one NetworkConfig state set to 1.
func SetNetworkConfig(state string) {
	for _, s := range NetworkConfigStates {
		v := 0.0
		if s == state {
			v = 1
		}
		NetworkConfig.WithLabelValues(s).Set(v)
	}
}

// CounterVec is a counter per combination of label values.
type CounterVec struct {
	name   string
	labels []string
}

// WithLabelValues returns the counter of the given label values, one per
// label, in order.
func (v CounterVec) WithLabelValues(values ...string) *vm.Counter {
	return set.GetOrCreateCounter(series(v.name, v.labels, values))
}

// GaugeVec is a gauge per combination of label values.
type GaugeVec struct {
	name   string
	labels []string
}

// WithLabelValues returns the gauge of the given label values, one per
// label, in order.
func (v GaugeVec) WithLabelValues(values ...string) *vm.Gauge {
	return set.GetOrCreateGauge(series(v.name, v.labels, values), nil)
}

// series is name{label="value",...}.
func series(name string, labels, values []string) string {
	if len(values) != len(labels) {
		panic(fmt.Sprintf("metrics: %s takes %d label values, got %d", name, len(labels), len(values))) // a programming error
	}
	var b strings.Builder
	b.WriteString(name)
	b.WriteByte('{')
	for i, l := range labels {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(l)
		b.WriteByte('=')
		b.WriteString(strconv.Quote(values[i]))
	}
	b.WriteByte('}')
	return b.String()
}

// Histogram is a Prometheus histogram with fixed buckets (le labels, as
// histogram_quantile expects).
type Histogram struct {
	name   string
	bounds []float64
	counts []atomic.Uint64 // per bucket, not cumulative; the last is +Inf
	sum    atomic.Uint64   // float64 bits
}

// newHistogram has count buckets from start, each factor times the last.
func newHistogram(name string, start, factor float64, count int) *Histogram {
	h := &Histogram{name: name, counts: make([]atomic.Uint64, count+1)}
	for b := start; len(h.bounds) < count; b *= factor {
		h.bounds = append(h.bounds, b)
	}
	set.RegisterMetricsWriter(h.write)
	return h
}

// Observe records one value.
func (h *Histogram) Observe(v float64) {
	i := 0
	for i < len(h.bounds) && v > h.bounds[i] {
		i++
	}
	h.counts[i].Add(1)
	for {
		old := h.sum.Load()
		if h.sum.CompareAndSwap(old, math.Float64bits(math.Float64frombits(old)+v)) {
			return
		}
	}
}

func (h *Histogram) write(w io.Writer) {
	fmt.Fprintf(w, "# TYPE %s histogram\n", h.name)
	var n uint64
	for i, b := range h.bounds {
		n += h.counts[i].Load()
		fmt.Fprintf(w, "%s_bucket{le=%q} %d\n", h.name, strconv.FormatFloat(b, 'g', -1, 64), n)
	}
	n += h.counts[len(h.bounds)].Load()
	fmt.Fprintf(w, "%s_bucket{le=\"+Inf\"} %d\n", h.name, n)
	fmt.Fprintf(w, "%s_sum %s\n", h.name, strconv.FormatFloat(math.Float64frombits(h.sum.Load()), 'g', -1, 64))
	fmt.Fprintf(w, "%s_count %d\n", h.name, n)
}

// RegisterWriter adds metrics written at each scrape by write, for values
// kept elsewhere (the udp data path's atomic counters); write them with
// WriteCounters.
func RegisterWriter(write func(w io.Writer)) { set.RegisterMetricsWriter(write) }

// Sample is one value of a metric family; Labels is empty or like
// `reason="ttl"`.
type Sample struct {
	Labels string
	Value  uint64
}

// WriteCounters writes the counter family name: its TYPE line, then each
// sample.
func WriteCounters(w io.Writer, name string, samples ...Sample) {
	fmt.Fprintf(w, "# TYPE %s counter\n", name)
	for _, s := range samples {
		if s.Labels == "" {
			fmt.Fprintf(w, "%s %d\n", name, s.Value)
		} else {
			fmt.Fprintf(w, "%s{%s} %d\n", name, s.Labels, s.Value)
		}
	}
}

// Handler serves every metric above, then the Go runtime's and the
// process's (go_*, process_*), in the Prometheus text format.
func Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		set.WritePrometheus(w)
		vm.WriteProcessMetrics(w)
	})
}

// Peer probes (package probe).
var (
	// Peers is the number of peers in each probe state (unprobed,
	// reachable, unreachable, mtu-blackhole).
	Peers = GaugeVec{name: ns + "peers", labels: []string{"state"}}
	// PeerProbes counts peer probes sent, by size (small, full).
	PeerProbes = CounterVec{name: ns + "peer_probes_total", labels: []string{"size"}}
	// PeerProbeRTT is the round-trip time of answered peer probes.
	PeerProbeRTT = newHistogram(ns+"peer_probe_rtt_seconds", 0.0001, 4, 9)
)
