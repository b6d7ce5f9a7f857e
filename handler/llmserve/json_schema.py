"""The JSON schemas structured outputs take (OpenAI's response_format {"type": "json_schema"}),
compiled into the nodes json_mode's automaton walks, and refused with a SchemaError (a 400 naming
response_format) where they are not in the subset. Knows no tokens and no bytes of output.

The schema subset (what OpenAI's strict mode and most extraction schemas use): "type" object (its
"properties" in the order given, "required" ones present, the others optional; no other keys; an
object without "properties" takes any keys, their values of "additionalProperties" if it is a
schema, none if it is false, "minProperties" to "maxProperties" of them), array ("items",
"prefixItems", "minItems", "maxItems"), string ("minLength", "maxLength": characters; "pattern",
and "format" date, time, date-time, uuid or email as one: patterns.py), number and integer
("minimum", "maximum" and their exclusive forms, "multipleOf"; a bounded number is written without
an exponent), boolean, null; "enum" and "const" of any JSON values; "anyOf" (or a list of types) of
any alternatives (those that begin alike followed side by side: pydantic's Union[Cat, Dog],
int | float); "oneOf" where its alternatives begin differently (so that at most one matches) or are
objects whose first property is one required name holding a constant of each one's own (pydantic's
discriminated unions); "allOf" of one schema; "$ref" to the
schema's own "$defs" (pydantic's nested models, recursion included). Annotations ("title",
"description", "format", "$schema", "strict", "additionalProperties" beside properties,
"discriminator", "uniqueItems", ...) are read and not enforced; any other keyword
("propertyNames", ...) is refused with a SchemaError."""

import json
import math
from fractions import Fraction

from .patterns import FORMATS, Pattern, PatternError

# schema nodes (Schema.nodes): (ANY,), (OBJECT, properties: ((name bytes, node, required), ...) or None
# for any keys, the node of their values, their least and most number), (ARRAY, items node, min, max or
# None, the first items' nodes), (STRING, min, max or None, pattern index or None), (NUMBER, integer?,
# limits: (min, min exclusive?, max, max exclusive?, multipleOf) with None for no bound, or None for
# none at all), (BOOLEAN,), (NULL,), (ENUM, (value bytes, ...)), (ANY_OF, (node, ...), oneOf?);
# node 0 is any value, node 1 any object, node 2 any array
ANY, OBJECT, ARRAY, STRING, NUMBER, BOOLEAN, NULL, ENUM, ANY_OF = range(9)
STARTS = {OBJECT: b"{", ARRAY: b"[", STRING: b'"', NUMBER: b"-0123456789", BOOLEAN: b"tf", NULL: b"n"}
ANY_VALUE, ANY_OBJECT, ANY_ARRAY = 0, 1, 2
TYPES = {"object": OBJECT, "array": ARRAY, "string": STRING, "number": NUMBER, "integer": NUMBER,
         "boolean": BOOLEAN, "null": NULL}
# read and not enforced: uniqueItems too (pydantic's set[X]: a list with repeats validates as the set)
ANNOTATIONS = {"title", "description", "format", "$schema", "strict", "additionalProperties", "default", "examples",
               "$id", "$comment", "discriminator", "uniqueItems", "deprecated", "readOnly", "writeOnly",
               "contentEncoding", "contentMediaType"}
KEYWORDS = {"type", "properties", "required", "additionalProperties", "minProperties", "maxProperties", "items",
            "prefixItems", "minItems", "maxItems", "minLength", "maxLength", "pattern", "minimum", "maximum",
            "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "enum", "const", "anyOf", "oneOf", "allOf", "$ref",
            "$defs", "definitions"} | ANNOTATIONS
MAX_NODES = 256


class SchemaError(ValueError):
    pass


class Schema:
    """One schema's nodes (None: any JSON object), checked and its $refs resolved."""

    def __init__(self, schema: dict | None = None) -> None:
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
                if node[2] and sum(map(len, starts)) != len(set().union(*starts)) and not self._tagged(i):
                    raise SchemaError("oneOf: its alternatives must begin differently (a string or null, say), "
                                      "so that the first byte of a value picks one, or be objects whose first "
                                      "property is a required const of its own (a tagged union); anyOf takes "
                                      "alternatives that begin alike")
        top = self.nodes[root]
        if top[0] != OBJECT and not (top[0] == ANY_OF and all(self.nodes[alt][0] == OBJECT for alt in top[1])):
            raise SchemaError('the schema\'s top level must be {"type": "object", ...} (or objects\' anyOf)')
        self.root = root

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
            self.nodes[node] = (ANY_OF, tuple(self._compile(alt, f"{where}.{word}[{i}]") for i, alt in enumerate(alts)),
                                word == "oneOf")
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
            lo, hi = _counts(schema, "Properties", where)
            if props is not None and (lo or hi is not None):
                raise SchemaError(f"{where}: minProperties and maxProperties are taken on an object without properties")
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
            lo, hi = _counts(schema, "Items", where)
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
            lo, hi = _counts(schema, "Length", where)
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

    def _tagged(self, node_id: int) -> bool:
        """Whether oneOf node_id's alternatives are objects whose first property has one name, is
        required and is a constant of each one's own (pydantic's tagged unions): at most one matches."""
        alts = [self.nodes[alt] for alt in self.nodes[node_id][1]]
        if not all(a[0] == OBJECT and a[1] for a in alts):
            return False
        firsts = [a[1][0] for a in alts]
        tags = [self.nodes[node][1] for _, node, _ in firsts if self.nodes[node][0] == ENUM]
        return not (len(tags) < len(alts) or len({name for name, _, _ in firsts}) > 1 or not all(r for _, _, r in firsts)
                    or any(len(t) > 1 for t in tags) or len({t[0] for t in tags}) < len(tags))

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
        if node[0] == ANY_OF:
            seen = seen | {node_id}
            return set().union(*(self._starts(alt, seen) for alt in node[1] if alt not in seen))
        return set(STARTS[node[0]])

    def _add(self, node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1


def _counts(schema: dict, what: str, where: str) -> tuple[int, int | None]:
    """min<what> and max<what> (Items, Length, Properties): integers, 0 <= least <= most (None: no most)."""
    lo, hi = schema.get(f"min{what}", 0), schema.get(f"max{what}")
    if not isinstance(lo, int) or lo < 0 or hi is not None and (not isinstance(hi, int) or hi < lo):
        raise SchemaError(f"{where}: min{what} and max{what} must be integers, 0 <= min{what} <= max{what}")
    return lo, hi


def _limits(schema: dict, integer: bool, where: str) -> tuple | None:
    """A number's bounds as (min, min exclusive?, max, max exclusive?, multipleOf), None where it has
    none: exact fractions of the decimals written (0.1 is 1/10); an integer's as the inclusive
    integers within, its step the integers that are multiples (of 5/2: of 5)."""
    names = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum", "multipleOf")
    values = [schema.get(k) for k in names]
    if all(v is None for v in values):
        return None
    for name, v in zip(names, values):
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                              or name == "multipleOf" and v <= 0):
            raise SchemaError(f"{where}.{name} must be a finite number{' above 0' if name == 'multipleOf' else ''}, "
                              f"got {json.dumps(v)}")
    lo, xlo, hi, xhi, step = (None if v is None else Fraction(repr(v)) if isinstance(v, float) else Fraction(v)
                              for v in values)
    low = max([(v, x) for v, x in ((lo, False), (xlo, True)) if v is not None], default=(None, False))
    high = min([(v, not x) for v, x in ((hi, False), (xhi, True)) if v is not None], default=(None, True))
    limits = (low[0], low[1], high[0], not high[1], step)
    if integer:                                              # the integers within, inclusive
        first = None if lo is None and xlo is None else math.floor(low[0]) + 1 if low[1] else math.ceil(low[0])
        last = None if hi is None and xhi is None else math.ceil(high[0]) - 1 if not high[1] else math.floor(high[0])
        limits = (first, False, last, False, None if step is None else Fraction(step.numerator))
    if not meets(limits, None, False, None, False):
        raise SchemaError(f"{where}: no {'integer' if integer else 'number'} lies between its minimum and maximum"
                          f"{' that is a multiple of its multipleOf' if step is not None else ''}")
    return limits


def meets(limits: tuple, low, low_closed: bool, high, high_closed: bool) -> bool:
    """Whether some number in the interval from low to high (None: unbounded) lies within limits
    (and is a multiple of their step)."""
    lo, xlo, hi, xhi, step = limits
    if lo is not None and (low is None or lo > low or lo == low and xlo):
        low, low_closed = lo, not xlo
    if hi is not None and (high is None or hi < high or hi == high and xhi):
        high, high_closed = hi, not xhi
    if step is not None and low is not None and high is not None:   # the first multiple from low
        first = math.ceil(low / step) * step
        first += step if first == low and not low_closed else 0
        low, low_closed = first, True
    return low is None or high is None or low < high or low == high and low_closed and high_closed


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
            Schema(spec["schema"])                           # refused here, not at the first token
            return json.dumps(spec["schema"])                # its properties' order is the output's
        raise SchemaError('json_schema must be {"name": ..., "schema": {...}, "strict": ...}')
    raise SchemaError('response_format must be {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                      f'"json_schema": {{"name": ..., "schema": {{...}}}}}}, got {json.dumps(value)}')
