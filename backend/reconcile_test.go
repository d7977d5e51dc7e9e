package backend

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// fakeTable is a kernel-like table: a list of key=value entries, several of
// which may share a key (as ip route append makes them). Set replaces the
// first entry of a key; Delete removes the entry with that key and value.
type fakeTable struct {
	entries   [][2]string
	calls     []string // "set k=v" / "del k=v", in call order
	dumps     int
	interrupt int   // dumps still to report as interrupted
	dumpErr   error // error of every dump
	fail      map[string]error
}

func (f *fakeTable) Dump(add func(k, v string)) error {
	f.dumps++
	if f.dumpErr != nil {
		return f.dumpErr
	}
	for _, e := range f.entries {
		add(e[0], e[1])
	}
	if f.interrupt > 0 {
		f.interrupt--
		return netlink.ErrDumpInterrupted
	}
	return nil
}

func (f *fakeTable) Set(ks, vs []string, errs []error) {
	for i, k := range ks {
		kv := k + "=" + vs[i]
		f.calls = append(f.calls, "set "+kv)
		if err := f.fail[kv]; err != nil {
			errs[i] = fmt.Errorf("setting %s: %w", kv, err)
			continue
		}
		j := slices.IndexFunc(f.entries, func(e [2]string) bool { return e[0] == k })
		if j < 0 {
			f.entries = append(f.entries, [2]string{k, vs[i]})
		} else {
			f.entries[j][1] = vs[i]
		}
	}
}

func (f *fakeTable) Delete(ks, vs []string, errs []error) {
	for i, k := range ks {
		kv := k + "=" + vs[i]
		f.calls = append(f.calls, "del "+kv)
		if err := f.fail[kv]; err != nil {
			errs[i] = fmt.Errorf("deleting %s: %w", kv, err)
			continue
		}
		f.entries = slices.DeleteFunc(f.entries, func(e [2]string) bool { return e == [2]string{k, vs[i]} })
	}
}

// text is the table sorted, one "k=v" per entry, space-separated.
func (f *fakeTable) text() string {
	var s []string
	for _, e := range f.entries {
		s = append(s, e[0]+"="+e[1])
	}
	slices.Sort(s)
	return strings.Join(s, " ")
}

// takeCalls returns the calls since the last take: the sets sorted, then
// the deletes sorted (each batch is written in map order), and checks that
// no set came after a delete.
func (f *fakeTable) takeCalls(t *testing.T) string {
	t.Helper()
	var sets, dels []string
	for _, c := range f.calls {
		if strings.HasPrefix(c, "set ") {
			if len(dels) > 0 {
				t.Errorf("%s after a delete: %q", c, f.calls)
			}
			sets = append(sets, c)
		} else {
			dels = append(dels, c)
		}
	}
	slices.Sort(sets)
	slices.Sort(dels)
	f.calls = nil
	return strings.Join(append(sets, dels...), "; ")
}

// kv is a desired set written k=v ..., in any order.
func kv(s string) []Entry[string, string] {
	var d []Entry[string, string]
	for _, f := range strings.Fields(s) {
		k, v, _ := strings.Cut(f, "=")
		d = append(d, Entry[string, string]{k, v})
	}
	return SortEntries(d, strings.Compare)
}

func table(s string) *fakeTable {
	f := &fakeTable{}
	for _, e := range strings.Fields(s) {
		k, v, _ := strings.Cut(e, "=")
		f.entries = append(f.entries, [2]string{k, v})
	}
	return f
}

func TestReconcile(t *testing.T) {
	errBoom := errors.New("boom")
	tests := []struct {
		name      string
		have      string // the table before: k=v ...
		desired   string
		fail      map[string]error
		interrupt int
		calls     string // sets (sorted) then deletes (sorted)
		after     string
		want      Changes
		failed    []string // FailedSets
		wantErr   string
	}{
		{name: "empty"},
		{name: "add all", desired: "a=1 b=1", calls: "set a=1; set b=1", after: "a=1 b=1", want: Changes{Added: 2}},
		{name: "in sync does nothing", have: "a=1 b=1", desired: "a=1 b=1", after: "a=1 b=1"},
		{
			name: "update, add, remove; sets before deletes", have: "a=1 b=1 d=1 e=1", desired: "a=2 b=1 c=1",
			calls: "set a=2; set c=1; del d=1; del e=1", after: "a=2 b=1 c=1", want: Changes{Added: 1, Updated: 1, Removed: 2},
		},
		{name: "remove all", have: "a=1", calls: "del a=1", want: Changes{Removed: 1}},
		{
			name: "a duplicate key keeps the desired entry", have: "a=1 a=2 a=3", desired: "a=2",
			calls: "del a=1; del a=3", after: "a=2", want: Changes{Removed: 2},
		},
		{
			name: "a duplicate key without the desired entry: the first is replaced", have: "a=1 a=3", desired: "a=2",
			calls: "set a=2; del a=3", after: "a=2", want: Changes{Updated: 1, Removed: 1},
		},
		{
			name: "one failure does not stop the others", have: "c=1", desired: "a=1 b=1", fail: map[string]error{"a=1": errBoom},
			calls: "set a=1; set b=1; del c=1", after: "b=1", want: Changes{Added: 1, Removed: 1, Failed: 1},
			failed: []string{"a"}, wantErr: "setting a=1: boom",
		},
		{
			name: "several failures are counted", have: "c=1 d=1", desired: "a=1",
			fail:  map[string]error{"a=1": errBoom, "c=1": errBoom, "d=1": errBoom},
			calls: "set a=1; del c=1; del d=1", after: "c=1 d=1", want: Changes{Failed: 3},
			failed: []string{"a"}, wantErr: "setting a=1: boom (and 2 more failed)",
		},
		{
			name: "a delete of an entry already gone is done", have: "c=1 d=1",
			fail:  map[string]error{"c=1": unix.ESRCH, "d=1": unix.ENOENT},
			calls: "del c=1; del d=1", after: "c=1 d=1", want: Changes{Removed: 2},
		},
		{
			name: "an interrupted dump is read again", have: "a=1", desired: "b=1", interrupt: 1,
			calls: "set b=1; del a=1", after: "b=1", want: Changes{Added: 1, Removed: 1},
		},
		{
			name: "a dump interrupted every time: the last view is used", have: "a=1", desired: "b=1", interrupt: 99,
			calls: "set b=1; del a=1", after: "b=1", want: Changes{Added: 1, Removed: 1},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := table(tt.have)
			f.fail, f.interrupt = tt.fail, tt.interrupt
			r := NewReconciler[string, string](f, strings.Compare, Same[string])
			got, err := r.Reconcile(kv(tt.desired))
			if calls := f.takeCalls(t); calls != tt.calls {
				t.Errorf("calls = %q, want %q", calls, tt.calls)
			}
			if a := f.text(); a != tt.after {
				t.Errorf("table = %q, want %q", a, tt.after)
			}
			if got != tt.want {
				t.Errorf("changes = %+v, want %+v", got, tt.want)
			}
			if !slices.Equal(r.FailedSets(), tt.failed) {
				t.Errorf("failed sets = %q, want %q", r.FailedSets(), tt.failed)
			}
			if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || err.Error() != tt.wantErr) {
				t.Fatalf("err = %v, want %q", err, tt.wantErr)
			}
			if tt.wantErr != "" && !errors.Is(err, errBoom) {
				t.Errorf("err = %v, does not wrap the failure", err)
			}
			if want := min(tt.interrupt+1, dumpAttempts); f.dumps != want {
				t.Errorf("dumps = %d, want %d", f.dumps, want)
			}
			// Idempotent: a second call changes nothing, unless a write failed.
			if tt.fail == nil {
				if c, err := r.Reconcile(kv(tt.desired)); c.Any() || err != nil {
					t.Errorf("second call: %+v, %v", c, err)
				}
			}
		})
	}
}

func TestReconcileDumpError(t *testing.T) {
	f := table("a=1")
	f.dumpErr = unix.EPERM
	c, err := NewReconciler[string, string](f, strings.Compare, Same[string]).Reconcile(kv("b=1"))
	if !errors.Is(err, unix.EPERM) || c.Any() || len(f.calls) != 0 {
		t.Fatalf("changes %+v, err %v, calls %q; want EPERM and no writes", c, err, f.calls)
	}
}

// TestReconcileSteps is golden-style: a table driven through a sequence of
// desired sets, with hand edits between them, and after each step the
// writes made and the table's text compared with what is written down here.
func TestReconcileSteps(t *testing.T) {
	f := table("10.5.9.0=stale 10.5.2.0=old")
	r := NewReconciler[string, string](f, strings.Compare, Same[string])
	steps := []struct {
		name, desired string
		edit          func()
		golden        string // calls | table | changes
	}{
		{"first, leftovers of a previous run", "10.5.2.0=aa 10.5.3.0=bb", nil,
			"set 10.5.2.0=aa; set 10.5.3.0=bb; del 10.5.9.0=stale | 10.5.2.0=aa 10.5.3.0=bb | {Added:1 Updated:1 Removed:1 Failed:0}"},
		{"again", "10.5.2.0=aa 10.5.3.0=bb", nil,
			" | 10.5.2.0=aa 10.5.3.0=bb | {Added:0 Updated:0 Removed:0 Failed:0}"},
		{"deleted by hand", "10.5.2.0=aa 10.5.3.0=bb", func() { f.entries = f.entries[:1] },
			"set 10.5.3.0=bb | 10.5.2.0=aa 10.5.3.0=bb | {Added:1 Updated:0 Removed:0 Failed:0}"},
		{"appended by hand", "10.5.2.0=aa 10.5.3.0=bb", func() { f.entries = append(f.entries, [2]string{"10.5.2.0", "zz"}) },
			"del 10.5.2.0=zz | 10.5.2.0=aa 10.5.3.0=bb | {Added:0 Updated:0 Removed:1 Failed:0}"},
		{"a lease moves", "10.5.2.0=cc 10.5.3.0=bb", nil,
			"set 10.5.2.0=cc | 10.5.2.0=cc 10.5.3.0=bb | {Added:0 Updated:1 Removed:0 Failed:0}"},
		{"none", "", nil,
			"del 10.5.2.0=cc; del 10.5.3.0=bb |  | {Added:0 Updated:0 Removed:2 Failed:0}"},
	}
	for _, s := range steps {
		if s.edit != nil {
			s.edit()
		}
		c, err := r.Reconcile(kv(s.desired))
		if err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if got := fmt.Sprintf("%s | %s | %+v", f.takeCalls(t), f.text(), c); got != s.golden {
			t.Errorf("%s:\n got  %s\n want %s", s.name, got, s.golden)
		}
	}
}

// peer is a WireGuard-peer-like value: not comparable, compared by a
// function, as a backend whose values hold slices uses the primitive.
type peer struct {
	Endpoint   string
	AllowedIPs []string
}

type peerTable struct {
	peers map[string]peer
	log   []string
}

func (p *peerTable) Dump(add func(string, peer)) error {
	for k, v := range p.peers {
		add(k, v)
	}
	return nil
}

func (p *peerTable) Set(ks []string, vs []peer, _ []error) {
	for i, k := range ks {
		p.peers[k] = vs[i]
		p.log = append(p.log, "set "+k)
	}
}

func (p *peerTable) Delete(ks []string, _ []peer, _ []error) {
	for _, k := range ks {
		delete(p.peers, k)
		p.log = append(p.log, "del "+k)
	}
}

func TestReconcileUncomparableValues(t *testing.T) {
	pt := &peerTable{peers: map[string]peer{
		"keyA": {"192.0.2.1:51820", []string{"10.5.1.0/24"}},
		"keyB": {"192.0.2.2:51820", []string{"10.5.2.0/24"}},
		"keyC": {"192.0.2.3:51820", []string{"10.5.3.0/24"}},
	}}
	equal := func(a, b peer) bool { return a.Endpoint == b.Endpoint && slices.Equal(a.AllowedIPs, b.AllowedIPs) }
	desired := map[string]peer{
		"keyA": {"192.0.2.1:51820", []string{"10.5.1.0/24"}},
		"keyB": {"192.0.2.2:51820", []string{"10.5.2.0/24", "fc00:0:2::/64"}},
		"keyD": {"192.0.2.4:51820", []string{"10.5.4.0/24"}},
	}
	c, err := NewReconciler[string, peer](pt, strings.Compare, equal).Reconcile(SortedEntries(desired, strings.Compare))
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(pt.log)
	if got, want := strings.Join(pt.log, "; "), "del keyC; set keyB; set keyD"; got != want || c != (Changes{Added: 1, Updated: 1, Removed: 1}) {
		t.Errorf("calls %q changes %+v; want %q and 1 added, 1 updated, 1 removed", got, c, want)
	}
	if !c.Any() || (Changes{}).Any() {
		t.Error("Changes.Any is wrong")
	}
}

// TestReconcileReplacing checks that Replacing reports each set that
// replaces a dumped entry, with that entry, and not a replace that a later,
// desired entry of the same key cancelled.
func TestReconcileReplacing(t *testing.T) {
	f := table("a=1 b=1 b=3 c=1 e=1")
	r := NewReconciler[string, string](f, strings.Compare, Same[string])
	if err := r.Plan(kv("a=2 b=3 c=1 d=1")); err != nil {
		t.Fatal(err)
	}
	var got []string
	r.Replacing(func(k, want, have string) { got = append(got, fmt.Sprintf("%s=%s over %s", k, want, have)) })
	if want := []string{"a=2 over 1"}; !slices.Equal(got, want) {
		t.Errorf("replacing = %q, want %q", got, want)
	}
	r.Add()
	r.Remove()
	if calls := f.takeCalls(t); calls != "set a=2; set d=1; del b=1; del e=1" {
		t.Errorf("calls = %q", calls)
	}
	if a := f.text(); a != "a=2 b=3 c=1 d=1" {
		t.Errorf("table = %q", a)
	}
}

// TestReconcileUnsorted: a desired set out of order, or with a key twice,
// is refused before anything is read or written.
func TestReconcileUnsorted(t *testing.T) {
	for _, d := range [][]Entry[string, string]{
		{{"b", "1"}, {"a", "1"}},
		{{"a", "1"}, {"a", "2"}},
	} {
		f := table("c=1")
		c, err := NewReconciler[string, string](f, strings.Compare, Same[string]).Reconcile(d)
		if !errors.Is(err, ErrUnsorted) || c.Any() || f.dumps != 0 || len(f.calls) != 0 {
			t.Errorf("%v: changes %+v, err %v, %d dumps, calls %q; want ErrUnsorted and nothing done", d, c, err, f.dumps, f.calls)
		}
	}
}

func TestSortEntries(t *testing.T) {
	tests := []struct{ in, want string }{
		{"", ""},
		{"a=1 b=1 c=1", "a=1 b=1 c=1"},
		{"c=1 a=1 b=1", "a=1 b=1 c=1"},
		{"b=1 a=1 b=2 a=3 b=3", "a=3 b=3"}, // the last of a key counts, as in a map
		{"a=1 a=2", "a=2"},
	}
	for _, tt := range tests {
		var d []Entry[string, string]
		for _, f := range strings.Fields(tt.in) {
			k, v, _ := strings.Cut(f, "=")
			d = append(d, Entry[string, string]{k, v})
		}
		var got []string
		for _, e := range SortEntries(d, strings.Compare) {
			got = append(got, e.Key+"="+e.Val)
		}
		if g := strings.Join(got, " "); g != tt.want {
			t.Errorf("SortEntries(%s) = %q, want %q", tt.in, g, tt.want)
		}
	}
	d := kv("a=1 c=1 e=1")
	for k, want := range map[string]int{"a": 0, "c": 1, "e": 2, "b": -1, "": -1, "f": -1} {
		if i := Find(d, k, strings.Compare); i != want {
			t.Errorf("Find(%q) = %d, want %d", k, i, want)
		}
	}
}

// TestReconcileDumpOrders: the diff is the same whether the dump comes in
// key order (as the kernel's route dump does), reversed, or shuffled, with
// the keys spread and repeated.
func TestReconcileDumpOrders(t *testing.T) {
	var desired []Entry[string, string]
	have := &fakeTable{}
	for i := range 300 {
		k := fmt.Sprintf("k%04d", i)
		if i%3 != 0 { // every third key is not desired
			desired = append(desired, Entry[string, string]{k, "1"})
		}
		switch {
		case i%5 == 0: // missing
		case i%7 == 0: // different, and a second entry
			have.entries = append(have.entries, [2]string{k, "2"}, [2]string{k, "3"})
		default:
			have.entries = append(have.entries, [2]string{k, "1"})
		}
	}
	orders := map[string]func([][2]string){
		"sorted":   func([][2]string) {},
		"reversed": slices.Reverse[[][2]string],
		"shuffled": func(e [][2]string) {
			for i := range e { // a fixed permutation
				j := (i * 7919) % len(e)
				e[i], e[j] = e[j], e[i]
			}
		},
	}
	for name, order := range orders {
		f := &fakeTable{entries: slices.Clone(have.entries)}
		order(f.entries)
		c, err := NewReconciler[string, string](f, strings.Compare, Same[string]).Reconcile(desired)
		if err != nil {
			t.Fatal(err)
		}
		f.takeCalls(t) // sets before deletes
		// 40 keys missing, 22 different (each with a second entry), 92
		// entries of the 80 keys not desired.
		want := Changes{Added: 40, Updated: 22, Removed: 22 + 92}
		if c != want {
			t.Errorf("%s: changes %+v, want %+v", name, c, want)
		}
		var wantText []string
		for _, e := range desired {
			wantText = append(wantText, e.Key+"="+e.Val)
		}
		if got := f.text(); got != strings.Join(wantText, " ") {
			t.Errorf("%s: table after = %q", name, got)
		}
	}
}

// countView is a desired set computed on demand: key k%03d of value
// v<i%7>, for i of 0..n-1; it notes reads after closed is set.
type countView struct {
	t      *testing.T
	n      int
	closed bool
}

func (v *countView) Len() int { return v.n }
func (v *countView) Key(i int) string {
	if v.closed {
		v.t.Errorf("Key(%d) read after PlanSet returned", i)
	}
	return fmt.Sprintf("k%03d", i)
}
func (v *countView) Val(i int) string {
	if v.closed {
		v.t.Errorf("Val(%d) read after PlanSet returned", i)
	}
	return fmt.Sprintf("v%d", i%7)
}

// TestPlanSetView: a desired set read through a view, larger than a word
// of the seen bitset, with entries equal, different, missing, stale and a
// duplicate key whose later entry is the desired one (the replace is
// cancelled); the view is read only during PlanSet.
func TestPlanSetView(t *testing.T) {
	f := &fakeTable{}
	for i := range 300 {
		k, v := fmt.Sprintf("k%03d", i), fmt.Sprintf("v%d", i%7)
		switch {
		case i%50 == 3: // missing
		case i%50 == 7:
			f.entries = append(f.entries, [2]string{k, "old"})
		case i == 130 || i == 250:
			f.entries = append(f.entries, [2]string{k, "old"}, [2]string{k, v}, [2]string{k, "older"})
		default:
			f.entries = append(f.entries, [2]string{k, v})
		}
	}
	f.entries = append(f.entries, [2]string{"k999", "stale"}, [2]string{"a", "stale"})
	slices.Reverse(f.entries) // not in key order: found by binary search
	r := NewReconciler[string, string](f, strings.Compare, Same[string])
	for round, want := range []Changes{{Added: 6, Updated: 6, Removed: 6}, {}} {
		v := &countView{t: t, n: 300}
		if err := r.PlanSet(v); err != nil {
			t.Fatal(err)
		}
		v.closed = true
		r.Add()
		r.Remove()
		c, err := r.Result()
		if err != nil || c != want {
			t.Errorf("round %d: changes %+v, %v; want %+v", round, c, err, want)
		}
	}
	var want []string
	for i := range 300 {
		want = append(want, fmt.Sprintf("k%03d=v%d", i, i%7))
	}
	if got := f.text(); got != strings.Join(want, " ") {
		t.Errorf("table = %q", got)
	}
}
