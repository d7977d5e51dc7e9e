package wireguard

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/flanneld-go/flanneld/subnet"
)

func TestParseConfigDefaults(t *testing.T) {
	for _, raw := range []string{``, `null`, `{"Type":"wireguard"}`, `{"ListenPort":null,"Mode":null}`} {
		c, err := parseConfig([]byte(raw))
		if err != nil {
			t.Fatalf("%s: %v", raw, err)
		}
		if c.ListenPort != 51820 || c.ListenPortV6 != 51821 || c.PSK != nil || c.Keepalive != 0 || c.MTU != 0 || c.Mode != ModeSeparate {
			t.Errorf("%s: got %+v, want flannel's defaults", raw, c)
		}
	}
}

func TestParseConfigKeys(t *testing.T) {
	c, err := parseConfig([]byte(`{"Type":"wireguard","listenport":5000,"ListenPortV6":5001,"PSK":"aGVsbG8gd29ybGQgaGVsbG8gd29ybGQgaGVsbG8gd28=","PersistentKeepaliveInterval":25,"MTU":1400,"Mode":"auto"}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.ListenPort != 5000 || c.ListenPortV6 != 5001 || c.PSK == nil || c.Keepalive != 25*time.Second || c.MTU != 1400 || c.Mode != ModeAuto {
		t.Errorf("got %+v", c)
	}
	if got := c.PSK.String(); got != "aGVsbG8gd29ybGQgaGVsbG8gd29ybGQgaGVsbG8gd28=" {
		t.Errorf("PSK %s", got)
	}
	for _, m := range []string{"separate", "auto", "ipv4", "ipv6"} {
		if c, err := parseConfig([]byte(`{"Mode":"` + m + `"}`)); err != nil || string(c.Mode) != m {
			t.Errorf("Mode %s: %+v %v", m, c, err)
		}
	}
}

// Each bad key gives one line that names the key, its value and what to
// write instead, and wraps subnet.ErrInvalidConfig.
func TestParseConfigErrors(t *testing.T) {
	for raw, want := range map[string]string{
		`[1]`:                                   "the Backend block is not a JSON object",
		`{"ListenPort":0}`:                      "ListenPort 0 is out of range; set it to a UDP port from 1 to 65535",
		`{"ListenPort":70000}`:                  "ListenPort 70000 is out of range",
		`{"ListenPort":"51820"}`:                `ListenPort "51820" is not a number`,
		`{"ListenPort":1.5}`:                    "ListenPort 1.5 is not a whole number",
		`{"ListenPortV6":-1}`:                   "ListenPortV6 -1 is out of range",
		`{"PersistentKeepaliveInterval":-5}`:    "PersistentKeepaliveInterval -5 is out of range; set it to seconds from 0 (off) to 65535",
		`{"PersistentKeepaliveInterval":"25s"}`: `PersistentKeepaliveInterval "25s" is not a number`,
		`{"MTU":100}`:                           "MTU 100 is out of range; set it to the underlay MTU, from 656 to 65535",
		`{"MTU":true}`:                          "MTU true is not a number",
		`{"PSK":"secret"}`:                      `PSK is not a WireGuard key (44 base64 characters); make one with "wg genpsk"`,
		`{"PSK":12}`:                            "PSK 12 is not a string",
		`{"Mode":"both"}`:                       `Mode "both" is not known; use one of "separate" (the default), "auto", "ipv4", "ipv6"`,
		`{"Mode":4}`:                            "Mode 4 is not a string",
	} {
		_, err := parseConfig([]byte(raw))
		if err == nil {
			t.Errorf("%s: no error", raw)
			continue
		}
		if !errors.Is(err, subnet.ErrInvalidConfig) {
			t.Errorf("%s: %v does not wrap subnet.ErrInvalidConfig", raw, err)
		}
		msg := err.Error()
		if !strings.HasPrefix(msg, "wireguard backend: ") || !strings.Contains(msg, want) || strings.Contains(msg, "\n") {
			t.Errorf("%s: error %q, want one line with %q", raw, msg, want)
		}
		if strings.Contains(raw, "PSK") && strings.Contains(msg, "secret") {
			t.Errorf("%s: the error repeats the PSK: %q", raw, msg)
		}
	}
}
