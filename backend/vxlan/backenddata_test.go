package vxlan

import (
	"encoding/json"
	"testing"
)

// TestBackendDataForms: the BackendData this backend writes is flannel
// v0.28's {"VNI":N,"VtepMAC":"..."} (what flannel v0.10 reads too, ignoring
// VNI), and leases in either form, or spaced out by another writer, give
// the same MAC, through the fast path where it applies.
func TestBackendDataForms(t *testing.T) {
	b, err := json.Marshal(backendData{VNI: 7, VtepMAC: "0e:00:00:00:00:01"})
	if err != nil || string(b) != `{"VNI":7,"VtepMAC":"0e:00:00:00:00:01"}` {
		t.Errorf("BackendData = %s, %v; want flannel v0.28's form", b, err)
	}
	// What flannel v0.10 decodes a vxlan lease into.
	var v010 struct{ VtepMAC string }
	if err := json.Unmarshal(b, &v010); err != nil || v010.VtepMAC != "0e:00:00:00:00:01" {
		t.Errorf("a flannel v0.10 reader gets %+v, %v", v010, err)
	}
	for _, tc := range []struct {
		data string
		fast bool
	}{
		{`{"VtepMAC":"0e:00:00:00:00:01"}`, true},
		{`{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}`, true},
		{`{"VNI":16777215,"VtepMAC":"0E:00:00:00:00:01"}`, true},
		{`{"VtepMAC":"0e:00:00:00:00:01","VNI":1}`, false},
		{`{ "VNI": 1, "VtepMAC": "0e:00:00:00:00:01" }`, false},
		{`{"VNI":-1,"VtepMAC":"0e:00:00:00:00:01"}`, false},
	} {
		_, fast := fastMAC([]byte(tc.data))
		if fast != tc.fast {
			t.Errorf("fastMAC(%s) ok = %v, want %v", tc.data, fast, tc.fast)
		}
		m, err := leaseMAC("BackendData", json.RawMessage(tc.data))
		if err != nil || m.String() != "0e:00:00:00:00:01" {
			t.Errorf("leaseMAC(%s) = %v, %v", tc.data, m, err)
		}
	}
	for _, bad := range []string{`{"VNI":1,"VtepMAC":"01:00:5e:00:00:01"}`, `{"VNI":1}`, `{"VNI":1,"VtepMAC":"0e:00:00:00:00"}`} {
		if m, err := leaseMAC("BackendData", json.RawMessage(bad)); err == nil {
			t.Errorf("leaseMAC(%s) = %v, want an error", bad, m)
		}
	}
}
