package e2e

import (
	"context"
	"errors"
	"os"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/flanneld-go/flanneld/e2e/lab"
)

// BenchmarkStartToSubnetEnv measures the time from starting flanneld (the
// process start, inside the host namespace) to its subnet.env being in
// place, and reports the median and the 90th percentile of the starts. The
// network config exists before each start.
//
//   - restart: the node's lease and subnet.env are still there (the common
//     case: a restarted daemon).
//   - fresh: no lease and no subnet.env; the daemon allocates a subnet.
func BenchmarkStartToSubnetEnv(b *testing.B) {
	needRoot(b)
	l := newLab(b, 1, hostGWConfig)
	h := l.Host(1)
	// A first start so that "restart" finds a lease and a subnet.env.
	startDaemon(b, h)
	waitEnv(b, h)
	if code := stop(b, h.Daemon()); code != 0 {
		b.Fatalf("flanneld exited with %d after SIGTERM", code)
	}

	for _, mode := range []string{"restart", "fresh"} {
		b.Run(mode, func(b *testing.B) {
			var times []time.Duration
			for b.Loop() {
				b.StopTimer()
				if mode == "fresh" {
					forget(b, l, h)
				}
				ino := inode(h.SubnetFile)
				b.StartTimer()
				begin := time.Now()
				d := startDaemon(b, h)
				waitNewEnv(b, h, d, ino)
				times = append(times, time.Since(begin))
				b.StopTimer()
				if code := stop(b, d); code != 0 {
					b.Fatalf("flanneld exited with %d after SIGTERM", code)
				}
				b.StartTimer()
			}
			slices.Sort(times)
			b.ReportMetric(float64(times[len(times)/2].Microseconds())/1000, "median-ms")
			b.ReportMetric(float64(times[len(times)*9/10].Microseconds())/1000, "p90-ms")
			b.ReportMetric(float64(len(times)), "starts")
		})
	}
}

// forget deletes the host's leases and its subnet.env.
func forget(b *testing.B, l *lab.Lab, h *lab.Host) {
	ctx, cancel := context.WithTimeout(context.Background(), converge)
	defer cancel()
	leases, err := readLeases(ctx, l)
	if err != nil {
		b.Fatal(err)
	}
	for _, ls := range leasesOf(leases, h) {
		if _, err := l.KeysAPI().Delete(ctx, leaseKey(l, ls.Subnet), nil); err != nil {
			b.Fatal(err)
		}
	}
	if err := os.Remove(h.SubnetFile); err != nil && !errors.Is(err, os.ErrNotExist) {
		b.Fatal(err)
	}
}

// inode is the inode number of path, 0 if it does not exist. The daemon
// writes subnet.env to a temporary file and renames it, so a new file has
// a new inode.
func inode(path string) uint64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Ino
	}
	return 0
}

// waitNewEnv polls (every millisecond, to keep the measurement fine) until
// the host's subnet file is a new, complete subnet.env.
func waitNewEnv(b *testing.B, h *lab.Host, d *lab.Daemon, oldIno uint64) {
	deadline := time.Now().Add(converge)
	for {
		if ino := inode(h.SubnetFile); ino != 0 && ino != oldIno {
			if _, err := h.ReadSubnetEnv(); err == nil {
				return
			}
		}
		if d.Exited() {
			b.Fatalf("flanneld exited before writing subnet.env; log:\n%s", d.Log())
		}
		if time.Now().After(deadline) {
			b.Fatalf("no new subnet.env within %v", converge)
		}
		time.Sleep(time.Millisecond)
	}
}
