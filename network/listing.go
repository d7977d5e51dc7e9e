package network

import (
	"errors"
	"slices"
	"strings"
)

// errUnterminatedQuote is returned by splitRule for a line ending inside quotes.
var errUnterminatedQuote = errors.New("network: unterminated quote in iptables listing")

// splitRule splits one line of `iptables -S` output into arguments, undoing
// the quoting iptables applies to values such as comments: a double-quoted
// value may contain spaces, and a backslash escapes the next character.
func splitRule(line string) ([]string, error) {
	var (
		args    []string
		cur     strings.Builder
		inArg   bool
		quoted  bool
		escaped bool
	)
	for _, c := range line {
		switch {
		case escaped:
			cur.WriteRune(c)
			escaped = false
		case c == '\\':
			escaped, inArg = true, true
		case c == '"':
			quoted, inArg = !quoted, true
		case !quoted && (c == ' ' || c == '\t'):
			if inArg {
				args = append(args, cur.String())
				cur.Reset()
				inArg = false
			}
		default:
			cur.WriteRune(c)
			inArg = true
		}
	}
	if quoted || escaped {
		return nil, errUnterminatedQuote
	}
	if inArg {
		args = append(args, cur.String())
	}
	return args, nil
}

// appendedSpec returns the rulespec of an "-A chain ..." line of a listing,
// and false for any other line (policies "-P", chain declarations "-N") or a
// line it cannot read. Packet counters ("-c pkts bytes", which go-iptables
// appends to nf_tables listings that carry them) are dropped.
func appendedSpec(line, chain string) ([]string, bool) {
	args, err := splitRule(line)
	if err != nil || len(args) < 2 || args[0] != "-A" || args[1] != chain {
		return nil, false
	}
	s := args[2:]
	if n := len(s); n >= 3 && s[n-3] == "-c" {
		s = s[:n-3]
	}
	return s, true
}

// chainMatches reports whether the listing of chain holds exactly the rules
// want, in order, and nothing else.
func chainMatches(listing []string, chain string, want [][]string) bool {
	var got [][]string
	for _, line := range listing {
		if strings.HasPrefix(line, "-N ") || strings.HasPrefix(line, "-P ") || line == "" {
			continue
		}
		s, ok := appendedSpec(line, chain)
		if !ok {
			return false
		}
		got = append(got, s)
	}
	return slices.EqualFunc(got, want, slices.Equal[[]string])
}

// jumpsTo reports whether a rulespec jumps (or goes) to chain.
func jumpsTo(rulespec []string, chain string) bool {
	for i := 0; i+1 < len(rulespec); i++ {
		if (rulespec[i] == "-j" || rulespec[i] == "-g" || rulespec[i] == "--jump" || rulespec[i] == "--goto") && rulespec[i+1] == chain {
			return true
		}
	}
	return false
}

// savedTable is one table of an iptables-save dump.
type savedTable struct {
	chains map[string]bool     // every chain declared, built-in ones included
	rules  map[string][]string // "-A chain ..." lines by chain, in order
}

// parseSave reads an iptables-save dump (without counters) into its tables.
// Comments, COMMIT and blank lines are skipped; a rule line of a chain not
// declared (which iptables-save never prints) still counts as the chain's.
func parseSave(dump []byte) map[string]*savedTable {
	tables := map[string]*savedTable{}
	var cur *savedTable
	for _, line := range strings.Split(string(dump), "\n") {
		line = strings.TrimRight(line, "\r")
		switch {
		case strings.HasPrefix(line, "*"):
			name := strings.TrimSpace(line[1:])
			cur = tables[name]
			if cur == nil {
				cur = &savedTable{chains: map[string]bool{}, rules: map[string][]string{}}
				tables[name] = cur
			}
		case cur == nil:
		case strings.HasPrefix(line, ":"):
			if f := strings.Fields(line[1:]); len(f) > 0 {
				cur.chains[f[0]] = true
			}
		case strings.HasPrefix(line, "-A "):
			if f := strings.Fields(line); len(f) > 1 {
				cur.rules[f[1]] = append(cur.rules[f[1]], line)
			}
		}
	}
	return tables
}

// quoteArg quotes one argument for iptables-restore the way iptables-save
// prints it: in double quotes, with backslash escapes, if it is empty or
// holds a space, a quote or a backslash.
func quoteArg(a string) string {
	if a != "" && !strings.ContainsAny(a, " \t\"'\\") {
		return a
	}
	return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(a) + `"`
}

// ruleLine renders "<op> <chain> <rulespec>" for iptables-restore, e.g.
// `-A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment "flanneld forward from network" -j ACCEPT`.
func ruleLine(op, chain string, spec []string) string {
	var b strings.Builder
	b.WriteString(op + " " + chain)
	for _, a := range spec {
		b.WriteString(" " + quoteArg(a))
	}
	return b.String()
}
