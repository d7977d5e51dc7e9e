package lab

import (
	"bufio"
	"bytes"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// SubnetEnv is a parsed subnet.env as the daemon writes it.
type SubnetEnv struct {
	Network netip.Prefix // FLANNEL_NETWORK, e.g. 10.5.0.0/16; invalid for IPv6 only
	Subnet  netip.Prefix // FLANNEL_SUBNET with its host address, e.g. 10.5.34.1/24
	// IPv6Network and IPv6Subnet are FLANNEL_IPV6_NETWORK and
	// FLANNEL_IPV6_SUBNET (host address, e.g. fc00:0:0:22::1/64); invalid
	// without IPv6.
	IPv6Network netip.Prefix
	IPv6Subnet  netip.Prefix
	MTU         int               // FLANNEL_MTU
	IPMasq      bool              // FLANNEL_IPMASQ
	Vars        map[string]string // every KEY=VALUE line, as written
}

// ParseSubnetEnv parses subnet.env content. FLANNEL_MTU and FLANNEL_IPMASQ
// must be present and well formed, and FLANNEL_NETWORK and FLANNEL_SUBNET
// unless the file has FLANNEL_IPV6_NETWORK and FLANNEL_IPV6_SUBNET (IPv6
// only).
func ParseSubnetEnv(data []byte) (SubnetEnv, error) {
	env := SubnetEnv{Vars: map[string]string{}}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return SubnetEnv{}, fmt.Errorf("parsing subnet.env: line %q is not KEY=VALUE", line)
		}
		env.Vars[k] = v
	}
	var err error
	get := func(k string) string {
		v, ok := env.Vars[k]
		if !ok && err == nil {
			err = fmt.Errorf("parsing subnet.env: %s is missing", k)
		}
		return v
	}
	if n6, ok := env.Vars["FLANNEL_IPV6_NETWORK"]; ok {
		if env.IPv6Network, err = netip.ParsePrefix(n6); err != nil {
			return SubnetEnv{}, fmt.Errorf("parsing subnet.env FLANNEL_IPV6_NETWORK: %w", err)
		}
		if env.IPv6Subnet, err = netip.ParsePrefix(get("FLANNEL_IPV6_SUBNET")); err != nil {
			return SubnetEnv{}, fmt.Errorf("parsing subnet.env FLANNEL_IPV6_SUBNET: %w", err)
		}
	}
	mtu, masq := get("FLANNEL_MTU"), get("FLANNEL_IPMASQ")
	if _, v4 := env.Vars["FLANNEL_NETWORK"]; v4 || !env.IPv6Network.IsValid() {
		network, subnet := get("FLANNEL_NETWORK"), get("FLANNEL_SUBNET")
		if err != nil {
			return SubnetEnv{}, err
		}
		if env.Network, err = netip.ParsePrefix(network); err != nil {
			return SubnetEnv{}, fmt.Errorf("parsing subnet.env FLANNEL_NETWORK: %w", err)
		}
		if env.Subnet, err = netip.ParsePrefix(subnet); err != nil {
			return SubnetEnv{}, fmt.Errorf("parsing subnet.env FLANNEL_SUBNET: %w", err)
		}
	}
	if err != nil {
		return SubnetEnv{}, err
	}
	if env.MTU, err = strconv.Atoi(mtu); err != nil {
		return SubnetEnv{}, fmt.Errorf("parsing subnet.env FLANNEL_MTU: %w", err)
	}
	if env.IPMasq, err = strconv.ParseBool(masq); err != nil {
		return SubnetEnv{}, fmt.Errorf("parsing subnet.env FLANNEL_IPMASQ: %w", err)
	}
	return env, nil
}
