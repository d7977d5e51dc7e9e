package subnet

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/flanneld-go/flanneld/pkg/ip"
)

// Env is the content of subnet.env.
type Env struct {
	Network netip.Prefix // FLANNEL_NETWORK; invalid when IPv4 is off
	Subnet  netip.Prefix // the lease; FLANNEL_SUBNET is its first host address
	// IPv6Network and IPv6Subnet are FLANNEL_IPV6_NETWORK and (its first
	// host address) FLANNEL_IPV6_SUBNET; invalid without IPv6.
	IPv6Network netip.Prefix
	IPv6Subnet  netip.Prefix
	MTU         int  // FLANNEL_MTU
	IPMasq      bool // FLANNEL_IPMASQ
}

// Marshal renders the file in flannel's order: the IPv4 lines, the IPv6
// lines, then MTU and IPMASQ. An MTU of 0 (unknown) leaves FLANNEL_MTU out
// rather than telling docker to use 0.
func (e Env) Marshal() []byte {
	var b []byte
	if e.Network.IsValid() {
		first := ip.FromUint32(ip.Uint32(e.Subnet.Addr()) + 1)
		b = fmt.Appendf(b, "FLANNEL_NETWORK=%s\nFLANNEL_SUBNET=%s/%d\n", e.Network, first, e.Subnet.Bits())
	}
	if e.IPv6Network.IsValid() {
		b = fmt.Appendf(b, "FLANNEL_IPV6_NETWORK=%s\nFLANNEL_IPV6_SUBNET=%s/%d\n", e.IPv6Network, ip.HostAddr6(e.IPv6Subnet), e.IPv6Subnet.Bits())
	}
	if e.MTU != 0 {
		b = fmt.Appendf(b, "FLANNEL_MTU=%d\n", e.MTU)
	}
	return fmt.Appendf(b, "FLANNEL_IPMASQ=%t\n", e.IPMasq)
}

// WriteEnv writes subnet.env atomically: a temp file in the same directory,
// synced, mode 0644, renamed over path. The directory is created if missing.
func WriteEnv(path string, e Env) (err error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("writing subnet file: %w", err)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("writing subnet file: %w", err)
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if _, err = f.Write(e.Marshal()); err != nil {
		return fmt.Errorf("writing subnet file: %w", err)
	}
	if err = f.Chmod(0o644); err != nil {
		return fmt.Errorf("writing subnet file: %w", err)
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("writing subnet file: %w", err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("writing subnet file: %w", err)
	}
	if err = os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("writing subnet file: %w", err)
	}
	return nil
}

// ErrBadEnv wraps every error of ParseEnv about the file's content.
var ErrBadEnv = errors.New("invalid subnet file")

// ParseEnv parses subnet.env content. Blank lines, comments and unknown
// variables are ignored; FLANNEL_NETWORK and FLANNEL_SUBNET, or
// FLANNEL_IPV6_NETWORK and FLANNEL_IPV6_SUBNET, or all four, are required.
func ParseEnv(data []byte) (Env, error) {
	var e Env
	var haveNet, haveSub, haveNet6, haveSub6 bool
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return Env{}, fmt.Errorf("%w: line %d %s is not NAME=value", ErrBadEnv, n, quote(line))
		}
		v = strings.Trim(v, `"'`)
		switch k {
		case "FLANNEL_NETWORK":
			p, err := ip.ParsePrefix(v)
			if err != nil {
				return Env{}, fmt.Errorf("%w: FLANNEL_NETWORK %s is not an IPv4 CIDR", ErrBadEnv, quote(v))
			}
			e.Network, haveNet = p, true
		case "FLANNEL_SUBNET":
			p, err := ip.ParsePrefix(v)
			if err != nil {
				return Env{}, fmt.Errorf("%w: FLANNEL_SUBNET %s is not an IPv4 CIDR", ErrBadEnv, quote(v))
			}
			// A lease is /30 or shorter (SubnetLen); FLANNEL_SUBNET holds
			// its first host address, which a /31 or /32 does not have.
			if p.Bits() > 30 {
				return Env{}, fmt.Errorf("%w: FLANNEL_SUBNET %s is longer than /30, which no lease is", ErrBadEnv, quote(v))
			}
			e.Subnet, haveSub = p, true
		case "FLANNEL_IPV6_NETWORK":
			p, err := ip.ParsePrefix6(v)
			if err != nil {
				return Env{}, fmt.Errorf("%w: FLANNEL_IPV6_NETWORK %s is not an IPv6 CIDR", ErrBadEnv, quote(v))
			}
			e.IPv6Network, haveNet6 = p, true
		case "FLANNEL_IPV6_SUBNET":
			p, err := ip.ParsePrefix6(v)
			if err != nil {
				return Env{}, fmt.Errorf("%w: FLANNEL_IPV6_SUBNET %s is not an IPv6 CIDR", ErrBadEnv, quote(v))
			}
			if p.Bits() > 126 {
				return Env{}, fmt.Errorf("%w: FLANNEL_IPV6_SUBNET %s is longer than /126, which no lease is", ErrBadEnv, quote(v))
			}
			e.IPv6Subnet, haveSub6 = p, true
		case "FLANNEL_MTU":
			m, err := strconv.Atoi(v)
			if err != nil || m <= 0 {
				return Env{}, fmt.Errorf("%w: FLANNEL_MTU %s is not a positive number", ErrBadEnv, quote(v))
			}
			e.MTU = m
		case "FLANNEL_IPMASQ":
			b, err := strconv.ParseBool(v)
			if err != nil {
				return Env{}, fmt.Errorf("%w: FLANNEL_IPMASQ %s is not true or false", ErrBadEnv, quote(v))
			}
			e.IPMasq = b
		}
	}
	if err := sc.Err(); errors.Is(err, bufio.ErrTooLong) {
		return Env{}, fmt.Errorf("%w: a line is longer than %d KiB; it is not a subnet file", ErrBadEnv, bufio.MaxScanTokenSize/1024)
	} else if err != nil {
		return Env{}, fmt.Errorf("%w: %v", ErrBadEnv, err)
	}
	if haveNet != haveSub || haveNet6 != haveSub6 || (!haveNet && !haveNet6) {
		return Env{}, fmt.Errorf("%w: FLANNEL_NETWORK and FLANNEL_SUBNET (or their FLANNEL_IPV6_ forms) are required, in pairs", ErrBadEnv)
	}
	return e, nil
}

// ReadEnv reads and parses the subnet file at path.
func ReadEnv(path string) (Env, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Env{}, fmt.Errorf("reading subnet file: %w", err)
	}
	e, err := ParseEnv(data)
	if err != nil {
		return Env{}, fmt.Errorf("reading subnet file %s: %w", path, err)
	}
	return e, nil
}
