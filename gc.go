package main

import "runtime/debug"

// defaultGCPercent is the garbage collector's GOGC when the environment
// sets none. What flanneld keeps (the lease set, the peer table) is most of
// its heap, and it allocates in short bursts: a resync every
// --route-resync, a batch of lease events. Go's default of 100 lets the
// heap grow to twice what is live before collecting; 25 holds it to a
// quarter more. At 10,000 leases that is 11.5 MB resident instead of
// 14.9, for a collection or two more per resync and no idle CPU the
// benchmark can tell apart (see "Large clusters" in the README).
const defaultGCPercent = 25

// setGCPercent applies defaultGCPercent unless GOGC is set (the runtime
// has then applied it), and returns the GOGC in force.
func setGCPercent(lookupEnv func(string) (string, bool)) int {
	if _, set := lookupEnv("GOGC"); set {
		p := debug.SetGCPercent(100)
		debug.SetGCPercent(p)
		return p
	}
	debug.SetGCPercent(defaultGCPercent)
	return defaultGCPercent
}
