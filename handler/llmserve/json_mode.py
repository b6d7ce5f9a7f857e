"""JSON mode and structured outputs (OpenAI's response_format {"type": "json_object"} and
{"type": "json_schema"}): a request's output is held, token by token, to a JSON object, or to one
that a JSON schema (the subset below) accepts. A Grammar is a byte-level automaton (step) that says
whether the output so far can still become such an object; JsonVocab says which tokens of the
vocabulary keep it so from a given state, and picks a constrained row's token the way llama.cpp
applies a grammar: the token the row's own sampling chose stands if it is valid; else every invalid
token is masked and the row draws again from the rest, with its own temperature, top-k, top-p and
min-p (greedy: the likeliest valid token). Whitespace outside strings is llama.cpp's JSON grammar's:
a space, or a newline and up to 20 spaces or tabs. The end of text (EOS, or one of the request's
stop_token_ids) is valid only once the object is closed, and then nothing else is, so a finished
answer always parses; one cut short by max_new_tokens is a prefix of one (finish_reason
"length"), as OpenAI's is.

The schema subset (what OpenAI's strict mode and most extraction schemas use): "type" object (its
"properties" in the order given, "required" ones present, the others optional; no other keys; an
object without "properties" takes any keys, their values of "additionalProperties" if it is a schema,
none if it is false, "minProperties" to "maxProperties" of them), array ("items", "prefixItems", "minItems", "maxItems"), string ("minLength",
"maxLength": characters; "pattern", and "format" date, time, date-time, uuid or email as one:
patterns.py), number and integer ("minimum", "maximum" and their exclusive forms; a bounded number
is written without an exponent), boolean, null; "enum" and "const" of any JSON values; "anyOf" or
"oneOf" (the same here: alternatives the first bytes tell apart match one at most), or a list of
types, whose alternatives begin differently (pydantic's Optional: a type or null) or are objects
whose first property is one required name holding a constant of each one's own; "allOf" of one
schema; "$ref" to the schema's own "$defs" (pydantic's nested models, recursion included).
Annotations ("title", "description", "format", "$schema", "strict", "additionalProperties" beside
properties, "discriminator") are read and not enforced; any other keyword ("multipleOf", ...) is
refused with a SchemaError."""

import json
import math
from collections import OrderedDict
from fractions import Fraction

from .patterns import FORMATS, Pattern, PatternError

import torch

# schema nodes (Grammar.nodes): (ANY,), (OBJECT, properties: ((name bytes, node, required), ...) or
# None for any keys, the node of their values and their least and most number), (ARRAY, items node, min, max or None, the first items' nodes), (STRING, min, max or None, pattern index or
# None), (NUMBER, integer?,
# limits: (min, min exclusive?, max, max exclusive?) with None for no bound, or None for none at all),
# (BOOLEAN,), (NULL,), (ENUM, (value bytes, ...)), (ANY_OF, (node, ...)), (UNION, tag name bytes, tag
# ENUM node, {tag value bytes: object node}): objects told apart by their first property's constant;
# node 0 is any value, node 1 any object, node 2 any array
ANY, OBJECT, ARRAY, STRING, NUMBER, BOOLEAN, NULL, ENUM, ANY_OF, UNION = range(10)
STARTS = {OBJECT: b"{", ARRAY: b"[", STRING: b'"', NUMBER: b"-0123456789", BOOLEAN: b"tf", NULL: b"n"}
ANY_VALUE, ANY_OBJECT, ANY_ARRAY = 0, 1, 2
# modes of a state (mode, stack, aux, spaces): stack holds the open containers as frames, ("o",
# object node, next property) or ("a", array node, items so far); aux the mode's detail; spaces the
# whitespace just before, outside strings: 0 none, -1 a space, n a newline and n - 1 spaces or tabs
START, VALUE, OBJECT_OPEN, KEY_NEXT, KEY_MATCH, COLON, AFTER, ARRAY_OPEN, DONE, IN_STRING, IN_NUMBER, \
    IN_LITERAL, IN_ENUM = range(13)
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
TYPES = {"object": OBJECT, "array": ARRAY, "string": STRING, "number": NUMBER, "integer": NUMBER,
         "boolean": BOOLEAN, "null": NULL}
ANNOTATIONS = {"title", "description", "format", "$schema", "strict", "additionalProperties", "default", "examples",
               "$id", "$comment", "discriminator"}
KEYWORDS = {"type", "properties", "required", "items", "prefixItems", "allOf", "minProperties", "maxProperties", "minItems", "maxItems", "minLength", "maxLength", "minimum",
            "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum",
            "const", "anyOf", "oneOf", "$ref", "$defs", "definitions", "pattern"} | ANNOTATIONS
MAX_NODES = 256
MASKS_KEPT = 512         # valid-token masks cached, by grammar and state


class SchemaError(ValueError):
    pass


class Grammar:
    """The automaton for one schema (None: any JSON object). States are tuples, so a state's mask
    can be cached."""

    def __init__(self, schema: dict | None = None, key: str = "null") -> None:
        self.key = key                                       # response_schema()'s text
        self.nodes: list[tuple] = [(ANY,), (OBJECT, None, ANY_VALUE, 0, None), (ARRAY, ANY_VALUE, 0, None, ())]
        schema = {"type": "object"} if schema is None else schema
        self.defs = schema.get("$defs", schema.get("definitions", {})) if isinstance(schema, dict) else {}
        if not isinstance(self.defs, dict):
            raise SchemaError(f"$defs must be an object of named schemas, got {json.dumps(self.defs)[:100]}")
        self.refs: dict[str, int] = {}                       # $ref -> its node (compiled once: recursion)
        self.patterns: list[Pattern] = []                    # strings' patterns, by index
        root = self._compile(schema, "schema")
        if any(node is None for node in self.nodes):
            raise SchemaError("a $ref refers to itself with no schema in between")
        for i, node in enumerate(self.nodes):
            if node[0] == ANY_OF:
                if self._loops(i, set()):
                    raise SchemaError("anyOf/oneOf: an alternative leads back to it with no value in between")
                starts = [self._starts(alt, set()) for alt in node[1]]
                if sum(map(len, starts)) != len(set().union(*starts)) and not self._union(i):
                    raise SchemaError("anyOf/oneOf: its alternatives must begin differently (a string or null, say), "
                                      "so that the first byte of a value picks one, or be objects whose first "
                                      "property is a required const of its own (a tagged union)")
        if self.nodes[root][0] not in (OBJECT, UNION):
            raise SchemaError('the schema\'s top level must be {"type": "object", ...}')
        self.initial = (START, (), root, 0)

    def _compile(self, schema, where: str) -> int:
        if not isinstance(schema, dict):
            raise SchemaError(f"{where} must be a JSON object, got {json.dumps(schema)}")
        unknown = sorted(set(schema) - KEYWORDS)
        if unknown:
            raise SchemaError(f"{where}: {unknown[0]!r} is not supported (supported: {sorted(KEYWORDS - ANNOTATIONS)})")
        if len(self.nodes) >= MAX_NODES:
            raise SchemaError(f"the schema has more than {MAX_NODES} parts")
        if "allOf" in schema:                                # one schema (a $ref with notes beside it, say)
            parts = schema["allOf"]
            if not isinstance(parts, list) or len(parts) != 1 or not isinstance(parts[0], dict) \
                    or set(parts[0]) & set(schema) - ANNOTATIONS:
                raise SchemaError(f"{where}.allOf: only one schema is supported, with no keyword beside it that it has too")
            return self._compile({**{k: v for k, v in schema.items() if k != "allOf"}, **parts[0]}, where)
        if "$ref" in schema:
            return self._ref(schema["$ref"], where)
        if "anyOf" in schema or "oneOf" in schema or isinstance(schema.get("type"), list):
            word = "oneOf" if "oneOf" in schema else "anyOf"
            if "anyOf" in schema and "oneOf" in schema:
                raise SchemaError(f"{where}: anyOf and oneOf together are not supported")
            rest = {k: v for k, v in schema.items() if k not in (word, "type")}
            alts = schema[word] if word in schema else [{**rest, "type": kind} for kind in schema["type"]]
            if not isinstance(alts, list) or not alts:
                raise SchemaError(f"{where}.{word if word in schema else 'type'} must be a non-empty list")
            node = self._add(None)
            self.nodes[node] = (ANY_OF, tuple(self._compile(alt, f"{where}.{word}[{i}]") for i, alt in enumerate(alts)))
            return node
        if "enum" in schema or "const" in schema:
            values = schema["enum"] if "enum" in schema else [schema["const"]]
            if not isinstance(values, list) or not values:
                raise SchemaError(f"{where}.enum must be a non-empty list")
            return self._add((ENUM, tuple(json.dumps(v, ensure_ascii=False).encode() for v in values)))
        kind = schema.get("type")
        if kind is None and not set(schema) - ANNOTATIONS:
            return ANY_VALUE                                 # {}: any value
        if not isinstance(kind, str) or kind not in TYPES:
            raise SchemaError(f"{where}.type must be one of {sorted(TYPES)}, got {json.dumps(kind)}")
        if TYPES[kind] == OBJECT:
            props = schema.get("properties")
            required = schema.get("required", [])
            if not isinstance(required, list) or props is not None and not isinstance(props, dict) \
                    or any(not isinstance(name, str) or name not in (props or {}) for name in required):
                raise SchemaError(f"{where}: required must list names of its properties")
            extra = schema.get("additionalProperties", True)   # beside properties, none are taken
            lo, hi = schema.get("minProperties", 0), schema.get("maxProperties")
            if not isinstance(lo, int) or lo < 0 or hi is not None and (not isinstance(hi, int) or hi < lo) \
                    or props is not None and (lo or hi is not None):
                raise SchemaError(f"{where}: minProperties and maxProperties must be integers, 0 <= min <= max, "
                                  "on an object without properties")
            node = self._add(None)                           # its place, before its properties'
            if props is not None:
                self.nodes[node] = (OBJECT, tuple((json.dumps(name, ensure_ascii=False)[1:-1].encode(),
                                                   self._compile(sub, f"{where}.properties.{name}"), name in required)
                                                  for name, sub in props.items()), None)
            elif isinstance(extra, bool):                    # any keys, or none
                self.nodes[node] = (OBJECT, None, ANY_VALUE, lo, hi) if extra else (OBJECT, (), None)
            elif isinstance(extra, dict):                    # any keys, values of one schema (pydantic's dict[str, X])
                self.nodes[node] = (OBJECT, None, self._compile(extra, f"{where}.additionalProperties"), lo, hi)
            else:
                raise SchemaError(f"{where}.additionalProperties must be true, false or a schema")
            return node
        if TYPES[kind] == ARRAY:
            lo, hi = schema.get("minItems", 0), schema.get("maxItems")
            if not isinstance(lo, int) or lo < 0 or hi is not None and (not isinstance(hi, int) or hi < lo):
                raise SchemaError(f"{where}: minItems and maxItems must be integers, 0 <= minItems <= maxItems")
            first = schema.get("prefixItems", [])             # pydantic's tuple[X, Y]
            items = schema.get("items", {})
            if not isinstance(first, list) or not all(isinstance(f, dict) for f in first):
                raise SchemaError(f"{where}.prefixItems must be a list of schemas")
            if items is False:                               # nothing after them
                items, hi = {}, len(first) if hi is None else min(hi, len(first))
                if hi < lo:
                    raise SchemaError(f"{where}: minItems is more than prefixItems and items: false allow")
            node = self._add(None)
            self.nodes[node] = (ARRAY, self._compile(items, f"{where}.items"), lo, hi,
                                tuple(self._compile(f, f"{where}.prefixItems[{i}]") for i, f in enumerate(first)))
            return node
        if TYPES[kind] == STRING:
            lo, hi = schema.get("minLength", 0), schema.get("maxLength")
            if not isinstance(lo, int) or lo < 0 or hi is not None and (not isinstance(hi, int) or hi < lo):
                raise SchemaError(f"{where}: minLength and maxLength must be integers, 0 <= minLength <= maxLength")
            fmt = schema.get("format")
            source = schema.get("pattern", FORMATS.get(fmt) if isinstance(fmt, str) else None)
            if source is None:
                return self._add((STRING, lo, hi, None))
            try:
                self.patterns.append(Pattern(source))
            except PatternError as e:
                raise SchemaError(f"{where}.pattern: {e}") from None
            return self._add((STRING, lo, hi, len(self.patterns) - 1))
        if TYPES[kind] == NUMBER:
            return self._add((NUMBER, kind == "integer", _limits(schema, kind == "integer", where)))
        return self._add((TYPES[kind],))

    def _ref(self, ref, where: str) -> int:
        """A local reference, "#/$defs/<name>" (pydantic's) or "#/definitions/<name>"."""
        if not isinstance(ref, str) or ref not in self.refs:
            name = ref.split("/", 2)[-1] if isinstance(ref, str) and ref.startswith(("#/$defs/", "#/definitions/")) else None
            if name is None or name not in self.defs:
                raise SchemaError(f"{where}.$ref: only references to the schema's own $defs are supported, got {json.dumps(ref)}")
            self.refs[ref] = self._add(None)                 # its place, for a reference to itself
            self.nodes[self.refs[ref]] = self.nodes[self._compile(self.defs[name], f"$defs.{name}")]
        return self.refs[ref]

    def _union(self, node_id: int) -> bool:
        """Make anyOf node_id a UNION if its alternatives are objects whose first property has one name,
        is required and is a constant of each one's own (tool calls' "name", pydantic's tagged unions)."""
        alts = [self.nodes[alt] for alt in self.nodes[node_id][1]]
        if not all(a[0] == OBJECT and a[1] for a in alts):
            return False
        firsts = [a[1][0] for a in alts]
        tags = [self.nodes[node][1] for _, node, _ in firsts if self.nodes[node][0] == ENUM]
        if len(tags) < len(alts) or len({name for name, _, _ in firsts}) > 1 or not all(req for _, _, req in firsts) \
                or any(len(t) > 1 for t in tags) or len({t[0] for t in tags}) < len(tags):
            return False
        tag = self._add((ENUM, tuple(t[0] for t in tags)))
        self.nodes[node_id] = (UNION, firsts[0][0], tag, {t[0]: alt for t, alt in zip(tags, self.nodes[node_id][1])})
        return True

    def _loops(self, node_id: int, seen: set) -> bool:
        """Whether anyOf node_id reaches itself through alternatives alone (a value would never begin)."""
        if node_id in seen:
            return True
        return any(self.nodes[alt][0] == ANY_OF and self._loops(alt, seen | {node_id}) for alt in self.nodes[node_id][1])

    def _starts(self, node_id: int, seen: set) -> set[int]:
        """The bytes a value of node_id's schema may begin with."""
        node = self.nodes[node_id]
        if node[0] == ENUM:
            return {v[0] for v in node[1]}
        if node[0] == ANY:
            return set(b"".join(STARTS.values()))
        if node[0] == UNION:
            return {ord("{")}
        if node[0] == ANY_OF:
            seen = seen | {node_id}
            return set().union(*(self._starts(alt, seen) for alt in node[1] if alt not in seen))
        return set(STARTS[node[0]])

    def _add(self, node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    # -- the automaton ------------------------------------------------------------------------------
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
        if frame[0] == "u":                                  # its tag comes first
            return False
        if node[1] is None:                                  # keys so far, at least its least number
            return frame[2] >= node[3]
        return not any(p[2] for p in node[1][frame[2]:])

    def _value(self, node_id: int, stack: tuple, b: int) -> tuple | None:
        """The state after byte b starts a value of node_id's schema."""
        node = self.nodes[node_id]
        kind = node[0]
        if kind == ANY_OF:                                   # the one alternative b begins (checked at compile time)
            return next((st for alt in node[1] if (st := self._value(alt, stack, b)) is not None), None)
        if kind == ENUM:
            return (IN_ENUM, stack, (node_id, bytes([b])), 0) if any(v[:1] == bytes([b]) for v in node[1]) else None
        if b == ord("{") and kind == UNION:                  # its tag first
            return (OBJECT_OPEN, stack + (("u", node_id, 0),), 0, 0)
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
            if stack and stack[-1][0] == "u":               # a union's tag: the rest is its object's
                stack = stack[:-1] + (("o", self.nodes[stack[-1][1]][3][sofar], 1),)
            return self.step(self._closed(stack), b)
        if mode == KEY_MATCH:
            keys, sofar = aux
            if b == 0x22:
                match = [j for j, name in keys if name == sofar]
                if not match:
                    return None
                top = stack[-1]
                if top[0] == "u":
                    return (COLON, stack, self.nodes[top[1]][2], 0)
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
                if top[0] == "u":
                    return (KEY_MATCH, stack, (((0, self.nodes[top[1]][1]),), b""), 0) if mode == OBJECT_OPEN else None
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


def _limits(schema: dict, integer: bool, where: str) -> tuple | None:
    """A number's bounds as (min, min exclusive?, max, max exclusive?), None where it has none: exact
    fractions of the decimals written (0.1 is 1/10), an integer's as the inclusive integers within."""
    values = [schema.get(k) for k in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")]
    if all(v is None for v in values):
        return None
    for name, v in zip(("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"), values):
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
            raise SchemaError(f"{where}.{name} must be a finite number, got {json.dumps(v)}")
    lo, xlo, hi, xhi = (None if v is None else Fraction(repr(v)) if isinstance(v, float) else Fraction(v) for v in values)
    low = max([(v, x) for v, x in ((lo, False), (xlo, True)) if v is not None], default=(None, False))
    high = min([(v, not x) for v, x in ((hi, False), (xhi, True)) if v is not None], default=(None, True))
    limits = (low[0], low[1], high[0], not high[1])
    if integer:                                              # the integers within, inclusive
        first = None if lo is None and xlo is None else math.floor(low[0]) + 1 if low[1] else math.ceil(low[0])
        last = None if hi is None and xhi is None else math.ceil(high[0]) - 1 if not high[1] else math.floor(high[0])
        limits = (first, False, last, False)
    if not _meets(limits, None, False, None, False):
        raise SchemaError(f"{where}: no {'integer' if integer else 'number'} lies between its minimum and maximum")
    return limits


def _meets(limits: tuple, low, low_closed: bool, high, high_closed: bool) -> bool:
    """Whether some number in the interval from low to high (None: unbounded) lies within limits."""
    lo, xlo, hi, xhi = limits
    if lo is not None and (low is None or lo > low or lo == low and xlo):
        low, low_closed = lo, not xlo
    if hi is not None and (high is None or hi < high or hi == high and xhi):
        high, high_closed = hi, not xhi
    return low is None or high is None or low < high or low == high and low_closed and high_closed


def _within(limits: tuple, value: Fraction) -> bool:
    return _meets(limits, value, True, value, True)


def _may_reach(limits: tuple, sign: int, text: str) -> bool:
    """Whether a number written so far as sign and text (digits, perhaps a "." and digits; "" after a
    "-") can still end within limits, with no exponent (a bounded number has none). The values it
    may take, as magnitudes: [m, m + 10^-n) written with n decimals so far (m itself included), and
    without a "." also [d 10^k, (d + 1) 10^k) for k more digits (none after a leading 0)."""
    def meets(a, b) -> bool:                                 # magnitudes [a, b), b None: unbounded
        if sign > 0:
            return _meets(limits, a, True, b, False)
        return _meets(limits, None if b is None else -b, False, -a, True)
    if not text:                                             # "-": a number below 0 (-0 is not worth writing)
        return _meets(limits, None, False, Fraction(0), False)
    whole, dot, decimals = text.partition(".")
    m = Fraction(whole + "." + decimals) if decimals else Fraction(int(whole))
    if meets(m, m + Fraction(1, 10 ** len(decimals))):
        return True
    if dot or int(whole) == 0:
        return False
    d, far = int(whole), limits[2] if sign > 0 else None if limits[0] is None else -limits[0]
    if far is None:                                          # unbounded that way
        return True
    k = 1
    while d * 10 ** k <= far:
        if meets(Fraction(d * 10 ** k), Fraction((d + 1) * 10 ** k)):
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


def response_schema(value) -> str | None:
    """OpenAI's response_format as the engine keeps it: None (text), or the schema as canonical JSON
    text ("null" for json_object: any object). Raises SchemaError where it is not one we take."""
    if value is None or value == {"type": "text"}:
        return None
    if value == {"type": "json_object"}:
        return "null"
    if isinstance(value, dict) and value.get("type") == "json_schema" and set(value) == {"type", "json_schema"}:
        spec = value["json_schema"]
        if isinstance(spec, dict) and isinstance(spec.get("schema"), dict) and set(spec) <= {"name", "schema", "strict",
                                                                                             "description"}:
            Grammar(spec["schema"])                          # refused here, not at the first token
            return json.dumps(spec["schema"])                # its properties' order is the output's
        raise SchemaError('json_schema must be {"name": ..., "schema": {...}, "strict": ...}')
    raise SchemaError('response_format must be {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                      f'"json_schema": {{"name": ..., "schema": {{...}}}}}}, got {json.dumps(value)}')


def byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's (GPT-2's) character for each byte, reversed: printable Latin-1 bytes stand for
    themselves, the other 68 for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


def token_bytes(tokenizer, size: int) -> list[bytes | None]:
    """Each token id's bytes (None for special tokens and ids past the tokenizer): byte-level BPE's
    characters mapped back to bytes, else the token decoded alone."""
    to_byte = byte_level_alphabet()
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    out: list[bytes | None] = [None] * size
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(min(size, len(tokenizer)))))):
        if i in special or piece is None:
            continue
        if all(c in to_byte for c in piece):
            out[i] = bytes(to_byte[c] for c in piece)
        else:                                               # not byte-level (sentencepiece and the like)
            out[i] = tokenizer.decode([i]).encode("utf-8")
    return out


class JsonVocab:
    """The vocabulary as JSON mode reads it: the tokens' bytes, grouped by their leading whitespace
    and the byte after it, so that a state's valid tokens are found by checking a few thousand
    candidates rather than every token; the grammars of recent schemas; and each recent state's
    mask."""

    def __init__(self, pieces: list[bytes | None], stop_ids: set[int]) -> None:
        self.pieces, self.stop_ids, self.size = pieces, stop_ids, len(pieces)
        plain = [p is not None and p != b"" and all(b >= 0x20 and b not in (0x22, 0x5C) for b in p) for p in pieces]
        self.plain = torch.tensor(plain)                    # valid anywhere inside a string, and stay there
        self.characters = torch.tensor([sum(not 0x80 <= b <= 0xBF for b in p) if plain[i] else 0
                                        for i, p in enumerate(pieces)])   # ... adding this many characters
        self.unplain = [i for i, p in enumerate(pieces) if p and not plain[i]]
        # tokens by (leading whitespace, the byte after it; None for whitespace alone)
        self.groups: dict[bytes, dict[int | None, list[int]]] = {}
        for i, p in enumerate(pieces):
            if p:
                rest = p.lstrip(b" \t\n\r")
                lead = p[:len(p) - len(rest)]
                self.groups.setdefault(lead, {}).setdefault(rest[0] if rest else None, []).append(i)
        self.grammars: OrderedDict[str, Grammar] = OrderedDict()
        self.masks: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def grammar(self, schema: str) -> Grammar:
        """The grammar of a response_schema() text, compiled once while it is in use."""
        if schema not in self.grammars:
            self.grammars[schema] = Grammar(json.loads(schema), schema)
            if len(self.grammars) > 64:
                self.grammars.popitem(last=False)
        self.grammars.move_to_end(schema)
        return self.grammars[schema]

    def advance(self, grammar: Grammar, state: tuple, token: int) -> tuple | None:
        """The state after token (a special one, EOS included, leaves it as it is: it ends the request)."""
        return grammar.feed(state, self.pieces[token] or b"")

    def is_valid(self, grammar: Grammar, state: tuple, token: int, stop_ids: tuple = ()) -> bool:
        if token in self.stop_ids or token in stop_ids:
            return state[0] == DONE
        return token < self.size and self.pieces[token] is not None and grammar.feed(state, self.pieces[token]) is not None

    def mask(self, grammar: Grammar, state: tuple, stop_ids: tuple = ()) -> torch.Tensor:
        """[size] bool: the tokens valid from state (where it is DONE, the stop tokens: the model's
        and a request's own stop_ids)."""
        if stop_ids and state[0] == DONE:
            mask = self.mask(grammar, state).clone()
            mask[[t for t in stop_ids if t < self.size]] = True
            return mask
        key = (grammar.key, state)
        if key in self.masks:
            self.masks.move_to_end(key)
            return self.masks[key]
        if state[0] == IN_STRING and state[2][0] == 0 and state[2][3] is None:   # no pattern: plain text, a block
            length = state[2][2]
            room = None if length is None or length[1] is None else length[1] - length[2]
            mask = self.plain.clone() if room is None else self.plain & (self.characters <= room)
            candidates = self.unplain
        else:
            mask, candidates = torch.zeros(self.size, dtype=torch.bool), []
            for lead, by_byte in self.groups.items():
                after = grammar.feed(state, lead)
                if after is None:
                    continue
                for b, ids in by_byte.items():
                    if b is None:
                        mask[ids] = True                     # the whitespace alone, valid as fed
                    elif grammar.step(after, b) is not None:
                        candidates += ids
        for i in candidates:
            if grammar.feed(state, self.pieces[i]) is not None:
                mask[i] = True
        if state[0] == DONE:
            for i in self.stop_ids:
                if i < self.size:
                    mask[i] = True
        self.masks[key] = mask
        if len(self.masks) > MASKS_KEPT:
            self.masks.popitem(last=False)
        return mask
