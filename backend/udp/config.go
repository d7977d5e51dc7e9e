package udp

import (
	"bytes"
	"encoding/json"
	"fmt"

	"github.com/flanneld-go/flanneld/subnet"
)

// ErrInvalidConfig wraps every error about the udp keys of the Backend
// block. It wraps subnet.ErrInvalidConfig.
var ErrInvalidConfig = fmt.Errorf("udp backend: %w", subnet.ErrInvalidConfig)

// DefaultPort is flannel's udp port.
const DefaultPort = 8285

// config is the udp Backend block with defaults applied.
type config struct {
	// Port is the UDP port, the same on every node.
	Port int
	// TUNOffload enables IFF_VNET_HDR and TCP/UDP segmentation offload on
	// the TUN: reads return super-packets that are split in Go, writes carry
	// coalesced segments.
	TUNOffload bool
	// UDPGSO sends runs of datagrams for one peer with UDP_SEGMENT.
	UDPGSO bool
	// UDPGRO receives coalesced datagrams with UDP_GRO.
	UDPGRO bool
	// StrictSource accepts a datagram only from a PublicIP that holds a
	// lease and only when its inner source lies in that lease's subnet.
	StrictSource bool
}

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalidConfig, fmt.Sprintf(format, args...))
}

// parseConfig reads the udp keys from the raw Backend block (nil means
// none). Keys match case-insensitively; unknown keys are ignored.
func parseConfig(raw json.RawMessage) (config, error) {
	c := config{Port: DefaultPort, TUNOffload: true, UDPGSO: true, UDPGRO: true, StrictSource: true}
	if len(bytes.TrimSpace(raw)) == 0 || bytes.Equal(bytes.TrimSpace(raw), []byte("null")) {
		return c, nil
	}
	var keys struct {
		Port                                     *json.RawMessage
		TUNOffload, UDPGSO, UDPGRO, StrictSource *json.RawMessage
	}
	if err := json.Unmarshal(raw, &keys); err != nil {
		return c, invalid("Backend is not a JSON object; write it like {\"Type\":\"udp\",\"Port\":8285}")
	}
	if keys.Port != nil {
		var p int
		if err := json.Unmarshal(*keys.Port, &p); err != nil {
			return c, invalid("Backend.Port %s is not a whole number; set it to a UDP port from 1 to 65535 such as 8285", *keys.Port)
		}
		if p < 1 || p > 65535 {
			return c, invalid("Backend.Port %d is out of range; set it to a UDP port from 1 to 65535 such as 8285", p)
		}
		c.Port = p
	}
	for _, b := range []struct {
		name string
		raw  *json.RawMessage
		dst  *bool
	}{
		{"TUNOffload", keys.TUNOffload, &c.TUNOffload},
		{"UDPGSO", keys.UDPGSO, &c.UDPGSO},
		{"UDPGRO", keys.UDPGRO, &c.UDPGRO},
		{"StrictSource", keys.StrictSource, &c.StrictSource},
	} {
		if b.raw == nil {
			continue
		}
		if err := json.Unmarshal(*b.raw, b.dst); err != nil {
			return c, invalid("Backend.%s %s is not a boolean; write true or false", b.name, *b.raw)
		}
	}
	return c, nil
}
