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
	Network netip.Prefix      // FLANNEL_NETWORK, e.g. 10.5.0.0/16
	Subnet  netip.Prefix      // FLANNEL_SUBNET with its host address, e.g. 10.5.34.1/24
	MTU     int               // FLANNEL_MTU
	IPMasq  bool              // FLANNEL_IPMASQ
	Vars    map[string]string // every KEY=VALUE line, as written
}

// ParseSubnetEnv parses subnet.env content. All four FLANNEL_ variables
// must be present and well formed.
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
	network, subnet, mtu, masq := get("FLANNEL_NETWORK"), get("FLANNEL_SUBNET"), get("FLANNEL_MTU"), get("FLANNEL_IPMASQ")
	if err != nil {
		return SubnetEnv{}, err
	}
	if env.Network, err = netip.ParsePrefix(network); err != nil {
		return SubnetEnv{}, fmt.Errorf("parsing subnet.env FLANNEL_NETWORK: %w", err)
	}
	if env.Subnet, err = netip.ParsePrefix(subnet); err != nil {
		return SubnetEnv{}, fmt.Errorf("parsing subnet.env FLANNEL_SUBNET: %w", err)
	}
	if env.MTU, err = strconv.Atoi(mtu); err != nil {
		return SubnetEnv{}, fmt.Errorf("parsing subnet.env FLANNEL_MTU: %w", err)
	}
	if env.IPMasq, err = strconv.ParseBool(masq); err != nil {
		return SubnetEnv{}, fmt.Errorf("parsing subnet.env FLANNEL_IPMASQ: %w", err)
	}
	return env, nil
}
