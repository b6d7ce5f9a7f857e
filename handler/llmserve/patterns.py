"""The regular expressions a JSON schema's "pattern" holds (and the "format"s json_mode enforces
with one), as automata over a string's characters: a parser for the ECMA-262 subset schemas use
(literals, ".", classes, \\d \\w \\s and their negations, groups, alternation, the quantifiers
* + ? {n,m}, "^" and "$" at the ends; unanchored, a pattern may match anywhere, as JSON Schema has
it) and a Thompson NFA whose state sets json_mode keeps in a string's state. Knows no JSON."""

from bisect import bisect_right

MAX_CODE = 0x10FFFF
MAX_STATES = 4000        # NFA states at most (a {n,m} is n to m copies of what it repeats)
DIGIT = ((0x30, 0x39),)
WORD = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
SPACE = ((0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029),
         (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF))
LINE_ENDS = ((0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029))
CONTROL = {"t": 0x09, "n": 0x0A, "v": 0x0B, "f": 0x0C, "r": 0x0D, "0": 0x00}
# what formats json_mode enforces, as patterns (the rest are annotations): RFC 3339's date and time
# (an offset optional, as pydantic reads them), a UUID's hex groups, an address with one "@"
FORMATS = {
    "date": r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])$",
    "time": r"^([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,6})?(Z|[+-]([01]\d|2[0-3]):[0-5]\d)?$",
    "date-time": r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])T([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,6})?"
                 r"(Z|[+-]([01]\d|2[0-3]):[0-5]\d)?$",
    "uuid": r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
    "email": r"^[^@\s]+@[^@\s]+\.[^@\s]+$",
}


class PatternError(ValueError):
    pass


def complement(ranges) -> tuple:
    out, start = [], 0
    for lo, hi in sorted(ranges):
        if lo > start:
            out.append((start, lo - 1))
        start = max(start, hi + 1)
    return tuple(out + ([(start, MAX_CODE)] if start <= MAX_CODE else []))


def merged(ranges) -> tuple:
    out = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


class Pattern:
    """One pattern's NFA: edges[state] = [(ranges, next state)] on a character, or (None, next) on
    none; states are handed out as frozensets closed over the empty edges."""

    def __init__(self, source: str) -> None:
        if not isinstance(source, str):
            raise PatternError(f"must be a string, got {source!r}")
        self.source, self.text, self.pos = source, source, 0
        begins = self.text.startswith("^")
        escapes = len(self.text[:-1]) - len(self.text[:-1].rstrip("\\"))   # backslashes before the last character
        ends = self.text.endswith("$") and escapes % 2 == 0 and len(self.text) > begins
        self.text = self.text[1 if begins else 0:len(self.text) - 1 if ends else len(self.text)]
        self.edges: list[list[tuple]] = []
        tree = self._alternation()
        if self.pos != len(self.text):
            raise PatternError(f"unbalanced ')' at {self.pos}")
        if tree[0] == "alt" and (begins or ends):        # ^a|b$ is (^a)|(b$), not ^(a|b)$
            raise PatternError("'^' or '$' with a '|' outside groups: put the alternatives in a group, ^(a|b)$")
        first, last = self._build(tree)
        if not begins:                                   # anything before a match
            self.edges[first].append((((0, MAX_CODE),), first))
        if not ends:                                     # ... and after it
            self.edges[last].append((((0, MAX_CODE),), last))
        self.accept = last
        self.closures: dict[int, frozenset] = {}
        self.start = self._closure(first)
        self.moves: dict[tuple, frozenset] = {}

    # -- the automaton ------------------------------------------------------------------------------
    def step(self, states: frozenset, code: int) -> frozenset:
        """The states after character `code` (empty: no match can go on so)."""
        key = (states, code)
        if key not in self.moves:
            if len(self.moves) > 100_000:
                self.moves.clear()
            out = set()
            for s in states:
                for ranges, t in self.edges[s]:
                    if ranges is not None and _holds(ranges, code):
                        out |= self._closure(t)
            self.moves[key] = frozenset(out)
        return self.moves[key]

    def accepts(self, states: frozenset) -> bool:
        return self.accept in states

    def _closure(self, state: int) -> frozenset:
        if state not in self.closures:
            seen, todo = {state}, [state]
            while todo:
                for ranges, t in self.edges[todo.pop()]:
                    if ranges is None and t not in seen:
                        seen.add(t)
                        todo.append(t)
            self.closures[state] = frozenset(seen)
        return self.closures[state]

    def _new(self) -> int:
        if len(self.edges) >= MAX_STATES:
            raise PatternError(f"too large (more than {MAX_STATES} states; a large {{n,m}}?)")
        self.edges.append([])
        return len(self.edges) - 1

    def _build(self, node) -> tuple[int, int]:
        kind = node[0]
        if kind == "set":
            a, b = self._new(), self._new()
            self.edges[a].append((node[1], b))
            return a, b
        if kind == "cat":
            a = last = self._new()
            for part in node[1]:
                s, e = self._build(part)
                self.edges[last].append((None, s))
                last = e
            return a, last
        if kind == "alt":
            a, b = self._new(), self._new()
            for part in node[1]:
                s, e = self._build(part)
                self.edges[a].append((None, s))
                self.edges[e].append((None, b))
            return a, b
        _, part, lo, hi = node                           # "rep"
        a = last = self._new()
        for _ in range(lo):
            s, e = self._build(part)
            self.edges[last].append((None, s))
            last = e
        end = self._new()
        if hi is None:                                   # a loop of one more copy
            s, e = self._build(part)
            self.edges[last] += [(None, s), (None, end)]
            self.edges[e] += [(None, s), (None, end)]
            return a, end
        for _ in range(hi - lo):                         # each further copy optional
            s, e = self._build(part)
            self.edges[last] += [(None, s), (None, end)]
            last = e
        self.edges[last].append((None, end))
        return a, end

    # -- the parser: alternation := sequence ("|" sequence)*; sequence := (atom quantifier?)* --------
    def _peek(self) -> str | None:
        return self.text[self.pos] if self.pos < len(self.text) else None

    def _alternation(self):
        parts = [self._sequence()]
        while self._peek() == "|":
            self.pos += 1
            parts.append(self._sequence())
        return parts[0] if len(parts) == 1 else ("alt", parts)

    def _sequence(self):
        items = []
        while self._peek() not in (None, "|", ")"):
            atom = self._atom()
            items.append(self._quantified(atom))
        return ("cat", items)

    def _quantified(self, atom):
        c = self._peek()
        if c in ("*", "+", "?"):
            self.pos += 1
            lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif c == "{" and (bounds := self._braces()) is not None:
            lo, hi = bounds
        else:
            return atom
        if self._peek() == "?":                          # lazy: the same strings
            self.pos += 1
        if self._peek() in ("*", "+", "?", "{") and self._braces_at_peek():
            raise PatternError(f"a quantifier after a quantifier at {self.pos}")
        return ("rep", atom, lo, hi)

    def _braces_at_peek(self) -> bool:
        if self._peek() != "{":
            return True
        pos = self.pos
        found = self._braces() is not None
        self.pos = pos
        return found

    def _braces(self) -> tuple[int, int | None] | None:
        """{n}, {n,} or {n,m} at pos (consumed), else None (a literal "{", as ECMA-262's annex B reads it)."""
        end = self.text.find("}", self.pos)
        inner = self.text[self.pos + 1:end] if end > 0 else ""
        lo, comma, hi = inner.partition(",")
        if not lo.isdigit() or hi and not hi.isdigit() or not (lo.isascii() and hi.isascii()):
            return None
        self.pos = end + 1
        lo, hi = int(lo), (int(hi) if hi else None) if comma else int(lo)
        if hi is not None and hi < lo:
            raise PatternError(f"{{{inner}}}: the larger count comes second")
        return lo, hi

    def _atom(self):
        c = self.text[self.pos]
        self.pos += 1
        if c == "(":
            if self.text.startswith("?:", self.pos):
                self.pos += 2
            elif self.text.startswith("?<", self.pos) and not self.text.startswith(("?<=", "?<!"), self.pos):
                self.pos = self.text.index(">", self.pos) + 1 if ">" in self.text[self.pos:] else len(self.text)
            elif self._peek() == "?":
                raise PatternError(f"lookarounds are not supported (at {self.pos - 1})")
            inner = self._alternation()
            if self._peek() != ")":
                raise PatternError("unbalanced '('")
            self.pos += 1
            return inner
        if c == "[":
            return ("set", self._class())
        if c == ".":
            return ("set", complement(LINE_ENDS))
        if c == "\\":
            return ("set", self._escape(in_class=False))
        if c in "^$":
            raise PatternError(f"'{c}' is supported only at the pattern's start or end (at {self.pos - 1})")
        if c in "*+?":
            raise PatternError(f"nothing to repeat at {self.pos - 1}")
        return ("set", ((ord(c), ord(c)),))

    def _class(self) -> tuple:
        negated = self._peek() == "^"
        self.pos += negated
        ranges, first = [], True
        while True:
            c = self._peek()
            if c is None:
                raise PatternError("unbalanced '['")
            if c == "]" and not first:
                self.pos += 1
                break
            first = False
            low = self._class_item()
            if self._peek() == "-" and self.pos + 1 < len(self.text) and self.text[self.pos + 1] != "]":
                self.pos += 1
                high = self._class_item()
                if len(low) != 1 or len(high) != 1 or low[0][0] != low[0][1] or high[0][0] != high[0][1] \
                        or high[0][0] < low[0][0]:
                    raise PatternError(f"a bad range in a class at {self.pos}")
                ranges.append((low[0][0], high[0][0]))
            else:
                ranges += low
        return complement(ranges) if negated else merged(ranges)

    def _class_item(self) -> tuple:
        c = self.text[self.pos]
        self.pos += 1
        if c == "\\":
            return self._escape(in_class=True)
        return ((ord(c), ord(c)),)

    def _escape(self, in_class: bool) -> tuple:
        if self.pos >= len(self.text):
            raise PatternError("a pattern cannot end with '\\'")
        c = self.text[self.pos]
        self.pos += 1
        classes = {"d": DIGIT, "w": WORD, "s": SPACE}
        if c.lower() in classes:
            return classes[c.lower()] if c.islower() else complement(classes[c.lower()])
        if c in CONTROL and not (c == "0" and self._peek() is not None and self._peek().isdigit()):
            return ((CONTROL[c], CONTROL[c]),)
        if c in "xu":
            size = 2 if c == "x" else 4
            digits = self.text[self.pos:self.pos + size]
            if len(digits) != size or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise PatternError(f"\\{c} needs {size} hex digits")
            self.pos += size
            return ((int(digits, 16), int(digits, 16)),)
        if c == "b" and in_class:
            return ((0x08, 0x08),)
        if c.isalnum() or c == "_":
            raise PatternError(f"\\{c} is not supported (backreferences, word boundaries, Unicode properties)")
        return ((ord(c), ord(c)),)


def _holds(ranges: tuple, code: int) -> bool:
    i = bisect_right(ranges, (code, MAX_CODE + 1)) - 1
    return i >= 0 and ranges[i][0] <= code <= ranges[i][1]
