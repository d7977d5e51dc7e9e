package agent

import (
	"context"
	"fmt"
)

// rulesState is the loop's view of the rule keeper of the current lease.
type rulesState struct {
	// status carries each result of the keeper's first install: errors
	// while it retries, then nil once the rules are in.
	status    chan error
	installed bool // the keeper of the current lease installed its rules
	cancel    context.CancelFunc
	done      chan struct{}
}

// startRules (re)starts the rule keeper for the current lease: a goroutine
// installs the rules, retrying with back-off until that succeeds, reports
// each attempt on n.rules.status, then keeps them in place until stopRules.
// Without Options.Rules there is nothing to install.
func (n *node) startRules(ctx context.Context) error {
	n.stopRules()
	if n.o.Rules == nil {
		n.rules.installed = true
		return nil
	}
	n.rules.installed = false
	set := RuleSet{IPMasq: n.o.IPMasq, NFTables: n.cfg.EnableNFTables}
	if n.cfg.EnableIPv4 {
		set.Network, set.Lease = n.cfg.Network, n.lease.Subnet
	}
	if n.cfg.EnableIPv6 {
		set.IPv6Network, set.IPv6Lease = n.cfg.IPv6Network, n.lease.IPv6Subnet
	}
	r, err := n.o.Rules(set)
	if err != nil {
		return fmt.Errorf("setting up forward and masquerade rules: %w", err)
	}
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	n.rules.cancel, n.rules.done = cancel, done
	status, clk, wait := n.rules.status, n.o.Clock, n.o.RulesRetry
	go func() {
		defer close(done)
		for {
			err := r.Ensure(rctx)
			select {
			case status <- err:
			case <-rctx.Done():
				return
			}
			if err == nil {
				break
			}
			select {
			case <-rctx.Done():
				return
			case <-clk.After(wait):
			}
			wait = min(2*wait, maxRetry)
		}
		if err := r.Run(rctx); err != nil && rctx.Err() == nil {
			n.log.Error(err, "Keeping the forward and masquerade rules in place stopped")
		}
	}()
	return nil
}

// rulesInstalled takes one result of the keeper's first install.
func (n *node) rulesInstalled(err error) {
	if err != nil {
		n.log.Error(err, "Installing the forward and masquerade rules failed; retrying with back-off")
		if n.o.OnNotReady != nil {
			n.o.OnNotReady("forward and masquerade rules not in place: " + err.Error())
		}
		return
	}
	n.rules.installed = true
	n.maybeReady()
}

// stopRules stops the keeper, if one runs, and waits for it.
func (n *node) stopRules() {
	if n.rules.cancel != nil {
		n.rules.cancel()
		<-n.rules.done
		n.rules.cancel = nil
	}
}
