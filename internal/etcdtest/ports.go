package etcdtest

import (
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strconv"
)

// FreePorts returns n distinct TCP ports that are free on addr in the
// namespace at nsPath ("" for the caller's). They are picked below the
// kernel's ephemeral range (net.ipv4.ip_local_port_range), where no
// outgoing connection is ever given a port: a test server that is stopped
// and started again (an outage) can bind its port again, where a port
// from the ephemeral range may have gone to a client meanwhile.
func FreePorts(nsPath string, addr netip.Addr, n int) ([]int, error) {
	ports := make([]int, n)
	err := InNetNS(nsPath, func() error {
		var ls []net.Listener
		defer func() {
			for _, l := range ls {
				l.Close()
			}
		}()
		low := ephemeralLow()
		for i := range ports {
			var l net.Listener
			var err error
			for try := 0; l == nil && try < 200; try++ {
				port := 0 // the kernel's choice, when there is no room below the range
				if low > minPort+1000 {
					port = minPort + rand.IntN(low-minPort)
				}
				l, err = net.Listen("tcp", net.JoinHostPort(addr.String(), strconv.Itoa(port)))
			}
			if err != nil {
				return fmt.Errorf("finding a free port: %w", err)
			}
			ls = append(ls, l)
			ports[i] = l.Addr().(*net.TCPAddr).Port
		}
		return nil
	})
	return ports, err
}

// minPort is the lowest port FreePorts picks: above the well-known and
// most registered services' ports.
const minPort = 20000

// ephemeralLow is the first port of the ephemeral range of the current
// network namespace (32768 when it cannot be read).
func ephemeralLow() int {
	low := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		fmt.Sscan(string(b), &low)
	}
	return low
}
