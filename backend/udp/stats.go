package udp

import (
	"sync/atomic"
	"time"

	"k8s.io/klog/v2"
)

// Stats are the backend's packet counters since Init.
type Stats struct {
	// TUNReads is the number of reads from the TUN; with offloads one read
	// may return a super-packet of many packets.
	TUNReads uint64
	// TUNRead is the number of packets read from the TUN (after splitting
	// super-packets).
	TUNRead uint64
	// UDPSent is the number of datagrams handed to the kernel.
	UDPSent uint64
	// UDPMessages is the number of messages received; with UDP_GRO one
	// message may carry many datagrams.
	UDPMessages uint64
	// UDPReceived is the number of inner packets received (after splitting
	// coalesced datagrams).
	UDPReceived uint64
	// TUNWritten is the number of packets handed to the TUN.
	TUNWritten uint64
	// Unreachable is the number of ICMP net-unreachable errors written
	// into the TUN.
	Unreachable uint64

	// Drops, by reason.
	// UnknownSender: a datagram from an address that holds no lease.
	UnknownSender uint64
	// SpoofedSource: an inner source outside the sender's lease subnets.
	SpoofedSource uint64
	// NoRoute: a packet from the TUN for which no lease holds the
	// destination.
	NoRoute uint64
	// TTL: the inner TTL ran out.
	TTL uint64
	// NonIPv4: a packet that is not IPv4.
	NonIPv4 uint64
	// Malformed: a truncated datagram, a bad IPv4 header or length, or a
	// TUN read that could not be split.
	Malformed uint64
	// SendErrors: packets the UDP socket refused.
	SendErrors uint64
	// TUNWriteErrors: batches the TUN refused (in whole or part).
	TUNWriteErrors uint64
}

// dropReason indexes the drop counters.
type dropReason int

const (
	dropUnknownSender dropReason = iota
	dropSpoofedSource
	dropNoRoute
	dropTTL
	dropNonIPv4
	dropMalformed
	dropSendError
	dropTUNWrite
	numDropReasons
)

var dropNames = [numDropReasons]string{
	"unknown sender", "spoofed source", "no route", "ttl expired", "not ipv4", "malformed", "send error", "tun write error",
}

// logEvery is the least time between two log lines about one drop reason.
const logEvery = 10 * time.Second

type counters struct {
	tunReads, tunRead, udpSent, udpMessages, udpReceived, tunWritten, unreachable atomic.Uint64
	drops                                                                         [numDropReasons]atomic.Uint64
	lastLog                                                                       [numDropReasons]atomic.Int64
}

func (c *counters) snapshot() Stats {
	return Stats{
		TUNReads:       c.tunReads.Load(),
		TUNRead:        c.tunRead.Load(),
		UDPMessages:    c.udpMessages.Load(),
		UDPSent:        c.udpSent.Load(),
		UDPReceived:    c.udpReceived.Load(),
		TUNWritten:     c.tunWritten.Load(),
		Unreachable:    c.unreachable.Load(),
		UnknownSender:  c.drops[dropUnknownSender].Load(),
		SpoofedSource:  c.drops[dropSpoofedSource].Load(),
		NoRoute:        c.drops[dropNoRoute].Load(),
		TTL:            c.drops[dropTTL].Load(),
		NonIPv4:        c.drops[dropNonIPv4].Load(),
		Malformed:      c.drops[dropMalformed].Load(),
		SendErrors:     c.drops[dropSendError].Load(),
		TUNWriteErrors: c.drops[dropTUNWrite].Load(),
	}
}

// drop counts n packets dropped for reason r and logs, at most once every
// logEvery per reason, the running total and one example. detail is only
// called when a line is logged.
func (c *counters) drop(log klog.Logger, r dropReason, n uint64, detail func() []any) {
	total := c.drops[r].Add(n)
	now := time.Now().UnixNano()
	last := c.lastLog[r].Load()
	if now-last < int64(logEvery) || !c.lastLog[r].CompareAndSwap(last, now) {
		return
	}
	kv := []any{"reason", dropNames[r], "total", total}
	if detail != nil {
		kv = append(kv, detail()...)
	}
	if r == dropNonIPv4 {
		// IPv6 neighbour discovery on flannel0 is routine.
		log = log.V(2)
	}
	log.Info("Dropping packets", kv...)
}
