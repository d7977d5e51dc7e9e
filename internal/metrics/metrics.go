// Package metrics holds the daemon's Prometheus metrics, served on the
// healthz listener at /metrics. Packages update them where the event
// happens; nothing here depends on the rest of the daemon.
package metrics

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

const ns = "flannel"

var (
	// LeaseExpiration is when the own lease expires (Unix seconds; 0 for a
	// reservation, which never expires).
	LeaseExpiration = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "lease_expiration_timestamp_seconds",
		Help: "When this node's lease expires, in Unix seconds; 0 for a reservation (no TTL)."})
	// LeaseAcquisitions counts leases obtained (the first and re-acquired ones).
	LeaseAcquisitions = prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "lease_acquisitions_total",
		Help: "Leases this node obtained, the first one and any re-acquired after a loss."})
	// LeaseRenewals counts renewals by result: ok, error, lost.
	LeaseRenewals = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "lease_renewals_total",
		Help: "Lease renewals by result (ok, error, lost)."}, []string{"result"})
	// EtcdErrors counts failed etcd requests by operation (get, set, watch).
	EtcdErrors = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "etcd_request_errors_total",
		Help: "etcd requests that failed, by operation (get, set, watch)."}, []string{"op"})
	// WatchResyncs counts full re-lists of the leases (etcd index cleared).
	WatchResyncs = prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "watch_resyncs_total",
		Help: "Full re-lists of the leases after etcd cleared the watched index."})
	// Leases is the number of valid leases this node knows, its own included.
	Leases = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "leases",
		Help: "Valid leases known to this node, its own included."})
	// Programmed is the number of kernel entries a backend keeps, by backend
	// and kind (route, neighbour, fdb, peer).
	Programmed = prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "programmed_entries",
		Help: "Kernel entries the backend keeps for remote leases, by backend and kind."}, []string{"backend", "kind"})
	// ReconcileDuration is how long one backend Apply takes.
	ReconcileDuration = prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Name: "reconcile_duration_seconds",
		Help: "Time one backend reconcile (Apply) takes.", Buckets: prometheus.ExponentialBuckets(0.0005, 4, 9)})
	// ReconcileErrors counts failed backend reconciles.
	ReconcileErrors = prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "reconcile_errors_total",
		Help: "Backend reconciles (Apply) that returned an error."})
	// IPTablesRestores counts chains (re)installed by the iptables keeper.
	IPTablesRestores = prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "iptables_restores_total",
		Help: "iptables chains or jumps (re)installed because something was missing or out of order."})
)

// Registry holds every metric above plus the Go and process collectors.
var Registry = prometheus.NewRegistry()

func init() {
	Registry.MustRegister(LeaseExpiration, LeaseAcquisitions, LeaseRenewals, EtcdErrors, WatchResyncs, Leases,
		Programmed, ReconcileDuration, ReconcileErrors, IPTablesRestores,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
}

// Handler serves the registry in the Prometheus text format.
func Handler() http.Handler {
	return promhttp.HandlerFor(Registry, promhttp.HandlerOpts{})
}
