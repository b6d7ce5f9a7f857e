"""JSON mode and structured outputs (OpenAI's response_format {"type": "json_object"} and
{"type": "json_schema"}): a request's output is held, token by token, to a JSON object, or to one
that a JSON schema accepts (json_schema.py's subset). A Grammar is a byte-level automaton (step) over
the schema's nodes that says whether the output so far can still become such an object; json_vocab.py
says which tokens of the vocabulary keep it so from a given state; the engine picks a constrained
row's token the way llama.cpp applies a grammar: the token the row's own sampling chose stands if it
is valid; else every invalid token is masked and the row draws again from the rest, with its own
temperature, top-k, top-p and min-p (greedy: the likeliest valid token). Whitespace outside strings
is llama.cpp's JSON grammar's: a space, or a newline and up to 20 spaces or tabs. The end of text
(EOS, or one of the request's stop_token_ids) is valid only once the object is closed, and then
nothing else is, so a finished answer always parses; one cut short by max_new_tokens is a prefix of
one (finish_reason "length"), as OpenAI's is."""

from fractions import Fraction

from .json_schema import ANY, ANY_ARRAY, ANY_OBJECT, ANY_OF, ARRAY, BOOLEAN, ENUM, NULL, NUMBER, OBJECT, STRING, \
    Schema, meets

# modes of a state (mode, stack, aux, spaces): stack holds the open containers as frames, ("o",
# object node, next property) or ("a", array node, items so far); aux the mode's detail; spaces the
# whitespace just before, outside strings: 0 none, -1 a space, n a newline and n - 1 spaces or tabs
START, VALUE, OBJECT_OPEN, KEY_NEXT, KEY_MATCH, COLON, AFTER, ARRAY_OPEN, DONE, IN_STRING, IN_NUMBER, \
    IN_LITERAL, IN_ENUM = range(13)
MULTI = 13               # (MULTI, (), frozenset of states, 0): an anyOf's alternatives that begin alike, side by side
MAX_INDENT = 20          # spaces or tabs after a newline outside strings (a small model can indent forever)
WHITESPACE = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrt')
UNESCAPED = {ord('"'): 0x22, ord("\\"): 0x5C, ord("/"): 0x2F, ord("b"): 0x08, ord("f"): 0x0C, ord("n"): 0x0A,
             ord("r"): 0x0D, ord("t"): 0x09}
# a number's place in JSON's grammar: after "-", after a leading 0, in the integer's digits, after
# ".", in the fraction, after "e", after the exponent's sign, in the exponent; ENDS may end one
NUM_SIGN, NUM_ZERO, NUM_INT, NUM_DOT, NUM_FRAC, NUM_E, NUM_E_SIGN, NUM_EXP = range(8)
NUM_ENDS = (NUM_ZERO, NUM_INT, NUM_FRAC, NUM_EXP)
LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}


class Grammar(Schema):
    """The automaton for one schema (None: any JSON object). States are tuples, so a state's mask
    can be cached."""

    def __init__(self, schema: dict | None = None, key: str = "null") -> None:
        super().__init__(schema)
        self.key = key                                       # response_schema()'s text
        self.initial = (START, (), self.root, 0)

    def _closed(self, stack: tuple) -> tuple:
        """The state after a value completes inside these containers (an array counts it)."""
        if not stack:
            return (DONE, (), 0, 0)
        top = stack[-1]
        if top[0] == "a":
            stack = stack[:-1] + (("a", top[1], top[2] + 1),)
        return (AFTER, stack, 0, 0)

    def _keys(self, frame: tuple) -> tuple:
        """The properties an object may name next: from its next one up to its first required one."""
        props = self.nodes[frame[1]][1]
        out = []
        for j in range(frame[2], len(props)):
            out.append((j, props[j][0]))
            if props[j][2]:
                break
        return tuple(out)

    def _may_add(self, frame: tuple) -> bool:
        """Whether an object may name one key more: below its most keys, or properties left."""
        node = self.nodes[frame[1]]
        if node[1] is None:
            return node[4] is None or frame[2] < node[4]
        return frame[2] < len(node[1])

    def _may_close(self, frame: tuple) -> bool:
        node = self.nodes[frame[1]]
        if frame[0] == "a":
            return frame[2] >= node[2]
        if node[1] is None:                                  # keys so far, at least its least number
            return frame[2] >= node[3]
        return not any(p[2] for p in node[1][frame[2]:])

    def _value(self, node_id: int, stack: tuple, b: int) -> tuple | None:
        """The state after byte b starts a value of node_id's schema."""
        node = self.nodes[node_id]
        kind = node[0]
        if kind == ANY_OF:                                   # each alternative b begins
            return _one(self._value(alt, stack, b) for alt in node[1])
        if kind == ENUM:
            return (IN_ENUM, stack, (node_id, bytes([b])), 0) if any(v[:1] == bytes([b]) for v in node[1]) else None
        if b == ord("{") and kind in (ANY, OBJECT):
            frame = ("o", node_id if kind == OBJECT else ANY_OBJECT, 0)
            return (OBJECT_OPEN, stack + (frame,), 0, 0)
        if b == ord("[") and kind in (ANY, ARRAY):
            return (ARRAY_OPEN, stack + (("a", node_id if kind == ARRAY else ANY_ARRAY, 0),), 0, 0)
        if b == 0x22 and kind in (ANY, STRING):
            length = (node[1], node[2], 0) if kind == STRING and (node[1] or node[2] is not None) else None
            pattern = (node[3], self.patterns[node[3]].start, "") if kind == STRING and node[3] is not None else None
            return (IN_STRING, stack, (0, False, length, pattern), 0)
        if (b == ord("-") or b in DIGITS) and kind in (ANY, NUMBER):
            place = NUM_SIGN if b == ord("-") else NUM_ZERO if b == ord("0") else NUM_INT
            if kind == NUMBER and node[2] is not None:       # a bounded number: its text kept
                text, sign = ("", -1) if b == ord("-") else (chr(b), 1)
                return (IN_NUMBER, stack, (place, node[1], (node[2], sign, text)), 0) \
                    if _may_reach(node[2], sign, text) else None
            return (IN_NUMBER, stack, (place, kind == NUMBER and node[1], None), 0)
        if b in LITERALS and (kind == ANY or kind == BOOLEAN and b != ord("n") or kind == NULL and b == ord("n")):
            return (IN_LITERAL, stack, LITERALS[b], 0)
        return None

    def step(self, state: tuple, b: int) -> tuple | None:
        """The state after byte b, or None where no object the grammar takes continues so."""
        mode, stack, aux, spaces = state
        if mode == MULTI:
            return _one(self.step(s, b) for s in aux)
        if mode == IN_STRING:
            # length: (min, max or None, characters so far); pattern: (its index, its states, the bytes of
            # a character begun as (bytes to come, bits so far), or the hex digits of a \u escape so far)
            escape, is_key, length, pattern = aux
            if escape == 0:
                if b == 0x22:
                    if length and length[2] < length[0] or pattern and not (
                            pattern[2] == "" and self.patterns[pattern[0]].accepts(pattern[1])):
                        return None
                    if is_key:                               # one key more
                        top = stack[-1]
                        return (COLON, stack[:-1] + (("o", top[1], top[2] + 1),), self.nodes[top[1]][2], 0)
                    return self._closed(stack)
                if b < 0x20:
                    return None
                if length and not 0x80 <= b <= 0xBF:              # a character begins (not a UTF-8 continuation)
                    if length[1] is not None and length[2] >= length[1]:
                        return None
                    length = (length[0], length[1], length[2] + 1)
                if b == 0x5C:
                    return (IN_STRING, stack, (1, is_key, length, pattern), 0) if not pattern or pattern[2] == "" else None
                if pattern and (pattern := self._pattern_byte(pattern, b)) is None:
                    return None
                return (IN_STRING, stack, (0, is_key, length, pattern), 0) if length or pattern else state
            if escape == 1:
                if b == ord("u"):
                    return (IN_STRING, stack, (6, is_key, length, pattern), 0)
                if b not in ESCAPES or pattern and (pattern := self._pattern_code(pattern, UNESCAPED[b])) is None:
                    return None
                return (IN_STRING, stack, (0, is_key, length, pattern), 0)
            if b not in HEX:
                return None
            if pattern and (pattern := (pattern[0], pattern[1], pattern[2] + chr(b)) if escape > 3 else
                            self._pattern_code(pattern, int(pattern[2] + chr(b), 16))) is None:
                return None
            return (IN_STRING, stack, (escape - 1 if escape > 3 else 0, is_key, length, pattern), 0)
        if mode == IN_NUMBER:
            place, integer, bounds = aux                     # bounds: (limits, sign, text) of a bounded number
            nxt = _number(place, b, integer, exponent=bounds is None)
            if nxt is not None:
                if bounds is None:
                    return (IN_NUMBER, stack, (nxt, integer, None), 0)
                limits, sign, text = bounds
                return (IN_NUMBER, stack, (nxt, integer, (limits, sign, text + chr(b))), 0) \
                    if _may_reach(limits, sign, text + chr(b)) else None
            if place not in NUM_ENDS or bounds and not _within(bounds[0], bounds[1] * Fraction(bounds[2])):
                return None
            return self.step(self._closed(stack), b)
        if mode == IN_LITERAL:
            if b != aux[0]:
                return None
            return (IN_LITERAL, stack, aux[1:], 0) if len(aux) > 1 else self._closed(stack)
        if mode == IN_ENUM:
            node_id, sofar = aux
            longer = sofar + bytes([b])
            if any(v.startswith(longer) for v in self.nodes[node_id][1]):
                return (IN_ENUM, stack, (node_id, longer), 0)
            if sofar not in self.nodes[node_id][1]:
                return None
            return self.step(self._closed(stack), b)
        if mode == KEY_MATCH:
            keys, sofar = aux
            if b == 0x22:
                match = [j for j, name in keys if name == sofar]
                if not match:
                    return None
                top = stack[-1]
                value = self.nodes[top[1]][1][match[0]][1]
                return (COLON, stack[:-1] + (("o", top[1], match[0] + 1),), value, 0)
            longer = sofar + bytes([b])
            return (KEY_MATCH, stack, (keys, longer), 0) if any(name.startswith(longer) for _, name in keys) else None
        if b in WHITESPACE:          # structural modes: llama.cpp's JSON whitespace, a space or a newline and indent
            if mode == DONE:
                return None
            if spaces == 0:
                return (mode, stack, aux, -1) if b == 0x20 else (mode, stack, aux, 1) if b == 0x0A else None
            return (mode, stack, aux, spaces + 1) if 0 < spaces <= MAX_INDENT and b in b" \t" else None
        if mode == START:
            return self._value(aux, stack, b) if b == ord("{") else None
        if mode == DONE:
            return None
        if mode == VALUE:
            return self._value(aux, stack, b)
        if mode == COLON:
            return (VALUE, stack, aux, 0) if b == ord(":") else None
        top = stack[-1]
        if mode in (OBJECT_OPEN, KEY_NEXT):
            if b == 0x22:
                if self.nodes[top[1]][1] is None:
                    return (IN_STRING, stack, (0, True, None, None), 0) if self._may_add(top) else None
                keys = self._keys(top)
                return (KEY_MATCH, stack, (keys, b""), 0) if keys else None
            return self._closed(stack[:-1]) if b == ord("}") and mode == OBJECT_OPEN and self._may_close(top) else None
        if mode == ARRAY_OPEN:
            if b == ord("]"):
                return self._closed(stack[:-1]) if self._may_close(top) else None
            _, items, _, hi, first = self.nodes[top[1]]
            return None if hi == 0 else self._value(first[0] if first else items, stack, b)
        # AFTER: a value inside the container on top of the stack
        if top[0] == "o":
            if b == ord(","):
                props = self.nodes[top[1]][1]
                return (KEY_NEXT, stack, 0, 0) if self._may_add(top) else None
            return self._closed(stack[:-1]) if b == ord("}") and self._may_close(top) else None
        if b == ord(","):
            _, items, _, hi, first = self.nodes[top[1]]
            if hi is not None and top[2] >= hi:
                return None
            return (VALUE, stack, first[top[2]] if top[2] < len(first) else items, 0)
        return self._closed(stack[:-1]) if b == ord("]") and self._may_close(top) else None

    def _pattern_byte(self, pattern: tuple, b: int) -> tuple | None:
        """A string's pattern state after byte b of its text (UTF-8, a character's bytes gathered)."""
        index, states, pending = pattern
        if b < 0x80 or b >= 0xC0:
            if pending != "":                                # a character left unfinished
                return None
            if b < 0x80:
                return self._pattern_code(pattern, b)
            need = 1 if b < 0xE0 else 2 if b < 0xF0 else 3
            return (index, states, (need, b & (0x3F >> need)))
        if pending == "":                                    # a continuation byte with no lead
            return None
        need, bits = pending
        bits = bits << 6 | (b & 0x3F)
        return self._pattern_code((index, states, ""), bits) if need == 1 else (index, states, (need - 1, bits))

    def _pattern_code(self, pattern: tuple, code: int) -> tuple | None:
        states = self.patterns[pattern[0]].step(pattern[1], code)
        return (pattern[0], states, "") if states else None

    def feed(self, state: tuple | None, data: bytes) -> tuple | None:
        """The state after data, or None."""
        for b in data:
            if state is None:
                return None
            state = self.step(state, b)
        return state


def _one(states) -> tuple | None:
    """Of the states an anyOf's alternatives reached: None where none did, the one, or the several
    side by side (MULTI; they merge into one where they meet, once their value is closed)."""
    out = set()
    for st in states:
        if st is not None:
            out |= st[2] if st[0] == MULTI else {st}
    return None if not out else next(iter(out)) if len(out) == 1 else (MULTI, (), frozenset(out), 0)


def _within(limits: tuple, value: Fraction) -> bool:
    return meets(limits, value, True, value, True)


def _may_reach(limits: tuple, sign: int, text: str) -> bool:
    """Whether a number written so far as sign and text (digits, perhaps a "." and digits; "" after a
    "-") can still end within limits, with no exponent (a bounded number has none). The values it
    may take, as magnitudes: [m, m + 10^-n) written with n decimals so far (m itself included), and
    without a "." also [d 10^k, (d + 1) 10^k) for k more digits (none after a leading 0)."""
    def reached(a, b) -> bool:                               # magnitudes [a, b), b None: unbounded
        if sign > 0:
            return meets(limits, a, True, b, False)
        return meets(limits, None if b is None else -b, False, -a, a != 0)    # below 0: -0 is not written
    if not text:                                             # "-": a number below 0 (-0 is not worth writing)
        return meets(limits, None, False, Fraction(0), False)
    whole, dot, decimals = text.partition(".")
    m = Fraction(whole + "." + decimals) if decimals else Fraction(int(whole))
    if reached(m, m + Fraction(1, 10 ** len(decimals))):
        return True
    if dot or int(whole) == 0:
        return False
    d, far = int(whole), limits[2] if sign > 0 else None if limits[0] is None else -limits[0]
    if far is None:                                          # unbounded that way
        return True
    k = 1
    while d * 10 ** k <= far:
        if reached(Fraction(d * 10 ** k), Fraction((d + 1) * 10 ** k)):
            return True
        k += 1
    return False


def _number(place: int, b: int, integer: bool, exponent: bool = True) -> int | None:
    """A number's next place after byte b, or None where b is not part of it (an integer has no
    fraction or exponent; a bounded number no exponent)."""
    if place == NUM_SIGN:
        return None if b not in DIGITS else NUM_ZERO if b == ord("0") else NUM_INT
    if place in (NUM_ZERO, NUM_INT, NUM_FRAC):
        if b in DIGITS and place != NUM_ZERO:
            return place
        if integer:
            return None
        if b == ord(".") and place != NUM_FRAC:
            return NUM_DOT
        return NUM_E if b in b"eE" and exponent else None
    if place == NUM_DOT:
        return NUM_FRAC if b in DIGITS else None
    if place == NUM_E:
        return NUM_E_SIGN if b in b"+-" else NUM_EXP if b in DIGITS else None
    return NUM_EXP if b in DIGITS else None                  # NUM_E_SIGN, NUM_EXP
