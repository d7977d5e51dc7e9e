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
