package agent

import (
	"strings"
	"testing"
	"time"

	"github.com/flanneld-go/flanneld/internal/metrics"
)

// TestRunReportsConfigChange: a config changed while the daemon runs is
// logged once, naming what changed and that a restart applies it, and shown
// in /metrics; nothing is applied (the backend keeps the network it started
// with). Writing the old config back returns to "current".
func TestRunReportsConfigChange(t *testing.T) {
	l := newLab(t)
	l.config("")
	r, log := l.startLogged(Options{RouteResync: 20 * time.Millisecond})
	r.waitReady(t)
	state := func(s string) bool { return metrics.NetworkConfig.WithLabelValues(s).Get() == 1 }
	if !state("current") {
		t.Error("config state is not current at start")
	}
	const msg = "The stored network config changed; restart flanneld to apply it"
	changed := `{"Network":"10.6.0.0/16","SubnetLen":26,"Backend":{"Type":"fake-test","Test":"` + t.Name() + `"}}`
	l.set("config", changed, 0)
	eventually(t, "the change reported", func() bool { return state("changed") && countLog(log, msg, "", "") == 1 })
	l.set("config", changed, 0) // the same value again
	_, _, applies := fakeFor(t).state()
	eventually(t, "resyncs", func() bool { _, _, n := fakeFor(t).state(); return n > applies+5 })
	if n := countLog(log, msg, "", ""); n != 1 {
		t.Errorf("the change was logged %d times, want once", n)
	}
	for _, e := range log.Data() {
		if strings.Contains(e.Message, msg) {
			want := "Network 10.5.0.0/16 → 10.6.0.0/16; SubnetLen 24 → 26"
			if got := strings.Join(strings.Fields(strings.TrimPrefix(e.ParameterKVList[1].(string), "")), " "); !strings.HasPrefix(got, want) {
				t.Errorf("changes = %q, want it to start with %q", got, want)
			}
		}
	}
	if own, _, _ := fakeFor(t).state(); !strings.HasPrefix(own.Subnet.String(), "10.5.") {
		t.Errorf("own lease %v: the change was applied live", own.Subnet)
	}
	l.config("")
	eventually(t, "back to current", func() bool { return state("current") })
	if n := countLog(log, "again the one this daemon runs on", "", ""); n != 1 {
		t.Errorf("the return was logged %d times, want once", n)
	}
}
