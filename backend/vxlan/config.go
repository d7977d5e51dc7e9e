package vxlan

import (
	"bytes"
	"encoding/json"
	"math"
	"strconv"

	"github.com/flanneld-go/flanneld/subnet"
)

// The keys of the vxlan Backend block and their limits.
const (
	defaultVNI = 1
	maxVNI     = 1<<24 - 1
	maxPort    = 65535
	// kernelPort is the destination port Linux picks for a vxlan device
	// created without one (flannel's Port 0). The device is created with it
	// explicitly, so the kernel's choice never changes under us.
	kernelPort = 8472
)

// config is the vxlan Backend block with defaults applied.
type config struct {
	// VNI is the VXLAN network identifier, 1..16777215; the device is
	// flannel.<VNI>.
	VNI int
	// Port is the UDP destination port; 0 in the config means kernelPort.
	Port int
	// GBP turns on the Group Based Policy extension.
	GBP bool
	// DirectRouting routes to peers on a directly connected network of the
	// external interface without encapsulation.
	DirectRouting bool
}

// configError is a mistake in the Backend block. Its text names the key, the
// value and the rule; it wraps subnet.ErrInvalidConfig because the Backend
// block is part of the network config.
type configError string

func (e configError) Error() string { return "vxlan backend: " + string(e) }

func (configError) Unwrap() error { return subnet.ErrInvalidConfig }

// parseConfig reads the vxlan keys of the raw Backend block (nil means all
// defaults). Keys match case-insensitively, as encoding/json does; unknown
// keys (Type among them) are ignored; null means the default.
func parseConfig(raw json.RawMessage) (config, error) {
	cfg := config{VNI: defaultVNI, Port: kernelPort}
	if isNull(raw) {
		return cfg, nil
	}
	var keys struct {
		VNI, Port, GBP, DirectRouting json.RawMessage
	}
	if err := json.Unmarshal(raw, &keys); err != nil {
		return config{}, configError("the Backend block is not a JSON object; write it like {\"Type\":\"vxlan\",\"VNI\":1}")
	}
	if !isNull(keys.VNI) {
		n, err := intKey("VNI", keys.VNI, "1")
		if err != nil {
			return config{}, err
		}
		if n < 1 || n > maxVNI {
			return config{}, configError("VNI " + string(keys.VNI) + " is out of range 1.." + strconv.Itoa(maxVNI))
		}
		cfg.VNI = int(n)
	}
	if !isNull(keys.Port) {
		n, err := intKey("Port", keys.Port, "8472")
		if err != nil {
			return config{}, err
		}
		if n < 0 || n > maxPort {
			return config{}, configError("Port " + string(keys.Port) + " is out of range 0..65535 (0 means the kernel default 8472)")
		}
		if n != 0 {
			cfg.Port = int(n)
		}
	}
	var err error
	if cfg.GBP, err = boolKey("GBP", keys.GBP); err != nil {
		return config{}, err
	}
	if cfg.DirectRouting, err = boolKey("DirectRouting", keys.DirectRouting); err != nil {
		return config{}, err
	}
	return cfg, nil
}

func isNull(raw json.RawMessage) bool {
	t := bytes.TrimSpace(raw)
	return len(t) == 0 || bytes.Equal(t, []byte("null"))
}

// intKey parses a JSON number that must be whole. A whole number too large
// for int64 comes back as math.MaxInt64 so that the caller's range check
// names it.
func intKey(name string, raw json.RawMessage, example string) (int64, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var v any
	num, ok := json.Number(""), false
	if dec.Decode(&v) == nil {
		num, ok = v.(json.Number)
	}
	if !ok {
		return 0, configError(name + " " + string(bytes.TrimSpace(raw)) + " is not a number; write it like \"" + name + "\":" + example)
	}
	if n, err := num.Int64(); err == nil {
		return n, nil
	}
	f, err := num.Float64()
	if (err == nil || math.IsInf(f, 0)) && f == math.Trunc(f) {
		// 1e3, 8472.0 or a number beyond int64.
		switch {
		case f >= math.MaxInt64:
			return math.MaxInt64, nil
		case f <= math.MinInt64:
			return math.MinInt64, nil
		}
		return int64(f), nil
	}
	return 0, configError(name + " " + string(num) + " is not a whole number; write it like \"" + name + "\":" + example)
}

func boolKey(name string, raw json.RawMessage) (bool, error) {
	if isNull(raw) {
		return false, nil
	}
	var b bool
	if err := json.Unmarshal(raw, &b); err != nil {
		return false, configError(name + " " + string(bytes.TrimSpace(raw)) + " is not a boolean; write true or false")
	}
	return b, nil
}
