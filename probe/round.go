package probe

import (
	"context"
	"time"
)

// Round probes peers along path until each one's state is known for small
// and full-size probes (or a deadline passes: twice the time the budget
// needs, plus a round) and returns the report. It is flanneld --check's
// probe round: the same scheduler, states and socket as the daemon's.
func Round(ctx context.Context, o Options, path Path, peers []Peer) (Report, error) {
	pr := New(o)
	if len(peers) == 0 {
		return Report{Backend: path.Backend, Source: path.Source, Overlay: path.Overlay(), Rate: pr.o.Rate, Counts: map[string]int{}}, nil
	}
	for _, src := range path.sources() {
		if !src.IsValid() {
			continue
		}
		s, err := pr.open(src)
		if err != nil {
			return Report{}, err
		}
		s.close()
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- pr.Run(ctx) }()
	defer func() { cancel(); <-done }()
	pr.SetPeers(path, peers)
	budget := time.Duration(len(peers)*(LossThreshold+BigLossThreshold+2)) * time.Second / time.Duration(pr.o.Rate)
	deadline := time.Now().Add(budget + (LossThreshold+BigLossThreshold+2)*pr.o.Timeout + MinRound)
	for {
		rep, err := pr.Report(ctx)
		if err != nil {
			return rep, err
		}
		all := len(rep.Peers) == len(peers)
		for _, p := range rep.Peers {
			all = all && p.settled
		}
		if all || time.Now().After(deadline) {
			return rep, nil
		}
		select {
		case <-ctx.Done():
			return rep, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}
