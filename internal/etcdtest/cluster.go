package etcdtest

import (
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/client/v2"
	"go.etcd.io/etcd/server/v3/embed"
)

// Cluster is a cluster of embedded etcd members that replicate one v2
// keyspace. Each member is a Server: stop one (Member(i).Stop) to see the
// others carry on, restart it to see it catch up.
//
// The members run in the caller's network namespace on 127.0.0.1: etcd
// dials its peers from goroutines that may run on any thread, so members
// inside another namespace would dial each other from the caller's (and
// send their traffic wherever its routes lead). WithNetNS and WithListen's
// address place only the members' client ports, each a relay to its
// member.
type Cluster struct {
	members   []*Server
	transport *http.Transport
	client    client.Client
}

// StartCluster starts a cluster of n members for the test and closes it
// when the test ends. It fails the test if the cluster does not start.
func StartCluster(t TB, n int, opts ...Option) *Cluster {
	t.Helper()
	c, err := NewCluster(n, opts...)
	if err != nil {
		t.Fatalf("starting embedded etcd cluster: %v", err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("closing embedded etcd cluster: %v", err)
		}
	})
	return c
}

// NewCluster starts n members (1 to 9) and waits until every one serves
// requests. WithNetNS and WithListen's address say where the members'
// client ports are; WithListen's ports must be 0 (free ones are picked),
// and WithTLS is not supported. The caller must call Close.
func NewCluster(n int, opts ...Option) (*Cluster, error) {
	if n < 1 || n > 9 {
		return nil, fmt.Errorf("etcdtest: a cluster of %d members requested; use 1 to 9", n)
	}
	o, err := parseOptions(opts)
	if err != nil {
		return nil, err
	}
	if o.tls {
		return nil, errors.New("etcdtest: WithTLS is not supported for a cluster; use a single Server")
	}
	if o.clientPort != 0 || o.peerPort != 0 {
		return nil, errors.New("etcdtest: a cluster's members take free ports; give WithListen ports 0")
	}
	token := fmt.Sprintf("etcdtest-cluster-%d", time.Now().UnixNano())
	c := &Cluster{}
	var peers []string
	for i := range n {
		// Members of a cluster time out on each other: leave room for a
		// loaded machine (and the race detector) before an election.
		s, err := newServer(o, member{name: fmt.Sprintf("m%d", i), token: token, tickMs: 50, electionMs: 1000})
		if err != nil {
			c.Close()
			return nil, err
		}
		c.members = append(c.members, s)
	}
	// All ports at once, so that no two members pick the same.
	loopback := netip.AddrFrom4([4]byte{127, 0, 0, 1})
	clientPorts, err := FreePorts(o.nsPath, o.addr, n)
	if err != nil {
		c.Close()
		return nil, err
	}
	ports, err := FreePorts("", loopback, 2*n)
	if err != nil {
		c.Close()
		return nil, err
	}
	for i, s := range c.members {
		s.etcdNS, s.etcdAddr = "", loopback
		s.setPorts(clientPorts[i], ports[2*i], ports[2*i+1])
		peers = append(peers, s.member.name+"="+s.peerURL.String())
	}
	for _, s := range c.members {
		s.member.initialCluster = strings.Join(peers, ",")
	}

	// Every member must run before any is ready (a quorum elects a leader).
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, s := range c.members {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var e *embed.Etcd
			if e, errs[i] = s.startEtcd(); errs[i] == nil {
				errs[i] = s.started(e)
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		c.Close()
		return nil, err
	}
	for _, s := range c.members {
		if err := s.newClient(); err != nil {
			c.Close()
			return nil, err
		}
	}
	c.transport = &http.Transport{
		Proxy:               nil,
		DialContext:         DialContextIn(o.nsPath),
		MaxIdleConnsPerHost: 16,
	}
	c.client, err = client.New(client.Config{Endpoints: c.Endpoints(), Transport: c.transport})
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("creating etcd v2 client: %w", err)
	}
	return c, nil
}

// Members returns the members in order.
func (c *Cluster) Members() []*Server { return append([]*Server(nil), c.members...) }

// Member returns member i (0-based).
func (c *Cluster) Member(i int) *Server { return c.members[i] }

// Endpoints returns the client URLs of all members, in order. They stay the
// same across a member's Restart.
func (c *Cluster) Endpoints() []string {
	var eps []string
	for _, s := range c.members {
		eps = append(eps, s.Endpoints()...)
	}
	return eps
}

// Client returns an etcd v2 client that knows every member and moves on to
// the next when one does not answer.
func (c *Cluster) Client() client.Client { return c.client }

// KeysAPI returns a v2 keys API over every member.
func (c *Cluster) KeysAPI() client.KeysAPI { return client.NewKeysAPI(c.client) }

// Close stops every member and removes their data. It is idempotent.
func (c *Cluster) Close() error {
	var errs []error
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, s := range c.members {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.Close(); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if c.transport != nil {
		c.transport.CloseIdleConnections()
	}
	return errors.Join(errs...)
}
