package vxlan

import (
	"errors"
	"testing"

	"github.com/flanneld-go/flanneld/subnet"
)

func TestParseConfig(t *testing.T) {
	tests := []struct {
		name, json string
		want       config
	}{
		{"no Backend block", ``, config{VNI: 1, Port: 8472}},
		{"null", `null`, config{VNI: 1, Port: 8472}},
		{"type only", `{"Type":"vxlan"}`, config{VNI: 1, Port: 8472}},
		{"all keys", `{"Type":"vxlan","VNI":4096,"Port":4789,"GBP":true,"DirectRouting":true}`,
			config{VNI: 4096, Port: 4789, GBP: true, DirectRouting: true}},
		{"keys in any case", `{"type":"vxlan","vni":7,"PORT":4789,"gbp":true,"directrouting":true}`,
			config{VNI: 7, Port: 4789, GBP: true, DirectRouting: true}},
		{"Port 0 is the kernel default", `{"Port":0}`, config{VNI: 1, Port: 8472}},
		{"null values are defaults", `{"VNI":null,"Port":null,"GBP":null,"DirectRouting":null}`, config{VNI: 1, Port: 8472}},
		{"VNI bounds", `{"VNI":16777215,"Port":65535}`, config{VNI: 16777215, Port: 65535}},
		{"whole number in float form", `{"VNI":1e3,"Port":8472.0}`, config{VNI: 1000, Port: 8472}},
		{"unknown keys ignored", `{"Type":"vxlan","VNI":2,"MacPrefix":"0E:2A"}`, config{VNI: 2, Port: 8472}},
		{"false booleans", `{"GBP":false,"DirectRouting":false}`, config{VNI: 1, Port: 8472}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseConfig([]byte(tt.json))
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Errorf("parseConfig(%s) = %+v, want %+v", tt.json, got, tt.want)
			}
		})
	}
}

func TestParseConfigErrors(t *testing.T) {
	tests := []struct{ name, json, want string }{
		{"VNI 0", `{"VNI":0}`, "vxlan backend: VNI 0 is out of range 1..16777215"},
		{"VNI negative", `{"VNI":-1}`, "vxlan backend: VNI -1 is out of range 1..16777215"},
		{"VNI too big", `{"VNI":16777216}`, "vxlan backend: VNI 16777216 is out of range 1..16777215"},
		{"VNI beyond int64", `{"VNI":1e30}`, "vxlan backend: VNI 1e30 is out of range 1..16777215"},
		{"VNI string", `{"VNI":"1"}`, `vxlan backend: VNI "1" is not a number; write it like "VNI":1`},
		{"VNI fraction", `{"VNI":1.5}`, `vxlan backend: VNI 1.5 is not a whole number; write it like "VNI":1`},
		{"VNI bool", `{"VNI":true}`, `vxlan backend: VNI true is not a number; write it like "VNI":1`},
		{"VNI object", `{"VNI":{}}`, `vxlan backend: VNI {} is not a number; write it like "VNI":1`},
		{"Port negative", `{"Port":-1}`, "vxlan backend: Port -1 is out of range 0..65535 (0 means the kernel default 8472)"},
		{"Port too big", `{"Port":65536}`, "vxlan backend: Port 65536 is out of range 0..65535 (0 means the kernel default 8472)"},
		{"Port string", `{"Port":"4789"}`, `vxlan backend: Port "4789" is not a number; write it like "Port":8472`},
		{"Port fraction", `{"Port":47.89}`, `vxlan backend: Port 47.89 is not a whole number; write it like "Port":8472`},
		{"GBP string", `{"GBP":"true"}`, `vxlan backend: GBP "true" is not a boolean; write true or false`},
		{"GBP number", `{"GBP":1}`, `vxlan backend: GBP 1 is not a boolean; write true or false`},
		{"DirectRouting string", `{"DirectRouting":"yes"}`, `vxlan backend: DirectRouting "yes" is not a boolean; write true or false`},
		{"not an object", `[1]`, `vxlan backend: the Backend block is not a JSON object; write it like {"Type":"vxlan","VNI":1}`},
		{"lower-case key checked too", `{"vni":0}`, "vxlan backend: VNI 0 is out of range 1..16777215"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseConfig([]byte(tt.json))
			if err == nil {
				t.Fatalf("parseConfig(%s) succeeded, want %q", tt.json, tt.want)
			}
			if err.Error() != tt.want {
				t.Errorf("parseConfig(%s) error\n got %q\nwant %q", tt.json, err, tt.want)
			}
			if !errors.Is(err, subnet.ErrInvalidConfig) {
				t.Errorf("error %v does not wrap subnet.ErrInvalidConfig", err)
			}
		})
	}
}
