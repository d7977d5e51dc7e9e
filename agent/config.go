package agent

import (
	"errors"

	"github.com/flanneld-go/flanneld/internal/metrics"
	"github.com/flanneld-go/flanneld/subnet"
)

// configSeen reports a change of the stored network config. Nothing is
// applied live (as in flannel): the daemon keeps running on the config it
// started with, says what changed and that a restart applies it, and shows
// the state in the flannel_network_config_state metric. Each state is
// logged once.
func (n *node) configSeen(u subnet.ConfigUpdate) {
	var state, detail string
	switch {
	case u.Config != nil:
		if detail = n.cfg.Changes(u.Config); detail == "" {
			state = "current"
		} else {
			state = "changed"
		}
	case errors.Is(u.Err, subnet.ErrConfigMissing):
		state = "missing"
	default:
		state, detail = "invalid", u.Err.Error()
	}
	if seen := state + "\x00" + detail; seen != n.cfgSeen {
		was := n.cfgSeen
		n.cfgSeen = seen
		metrics.SetNetworkConfig(state)
		switch state {
		case "current":
			if was != "current" {
				n.log.Info("The stored network config is again the one this daemon runs on")
			}
		case "changed":
			n.log.Info("The stored network config changed; restart flanneld to apply it (nothing is applied live)", "changes", detail)
		case "missing":
			n.log.Info("The network config was removed from the store; running on the config read at start until it is back")
		case "invalid":
			n.log.Info("The stored network config is invalid; running on the config read at start; fix it", "reason", detail)
		}
	}
}
