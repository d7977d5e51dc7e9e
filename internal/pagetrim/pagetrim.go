// Package pagetrim hands back the pages of the daemon's own binary that
// start-up touched and the steady state does not use.
//
// The binary carries three stores' clients (etcd v2 and v3, Kubernetes);
// their package initialisation reads much of it (protobuf descriptors, API
// type tables), and the kernel maps file pages around each fault, so after
// start-up most of the ~29 MB file is resident although a running node uses
// a small part of it. Trim marks the binary's read-only mappings for random
// access (no fault-around) and drops them; the pages stay in the page cache
// and the ones still in use come back on their next access.
package pagetrim

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// Trim applies MADV_RANDOM and MADV_DONTNEED to the read-only mappings of
// the running executable (text and read-only data; never a writable one,
// whose private changes MADV_DONTNEED would discard). It returns how many
// bytes of mappings it trimmed.
func Trim() (int, error) {
	exe, err := os.Readlink("/proc/self/exe")
	if err != nil {
		return 0, fmt.Errorf("finding the executable: %w", err)
	}
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		return 0, fmt.Errorf("reading the memory map: %w", err)
	}
	total := 0
	sc := bufio.NewScanner(bytes.NewReader(maps))
	for sc.Scan() {
		// start-end perms offset dev inode path
		f := bytes.Fields(sc.Bytes())
		if len(f) < 6 || string(f[5]) != exe || len(f[1]) < 2 || f[1][1] != '-' {
			continue
		}
		rng := bytes.SplitN(f[0], []byte("-"), 2)
		if len(rng) != 2 {
			continue
		}
		start, err1 := strconv.ParseUint(string(rng[0]), 16, 64)
		end, err2 := strconv.ParseUint(string(rng[1]), 16, 64)
		if err1 != nil || err2 != nil || end <= start {
			continue
		}
		if err := madvise(uintptr(start), uintptr(end-start), unix.MADV_RANDOM); err != nil {
			return total, err
		}
		if err := madvise(uintptr(start), uintptr(end-start), unix.MADV_DONTNEED); err != nil {
			return total, err
		}
		total += int(end - start)
	}
	return total, sc.Err()
}

func madvise(addr, length uintptr, advice int) error {
	if _, _, errno := unix.Syscall(unix.SYS_MADVISE, addr, length, uintptr(advice)); errno != 0 {
		return fmt.Errorf("madvise %#x+%d: %w", addr, length, errno)
	}
	return nil
}
