package metrics

import (
	"io"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// TestExposition scrapes the handler and parses the page with the
// Prometheus text parser (which rejects a family declared twice, samples
// outside their family, bad label syntax): every family is there, once,
// with the values just set, and the histogram is cumulative.
func TestExposition(t *testing.T) {
	LeaseRenewals.WithLabelValues("ok").Inc()
	LeaseRenewals.WithLabelValues("ok").Inc()
	LeaseRenewals.WithLabelValues("lost").Inc()
	Programmed.WithLabelValues("vxlan", "route").Set(7)
	Leases.Set(3)
	for _, v := range []float64{0.0001, 0.003, 0.003, 100} {
		ReconcileDuration.Observe(v)
	}
	RegisterWriter(func(w io.Writer) {
		WriteCounters(w, "flannel_test_total", Sample{Labels: `kind="a"`, Value: 5}, Sample{Labels: `kind="b"`, Value: 6})
	})

	rec := httptest.NewRecorder()
	Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if ct := rec.Header().Get("Content-Type"); !strings.HasPrefix(ct, "text/plain; version=0.0.4") {
		t.Errorf("Content-Type %q", ct)
	}
	p := expfmt.NewTextParser(model.LegacyValidation)
	families, err := p.TextToMetricFamilies(strings.NewReader(rec.Body.String()))
	if err != nil {
		t.Fatalf("the page does not parse: %v\n%s", err, rec.Body.String())
	}
	value := func(family string, labels map[string]string) float64 {
		t.Helper()
		f, ok := families[family]
		if !ok {
			t.Fatalf("no family %s", family)
		}
	next:
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if labels[l.GetName()] != l.GetValue() {
					continue next
				}
			}
			switch {
			case m.Counter != nil:
				return m.GetCounter().GetValue()
			case m.Gauge != nil:
				return m.GetGauge().GetValue()
			case m.Untyped != nil:
				return m.GetUntyped().GetValue()
			}
		}
		t.Fatalf("no sample %v in %s", labels, family)
		return 0
	}
	if v := value("flannel_lease_renewals_total", map[string]string{"result": "ok"}); v != 2 {
		t.Errorf("renewals ok = %v, want 2", v)
	}
	if v := value("flannel_programmed_entries", map[string]string{"backend": "vxlan", "kind": "route"}); v != 7 {
		t.Errorf("programmed = %v, want 7", v)
	}
	if v := value("flannel_leases", nil); v != 3 {
		t.Errorf("leases = %v, want 3", v)
	}
	if v := value("flannel_test_total", map[string]string{"kind": "b"}); v != 6 {
		t.Errorf("written counter = %v, want 6", v)
	}
	h := families["flannel_reconcile_duration_seconds"].GetMetric()[0].GetHistogram()
	if h.GetSampleCount() != 4 || h.GetSampleSum() < 100.006 || h.GetSampleSum() > 100.0062 {
		t.Errorf("histogram count %d sum %v, want 4 and 100.0061", h.GetSampleCount(), h.GetSampleSum())
	}
	want := map[float64]uint64{0.0005: 1, 0.002: 1, 0.008: 3, 32.768: 3}
	for _, b := range h.GetBucket() {
		if w, ok := want[b.GetUpperBound()]; ok && b.GetCumulativeCount() != w {
			t.Errorf("bucket le=%v holds %d, want %d", b.GetUpperBound(), b.GetCumulativeCount(), w)
		}
	}
	for _, f := range []string{"go_goroutines", "process_resident_memory_bytes", "process_cpu_seconds_total"} {
		if _, ok := families[f]; !ok {
			t.Errorf("no %s (the Go and process metrics)", f)
		}
	}
}
