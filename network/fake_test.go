package network

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
)

// fakeIPT is an in-memory iptables: tables of ordered chains of rulespecs.
// It mimics the kernel where it matters to the Keeper: a chain must exist
// before rules go into it, a jump needs its target chain, and a chain can
// only be deleted when empty and unreferenced.
type fakeIPT struct {
	mu     sync.Mutex
	tables map[string][]*fakeChain
	writes []string         // one entry per changing call, e.g. "append nat FLANNEL-POSTRTG"
	fail   map[string]error // call kind ("append", "clear", ...) -> error to return
	// render, if set, changes how List prints a rulespec, like an iptables
	// version that orders matches differently.
	render func([]string) []string
}

type fakeChain struct {
	name    string
	builtin bool
	rules   [][]string
}

var errFake = errors.New("fake iptables failure")

func newFakeIPT() *fakeIPT {
	f := &fakeIPT{tables: map[string][]*fakeChain{}, fail: map[string]error{}}
	for _, c := range []string{"INPUT", "FORWARD", "OUTPUT"} {
		f.tables["filter"] = append(f.tables["filter"], &fakeChain{name: c, builtin: true})
	}
	for _, c := range []string{"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"} {
		f.tables["nat"] = append(f.tables["nat"], &fakeChain{name: c, builtin: true})
	}
	return f
}

func (f *fakeIPT) chain(table, name string) *fakeChain {
	for _, c := range f.tables[table] {
		if c.name == name {
			return c
		}
	}
	return nil
}

// write records a changing call, or returns the failure injected for its
// kind ("append") or its kind and table ("append nat").
func (f *fakeIPT) write(kind, table, chain string) error {
	for _, k := range []string{kind, kind + " " + table} {
		if err := f.fail[k]; err != nil {
			return fmt.Errorf("%s %s %s: %w", kind, table, chain, err)
		}
	}
	f.writes = append(f.writes, kind+" "+table+" "+chain)
	return nil
}

func (f *fakeIPT) ChainExists(table, chain string) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail["chainexists"]; err != nil {
		return false, err
	}
	return f.chain(table, chain) != nil, nil
}

func (f *fakeIPT) ClearChain(table, chain string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.write("clear", table, chain); err != nil {
		return err
	}
	if c := f.chain(table, chain); c != nil {
		c.rules = nil
		return nil
	}
	f.tables[table] = append(f.tables[table], &fakeChain{name: chain})
	return nil
}

func (f *fakeIPT) DeleteChain(table, chain string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.chain(table, chain)
	switch {
	case c == nil:
		return fmt.Errorf("fake: no chain %s %s", table, chain)
	case c.builtin:
		return fmt.Errorf("fake: cannot delete built-in chain %s", chain)
	case len(c.rules) > 0:
		return fmt.Errorf("fake: chain %s is not empty", chain)
	}
	for _, o := range f.tables[table] {
		for _, r := range o.rules {
			if jumpsTo(r, chain) {
				return fmt.Errorf("fake: chain %s is referenced from %s", chain, o.name)
			}
		}
	}
	if err := f.write("deletechain", table, chain); err != nil {
		return err
	}
	f.tables[table] = slices.DeleteFunc(f.tables[table], func(o *fakeChain) bool { return o == c })
	return nil
}

func (f *fakeIPT) List(table, chain string) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail["list"]; err != nil {
		return nil, err
	}
	c := f.chain(table, chain)
	if c == nil {
		return nil, fmt.Errorf("fake: no chain %s %s", table, chain)
	}
	return f.listChain(c), nil
}

func (f *fakeIPT) listChain(c *fakeChain) []string {
	out := []string{"-N " + c.name}
	if c.builtin {
		out = []string{"-P " + c.name + " ACCEPT"}
	}
	for _, r := range c.rules {
		if f.render != nil {
			r = f.render(r)
		}
		out = append(out, "-A "+c.name+" "+quoteArgs(r))
	}
	return out
}

// quoteArgs prints a rulespec as iptables -S does: arguments with spaces or
// quotes in double quotes, with backslash escapes.
func quoteArgs(spec []string) string {
	var parts []string
	for _, a := range spec {
		if a == "" || strings.ContainsAny(a, " \"\\'") {
			a = `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`, `'`, `\'`).Replace(a) + `"`
		}
		parts = append(parts, a)
	}
	return strings.Join(parts, " ")
}

// checkTarget fails like iptables for a jump to a chain that does not exist.
func (f *fakeIPT) checkTarget(table string, spec []string) error {
	i := slices.Index(spec, "-j")
	if i < 0 || i+1 >= len(spec) {
		return nil
	}
	switch t := spec[i+1]; {
	case t == "ACCEPT" || t == "DROP" || t == "RETURN" || t == "MASQUERADE":
		return nil
	case f.chain(table, t) == nil:
		return fmt.Errorf("fake: no target chain %s", t)
	}
	return nil
}

func (f *fakeIPT) Append(table, chain string, rulespec ...string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.chain(table, chain)
	if c == nil {
		return fmt.Errorf("fake: no chain %s %s", table, chain)
	}
	if err := f.checkTarget(table, rulespec); err != nil {
		return err
	}
	if err := f.write("append", table, chain); err != nil {
		return err
	}
	c.rules = append(c.rules, slices.Clone(rulespec))
	return nil
}

func (f *fakeIPT) Insert(table, chain string, pos int, rulespec ...string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.chain(table, chain)
	if c == nil {
		return fmt.Errorf("fake: no chain %s %s", table, chain)
	}
	if pos < 1 || pos > len(c.rules)+1 {
		return fmt.Errorf("fake: index %d out of range", pos)
	}
	if err := f.checkTarget(table, rulespec); err != nil {
		return err
	}
	if err := f.write(fmt.Sprintf("insert%d", pos), table, chain); err != nil {
		return err
	}
	c.rules = slices.Insert(c.rules, pos-1, slices.Clone(rulespec))
	return nil
}

func (f *fakeIPT) Exists(table, chain string, rulespec ...string) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.chain(table, chain)
	if c == nil {
		return false, fmt.Errorf("fake: no chain %s %s", table, chain)
	}
	return slices.ContainsFunc(c.rules, func(r []string) bool { return slices.Equal(r, rulespec) }), nil
}

func (f *fakeIPT) Delete(table, chain string, rulespec ...string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.chain(table, chain)
	if c == nil {
		return fmt.Errorf("fake: no chain %s %s", table, chain)
	}
	i := slices.IndexFunc(c.rules, func(r []string) bool { return slices.Equal(r, rulespec) })
	if i < 0 {
		return fmt.Errorf("fake: no such rule in %s %s", table, chain)
	}
	if err := f.write("delete", table, chain); err != nil {
		return err
	}
	c.rules = slices.Delete(c.rules, i, i+1)
	return nil
}

// Test helpers: direct changes, as an administrator would make them.

// add appends a rule (creating a user chain if needed) without recording a write.
func (f *fakeIPT) add(table, chain string, spec ...string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.chain(table, chain)
	if c == nil {
		c = &fakeChain{name: chain}
		f.tables[table] = append(f.tables[table], c)
	}
	c.rules = append(c.rules, spec)
}

// edit runs fn on a chain's rules and stores the result.
func (f *fakeIPT) edit(table, chain string, fn func([][]string) [][]string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.chain(table, chain)
	c.rules = fn(c.rules)
}

// dropChain removes a chain outright, with any rules in it.
func (f *fakeIPT) dropChain(table, chain string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.tables[table] = slices.DeleteFunc(f.tables[table], func(c *fakeChain) bool { return c.name == chain })
}

// dump prints all tables like iptables-save (without counters).
func (f *fakeIPT) dump() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var b strings.Builder
	for _, t := range []string{"filter", "nat"} {
		b.WriteString("*" + t + "\n")
		for _, c := range f.tables[t] {
			for _, l := range f.listChain(c) {
				b.WriteString(l + "\n")
			}
		}
	}
	return b.String()
}

// takeWrites returns and forgets the recorded changing calls.
func (f *fakeIPT) takeWrites() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	w := f.writes
	f.writes = nil
	return w
}

func (f *fakeIPT) setFail(kind string, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err == nil {
		delete(f.fail, kind)
		return
	}
	f.fail[kind] = err
}
