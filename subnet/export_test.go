package subnet

import "time"

// SetTiming shortens the waits of m for a test; zero leaves one as it is.
func SetTiming(m *EtcdManager, configRetry, checkInterval, minBackoff, maxBackoff time.Duration) {
	for _, f := range []struct {
		p *time.Duration
		v time.Duration
	}{{&m.configRetry, configRetry}, {&m.checkInterval, checkInterval}, {&m.minBackoff, minBackoff}, {&m.maxBackoff, maxBackoff}} {
		if f.v != 0 {
			*f.p = f.v
		}
	}
}

// ErrContention is errContention, for the race test.
var ErrContention = errContention

// FirstClaim is m.firstClaim, for the first-claim test.
var FirstClaim = (*EtcdManager).firstClaim
