package wireguard

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"strings"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/flanneld-go/flanneld/subnet"
)

// Defaults of the Backend block (flannel v0.28's).
const (
	DefaultListenPort   = 51820
	DefaultListenPortV6 = 51821
)

// Mode says how the address families map onto devices.
type Mode string

// The modes flannel knows.
const (
	// ModeSeparate (the default): flannel-wg carries IPv4 on ListenPort,
	// flannel-wg-v6 carries IPv6 on ListenPortV6.
	ModeSeparate Mode = "separate"
	// ModeAuto: one device for both families; a peer is reached over IPv6
	// only when its IPv4 address is private and both ends have IPv6.
	ModeAuto Mode = "auto"
	// ModeIPv4: one device, peers reached at their PublicIP.
	ModeIPv4 Mode = "ipv4"
	// ModeIPv6: one device, peers reached at their PublicIPv6.
	ModeIPv6 Mode = "ipv6"
)

// config is the wireguard Backend block with defaults applied.
type config struct {
	ListenPort   int
	ListenPortV6 int
	// PSK is the preshared key of every peer; nil without one.
	PSK *wgtypes.Key
	// Keepalive is the persistent keepalive interval; 0 is off.
	Keepalive time.Duration
	// MTU is the underlay MTU the device MTU (MTU - 80) derives from; 0
	// means the external interface's.
	MTU  int
	Mode Mode
}

// configError is a mistake in the Backend block; it wraps
// subnet.ErrInvalidConfig, the Backend block being part of the network
// config.
type configError string

func (e configError) Error() string { return "wireguard backend: " + string(e) }

func (configError) Unwrap() error { return subnet.ErrInvalidConfig }

// parseConfig reads the wireguard keys of the raw Backend block (nil means
// all defaults). Keys match case-insensitively; unknown keys (Type among
// them) are ignored; null means the default.
func parseConfig(raw json.RawMessage) (config, error) {
	cfg := config{ListenPort: DefaultListenPort, ListenPortV6: DefaultListenPortV6, Mode: ModeSeparate}
	if isNull(raw) {
		return cfg, nil
	}
	var keys struct {
		ListenPort, ListenPortV6, PSK, PersistentKeepaliveInterval, MTU, Mode json.RawMessage
	}
	if err := json.Unmarshal(raw, &keys); err != nil {
		return config{}, configError(`the Backend block is not a JSON object; write it like {"Type":"wireguard","ListenPort":51820}`)
	}
	var err error
	if cfg.ListenPort, err = intKey("ListenPort", keys.ListenPort, cfg.ListenPort, 1, 65535, "a UDP port from 1 to 65535 such as 51820"); err != nil {
		return config{}, err
	}
	if cfg.ListenPortV6, err = intKey("ListenPortV6", keys.ListenPortV6, cfg.ListenPortV6, 1, 65535, "a UDP port from 1 to 65535 such as 51821"); err != nil {
		return config{}, err
	}
	ka, err := intKey("PersistentKeepaliveInterval", keys.PersistentKeepaliveInterval, 0, 0, 65535, "seconds from 0 (off) to 65535 such as 25")
	if err != nil {
		return config{}, err
	}
	cfg.Keepalive = time.Duration(ka) * time.Second
	if cfg.MTU, err = intKey("MTU", keys.MTU, 0, minMTU, 65535, fmt.Sprintf("the underlay MTU, from %d to 65535, such as 1500 (the device gets MTU - 80)", minMTU)); err != nil {
		return config{}, err
	}
	if !isNull(keys.PSK) {
		var s string
		if json.Unmarshal(keys.PSK, &s) != nil {
			return config{}, configError("PSK " + string(bytes.TrimSpace(keys.PSK)) + ` is not a string; write a key made by "wg genpsk", like "PSK":"<44 base64 characters>"`)
		}
		if s != "" {
			k, err := wgtypes.ParseKey(s)
			if err != nil {
				return config{}, configError(`PSK is not a WireGuard key (44 base64 characters); make one with "wg genpsk"`)
			}
			cfg.PSK = &k
		}
	}
	if !isNull(keys.Mode) {
		var s string
		if json.Unmarshal(keys.Mode, &s) != nil {
			return config{}, configError("Mode " + string(bytes.TrimSpace(keys.Mode)) + ` is not a string; use one of "separate", "auto", "ipv4", "ipv6"`)
		}
		switch m := Mode(s); m {
		case ModeSeparate, ModeAuto, ModeIPv4, ModeIPv6:
			cfg.Mode = m
		default:
			return config{}, configError(fmt.Sprintf(`Mode %q is not known; use one of "separate" (the default), "auto", "ipv4", "ipv6"`, s))
		}
	}
	return cfg, nil
}

// minMTU is the smallest MTU key accepted: the device gets 576.
const minMTU = 576 + overhead

func isNull(raw json.RawMessage) bool {
	t := bytes.TrimSpace(raw)
	return len(t) == 0 || bytes.Equal(t, []byte("null"))
}

// intKey parses a whole JSON number in [lo, hi]; null or absent gives def.
func intKey(name string, raw json.RawMessage, def, lo, hi int, want string) (int, error) {
	if isNull(raw) {
		return def, nil
	}
	s := string(bytes.TrimSpace(raw))
	var f float64
	if json.Unmarshal(raw, &f) != nil || strings.HasPrefix(s, `"`) {
		return 0, configError(fmt.Sprintf("%s %s is not a number; set it to %s", name, s, want))
	}
	if f != math.Trunc(f) {
		return 0, configError(fmt.Sprintf("%s %s is not a whole number; set it to %s", name, s, want))
	}
	if f < float64(lo) || f > float64(hi) {
		return 0, configError(fmt.Sprintf("%s %s is out of range; set it to %s", name, s, want))
	}
	return int(f), nil
}
