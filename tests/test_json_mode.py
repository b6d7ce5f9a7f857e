"""JSON mode and structured outputs: the automaton against Python's own JSON parser and against
schemas, each state's valid tokens against a check of every token, the choice of a constrained
row's token, and the engine holding a random model's output to a JSON object (and to a schema)
beside a request it must not change."""

import json
import random
from fractions import Fraction

import pytest
import torch

from llmserve.config import EngineConfig
from llmserve.engine import Engine
from llmserve.json_mode import DONE, MAX_INDENT, MULTI, Grammar
from llmserve.json_schema import KEYWORDS, SchemaError, response_schema
from llmserve.json_vocab import JsonVocab, token_bytes
from llmserve.request import Request, SamplingParams

ANY = Grammar()
DOCUMENTS = ['{}', '{"a": 1}', ' {"a": -0.5E-3, "b": [1, 2.25e+10, {"c": null}], "d": true}', '{"k": ""}',
             '{"s": "tab\\tquote\\"slash\\/u\\u00e9\\uD83D"}', '{"x": [], "y": {}, "z": [[], [{}]]}',
             '{"n": 0, "m": -0, "e": 1e5, "f": false}', '{"\u00e9t\u00e9": "h\u00e9"}', '{ "a" : [ 1 , 2 ] }']
NOT_OBJECTS = ['[1]', '"a"', '1', 'true', '', '{', '{"a": 01}', '{"a": 1.}', '{"a": .5}', '{"a": 1e}', '{"a" 1}',
               '{"a": 1,}', '{"a": [1,]}', '{a: 1}', '{"a": "\\x"}', '{"a": "\\u12G4"}', '{"a": "line\nbreak"}',
               '{"a": tru}', '{"a": nul}', '{"a": 1}}', '{"a": 1} x', '{"a": 1]', '{"a": [1}', '{"a": -}',
               '{"a": +1}', '{"a": 1e+}', '{} {}', "{'a': 1}", '{"a": TRUE}', '{"a":\n\t[1,\n  2]\n}']


def parses_to_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def is_object(text: str, grammar: Grammar = ANY) -> bool:
    state = grammar.feed(grammar.initial, text.encode())
    return state is not None and state[0] == DONE


def feed(state, data: bytes, grammar: Grammar = ANY):
    return grammar.feed(state, data)


INITIAL = ANY.initial


@pytest.mark.parametrize("text", DOCUMENTS + NOT_OBJECTS)
def test_the_automaton_takes_exactly_the_json_objects_python_parses(text):
    assert is_object(text) == parses_to_object(text)


def test_every_prefix_of_an_object_may_go_on_and_only_the_whole_is_done():
    for text in DOCUMENTS:
        data = text.rstrip().encode()
        states = [feed(INITIAL, data[:n]) for n in range(len(data) + 1)]
        assert all(s is not None for s in states), text
        assert [s[0] == DONE for s in states] == [False] * len(data) + [True]


def test_random_strings_agree_with_python_s_parser():
    """Short strings over JSON's own characters (and some it refuses): the automaton takes one as a
    whole object exactly when json.loads parses it to a dict, and a prefix the automaton refuses
    cannot be completed (none of its extensions parse)."""
    rng = random.Random(0)
    alphabet = list('{}[]":,0123456789-+.eEtfrunlsa\\') + ['"a"', '":', 'true', 'null', '1.5', '\\u00e9', '" "']
    seen = 0
    for _ in range(20000):
        text = "{" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        if rng.random() < 0.5:
            text += "}"
        assert is_object(text) == parses_to_object(text), text
        if feed(INITIAL, text.encode()) is None:
            assert not any(parses_to_object(text + end) for end in ("}", '"}', "]}", '"]}', "1}", "}}", '""}', "e}"))
        seen += is_object(text)
    assert seen > 100          # the sample holds objects, not only refusals


def test_whitespace_outside_strings_is_a_space_or_a_newline_and_indent_and_nothing_after_the_end():
    assert is_object('{ "a" : [ 1 ,\n\t2 ] }') and is_object("{\n" + " " * MAX_INDENT + "}")
    assert not any(is_object(text) or feed(INITIAL, text.encode()) is not None
                   for text in ("{  ", "{\n\n", "{ \n", "{\t", "{\r\n", "{\n" + " " * (MAX_INDENT + 1), "{} ", "{}\n"))
    assert is_object('{"a": "' + " " * 100 + '\\n"}')


CAT = {"type": "object", "title": "cat", "properties": {
    "name": {"type": "string", "description": "its name"}, "age": {"type": "integer"},
    "colour": {"enum": ["black", "white", 3, None]}, "indoor": {"type": "boolean"},
    "toys": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2},
    "owner": {"type": "object", "properties": {"city": {"type": "string"}, "since": {"type": "number"}},
              "required": ["since"]},
    "notes": {}, "tags": {"type": "object"}, "gone": {"type": "null"}},
    "required": ["name", "age", "toys"], "additionalProperties": False}
PERSON = {"$ref": "#/$defs/Person", "$defs": {   # pydantic's shape: a $ref at the top, a recursive optional field
    "Pet": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
    "Person": {"type": "object", "properties": {"name": {"type": "string"},
                                                "age": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                                                "pets": {"type": "array", "items": {"$ref": "#/$defs/Pet"}},
                                                "boss": {"anyOf": [{"$ref": "#/$defs/Person"}, {"type": "null"}]}}}}}
CATS = ['{"name": "Tom", "age": 3, "toys": ["ball"]}',
        '{"name": "Tom", "age": -3, "colour": 3, "indoor": false, "toys": ["a", "b"], "owner": {"since": 1.5e2},'
        ' "notes": [1, {"x": null}], "tags": {"any": ["thing"]}, "gone": null}',
        '{"name":"\\u00e9","age":0,"colour":"black","toys":["x"],"owner":{"city":"Paris","since":-0.5}}',
        '{"name": "T", "age": 1, "colour": null, "toys": ["x"]}']
NOT_CATS = ['{}', '{"name": "Tom", "age": 3}', '{"age": 3, "name": "Tom", "toys": ["b"]}',
            '{"name": "Tom", "age": 3.5, "toys": ["b"]}', '{"name": "Tom", "age": 3, "toys": []}',
            '{"name": "Tom", "age": 3, "toys": ["a", "b", "c"]}', '{"name": "Tom", "age": 3, "toys": [1]}',
            '{"name": "Tom", "age": 3, "colour": "red", "toys": ["b"]}', '{"name": 5, "age": 3, "toys": ["b"]}',
            '{"name": "Tom", "age": 3, "toys": ["b"], "extra": 1}', '{"name": "Tom", "age": 3, "toys": ["b"], "owner": {}}',
            '{"name": "Tom", "age": 3, "toys": ["b"], "indoor": "yes"}', '{"name": "Tom", "age": 3, "toys": ["b"], "gone": 0}',
            '{"name": "Tom", "age": 3, "colour": "blackish", "toys": ["b"]}', '{"nam": "Tom", "age": 3, "toys": ["b"]}',
            '{"name": "Tom", "age": 3, "toys": ["b"],}', '{"name": "Tom", "age": 3, "colour": 30, "toys": ["b"]}']


@pytest.mark.parametrize("text, ok", [(t, True) for t in CATS] + [(t, False) for t in NOT_CATS])
def test_a_schema_s_automaton_takes_its_objects_and_no_others(text, ok):
    cat = Grammar(CAT)
    assert is_object(text, cat) == ok
    if ok:
        assert parses_to_object(text) and is_object(json.dumps(json.loads(text), indent=2), cat)


@pytest.mark.parametrize("schema, words", [
    ({"type": "array"}, "top level"), ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(x"}}},
                                       "pattern: unbalanced"), ({"type": "object", "properties": {"a": {"allOf": []}}}, "allOf"),
    ({"type": "object", "properties": {"a": {"oneOf": []}}}, "oneOf"), ({"type": "objects"}, "type"),
    ({"type": "object", "properties": {"a": {"anyOf": []}}}, "anyOf must be"),
    ({"type": "object", "properties": {"a": {"type": []}}}, "type must be"),
    ({"type": "object", "properties": {"a": {"$ref": {"x": 1}}}}, "ref"), ({"type": "object", "$defs": [1]}, "defs"),
    ({"type": "object", "properties": {"a": {"type": {"x": 1}}}}, "type must be"),
    ({"type": "object", "properties": {"a": {}}, "required": [["a"]]}, "required"),
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "object"}, {"type": "object", "properties": {}}]}}},
     "begin differently"), ({"type": "object", "properties": {"a": {"oneOf": [{"type": "integer"}, {"type": "number"}]}}},
                            "begin differently"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/B"}}}, "ref"),
    ({"type": "object", "properties": {"a": {"$ref": "http://example.com/b.json"}}}, "ref"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}, "$defs": {"A": {"$ref": "#/$defs/A"}}}, "itself"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}},
      "$defs": {"A": {"anyOf": [{"$ref": "#/$defs/A"}, {"type": "null"}]}}}, "leads back"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "required"),
    ({"type": "object", "properties": {"a": {"type": "array", "minItems": 3, "maxItems": 2}}}, "maxItems"),
    ({"type": "object", "properties": {"a": {"enum": []}}}, "enum"), ([], "schema"),
    ({"type": "object", "properties": {"a": 5}}, "JSON object")])
def test_a_schema_outside_the_subset_is_refused_by_name(schema, words):
    with pytest.raises(SchemaError, match=words):
        response_schema({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})


def random_schema(rng: random.Random, depth: int = 0):
    """A schema built of the subset's keywords with values of any JSON type, nested at random."""
    values = [0, -1, 2 ** 70, 1.5, None, True, "", "x", "#/$defs/A", "#/definitions/A", "object", "integer", [],
              ["string", "null"], ["a"], [["a"]], {"a": 1}]
    schema = {}
    for _ in range(rng.randrange(4)):
        key = rng.choice(sorted(KEYWORDS))
        if key in ("properties", "$defs") and depth < 3:
            schema[key] = {name: random_schema(rng, depth + 1) for name in rng.sample("Aab", rng.randrange(3))}
        elif key in ("anyOf", "oneOf", "items") and depth < 3:
            alts = [random_schema(rng, depth + 1) for _ in range(rng.randrange(3))]
            schema[key] = alts if key != "items" else (alts or [{}])[0]
        else:
            schema[key] = rng.choice(values)
    return schema


def test_any_schema_is_taken_or_refused_with_a_schema_error():
    """Seeded random schemas: each one compiles or raises SchemaError (a 400 naming response_format),
    never another exception (a 500: a non-string $ref, $defs not an object, type an object, ...
    did), and the automaton of each one taken steps through any bytes."""
    rng = random.Random(0)
    for _ in range(3000):
        schema = random_schema(rng)
        if rng.random() < 0.7:
            schema = {**schema, "type": "object"}
        try:
            grammar = Grammar(schema)
        except SchemaError:
            continue
        data = bytes(rng.choice(b'{}[]":,0123456789-.eEtrufalsn \nab\\') for _ in range(rng.randrange(30)))
        grammar.feed(grammar.initial, b'{"a": ' + data)


def test_response_format_values():
    assert response_schema(None) is None and response_schema({"type": "text"}) is None
    assert response_schema({"type": "json_object"}) == "null"
    text = response_schema({"type": "json_schema", "json_schema": {"name": "cat", "schema": CAT, "strict": True}})
    assert list(json.loads(text)["properties"]) == list(CAT["properties"])       # their order kept
    for bad in ({"type": "json_schema"}, {"type": "json_object", "strict": True}, "json",
                {"type": "json_schema", "json_schema": {"name": "x", "schema": CAT, "colour": 1}}):
        with pytest.raises(SchemaError):
            response_schema(bad)


@pytest.mark.parametrize("text, ok", [
    ('{"name": "Ann", "age": null, "pets": [], "boss": null}', True),
    ('{"name": "Ann", "age": 31, "pets": [{"name": "Rex", "kind": "dog"}], "boss": {"name": "Bo", "age": null, '
     '"pets": [], "boss": {"name": "Cy", "age": 70, "pets": [], "boss": null}}}', True),
    ('{"name": "Ann", "age": "31", "pets": [], "boss": null}', False),
    ('{"name": "Ann", "age": 31, "pets": [{"name": "Rex"}], "boss": null}', False),
    ('{"name": "Ann", "age": 31, "pets": [], "boss": {"name": "Bo"}}', False),
    ('{"name": "Ann", "age": 3.5, "pets": [], "boss": null}', False),
    ('{"name": "Ann", "pets": [], "boss": null}', False)])
def test_pydantic_s_schemas_with_defs_refs_and_optional_fields(person_model, text, ok):
    model, strict = person_model
    for schema in (strict, model.model_json_schema()):   # the second: a $ref at the top, optional fields
        grammar = Grammar(json.loads(response_schema({"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})))
        assert is_object(text, grammar) == (ok or schema is not strict and text == '{"name": "Ann", "pets": [], "boss": null}')
    if ok:
        assert model.model_validate_json(text).name == "Ann"


NAME = {"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 4}}, "required": ["s"]}


@pytest.mark.parametrize("value, ok", [('"ab"', True), ('"abcd"', True), ('"\u00e9\u20acx"', True), ('"a\\n"', True),
                                       ('"\\u00e9\\u00e9\\u00e9\\u00e9"', True), ('"a"', False), ('""', False),
                                       ('"abcde"', False), ('"\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9"', False)])
def test_a_string_s_length_is_counted_in_characters(value, ok):
    """minLength and maxLength count characters: a multi-byte UTF-8 one, an escape, once each."""
    assert len(json.loads(value)) in (range(2, 5) if ok else (0, 1, 5))
    assert is_object('{"s": ' + value + '}', Grammar(NAME)) == ok


def string_of(pattern=None, fmt=None, **kw) -> Grammar:
    field = {"type": "string", **({"pattern": pattern} if pattern else {}), **({"format": fmt} if fmt else {}), **kw}
    return Grammar({"type": "object", "properties": {"p": field}, "required": ["p"]})


@pytest.mark.parametrize("grammar, value, ok", [
    (r"^\d{3}-\d{4}$", '"555-1234"', True), (r"^\d{3}-\d{4}$", '"5551234"', False),
    (r"^\d{3}-\d{4}$", '"555-12345"', False), (r"^\d{3}-\d{4}$", r'"\u0035\u00355-1234"', True),
    (r"^[A-Z]{2}$", '"FR"', True), (r"^[A-Z]{2}$", '"Fr"', False), ("ab", '"xxabyy"', True), ("ab", '"ba"', False),
    (r"^é+\n?$", '"éé"', True), (r"^é+\n?$", r'"\u00e9\n"', True), (r"^é+\n?$", '"e"', False),
    (r"^a/b$", r'"a\/b"', True), ("^[^@]+$", '"a@b"', False),
    ("date", '"2024-02-29"', True), ("date", '"2024-13-01"', False), ("date", '"24-01-01"', False),
    ("date-time", '"2024-01-31T23:59:07Z"', True), ("date-time", '"2024-01-31 23:59"', False),
    ("time", '"12:30:00.5+02:00"', True), ("uuid", '"123e4567-e89b-12d3-a456-426614174000"', True),
    ("uuid", '"123e4567e89b12d3a456426614174000"', False), ("email", '"ann@example.org"', True),
    ("email", '"ann at example.org"', False), ("hostname", '"any text: not enforced"', True)])
def test_a_string_s_pattern_or_format_holds_its_characters(grammar, value, ok):
    """pattern (ECMA-262's subset, anywhere in the string unless anchored), and the formats date,
    time, date-time, uuid and email as patterns: over the characters the JSON text stands for
    (escapes and UTF-8 decoded); other formats are annotations."""
    g = string_of(fmt=grammar) if grammar in ("date", "time", "date-time", "uuid", "email", "hostname") else string_of(grammar)
    assert is_object('{"p": ' + value + "}", g) == ok


def test_a_pattern_holds_every_prefix_and_keeps_the_length_bounds():
    g = string_of(r"^\d{3}-\d{4}$", maxLength=8)
    assert g.feed(g.initial, b'{"p": "55') is not None and g.feed(g.initial, b'{"p": "55a') is None
    assert g.feed(g.initial, b'{"p": "555-123"}') is None                     # a closing quote too soon
    g = string_of("^x*$", minLength=2, maxLength=3)
    assert [is_object('{"p": "%s"}' % ("x" * n), g) for n in range(5)] == [False, False, True, True, False]
    g = string_of("^é$")
    assert g.feed(g.initial, '{"p": "é'.encode()[:-1] + b'"') is None           # a character left unfinished


def test_an_integer_s_bounds_hold_every_prefix_to_a_value_within_them():
    """minimum / maximum (and the exclusive ones) on integers: a prefix stands while some integer it
    begins (itself, or longer) is within, and the value ends only within; checked against every
    integer from -300 to 300 and their prefixes."""
    for lo, hi, extra in [(0, 120, {}), (-50, -5, {}), (None, 7, {}), (15, None, {}), (None, None, {"exclusiveMinimum": 3, "exclusiveMaximum": 9})]:
        schema = {"type": "integer", **({} if lo is None else {"minimum": lo}), **({} if hi is None else {"maximum": hi}), **extra}
        grammar = Grammar({"type": "object", "properties": {"n": schema}, "required": ["n"]})
        inside = range(4, 9) if extra else range(-10 ** 6 if lo is None else lo, 10 ** 6 if hi is None else hi + 1)
        for v in range(-300, 301):
            assert is_object('{"n": %d}' % v, grammar) == (v in inside), (schema, v)
            text = str(v)
            for n in range(1, len(text) + 1):     # a prefix stands if some integer within begins with it
                reachable = any(str(w).startswith(text[:n]) for w in (inside if len(inside) < 10 ** 5 else range(-400, 401)))
                if len(inside) < 10 ** 5:
                    assert (grammar.feed(grammar.initial, ('{"n": ' + text[:n]).encode()) is not None) == reachable, (schema, text[:n])
    with pytest.raises(SchemaError, match="no integer"):
        Grammar({"type": "object", "properties": {"x": {"type": "integer", "minimum": 3, "exclusiveMaximum": 3}}})
    with pytest.raises(SchemaError, match="no integer"):
        Grammar({"type": "object", "properties": {"x": {"type": "integer", "minimum": 3.2, "maximum": 3.9}}})
    between = Grammar({"type": "object", "properties": {"x": {"type": "integer", "minimum": 0.5, "exclusiveMaximum": 9.5}}})
    assert [v for v in range(-3, 13) if is_object('{"x": %d}' % v, between)] == list(range(1, 10))
    fives = Grammar({"type": "object", "properties": {"x": {"type": "integer", "multipleOf": 2.5, "maximum": 30}}})
    assert [v for v in range(-12, 40) if is_object('{"x": %d}' % v, fives)] == list(range(-10, 31, 5))
    assert fives.feed(fives.initial, b'{"x": 4') is None and fives.feed(fives.initial, b'{"x": 3') is not None   # 30
    with pytest.raises(SchemaError, match="multiple"):
        Grammar({"type": "object", "properties": {"x": {"type": "integer", "multipleOf": 7, "minimum": 1, "maximum": 6}}})


def test_a_number_s_bounds_hold_every_prefix_to_a_value_within_them():
    """minimum / maximum (and the exclusive ones) on numbers, decimals as written: a prefix stands
    while some number it begins is within, and the value ends only within; no exponent where
    bounded. Checked against every decimal below 12 with up to 2 decimals and their prefixes."""
    values = sorted({f"{sign}{i}" + (f".{f:0{n}d}" if n else "") for sign in ("", "-") for i in range(0, 12)
                     for n in range(4) for f in range(10 ** n if n else 1)})
    for bounds in [{"minimum": 0, "maximum": 1}, {"exclusiveMinimum": 0}, {"minimum": -1.5, "maximum": 2.25},
                   {"maximum": -0.25}, {"exclusiveMinimum": 0.5, "exclusiveMaximum": 0.75},
                   {"multipleOf": 0.25, "minimum": -2, "exclusiveMaximum": 3}, {"multipleOf": 0.1, "maximum": 10}]:
        grammar = Grammar({"type": "object", "properties": {"x": {"type": "number", **bounds}}, "required": ["x"]})
        def within(text):
            v = Fraction(text)
            return all((v >= Fraction(repr(b)) if k == "minimum" else v > Fraction(repr(b)) if k == "exclusiveMinimum"
                        else v <= Fraction(repr(b)) if k == "maximum" else v < Fraction(repr(b)) if k == "exclusiveMaximum"
                        else v % Fraction(repr(b)) == 0) for k, b in bounds.items())
        inside = [v for v in values if within(v) and not (v.startswith("-") and Fraction(v) == 0)]   # -0: not written
        begun = {v[:n] for v in inside for n in range(1, len(v) + 1)}
        for text in values:
            if (text.count(".") == 0 or len(text.partition(".")[2]) <= 2) and not (text.startswith("-") and Fraction(text) == 0):
                assert is_object('{"x": ' + text + "}", grammar) == within(text), (bounds, text)
                for n in range(1, len(text) + 1):
                    assert (grammar.feed(grammar.initial, ('{"x": ' + text[:n]).encode()) is not None) == (text[:n] in begun), \
                        (bounds, text[:n])
        assert not is_object('{"x": 1e-1}', grammar) and is_object('{"x": 1e-1}', Grammar(
            {"type": "object", "properties": {"x": {"type": "number"}}}))
    with pytest.raises(SchemaError, match="no number"):
        Grammar({"type": "object", "properties": {"x": {"type": "number", "minimum": 3, "exclusiveMaximum": 3}}})
    with pytest.raises(SchemaError, match="finite number"):
        Grammar({"type": "object", "properties": {"x": {"type": "number", "minimum": "3"}}})


CALL = {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "arguments": arguments},
                   "required": ["name", "arguments"]} for name, arguments in (
    ("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
    ("get_time", {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]}))]}


@pytest.mark.parametrize("text, ok", [
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', True), ('{"name":"get_time","arguments":{"zone":"cet"}}', True),
    ('{"name": "get_time", "arguments": {"city": "Paris"}}', False), ('{"name": "get_x", "arguments": {}}', False),
    ('{"arguments": {}, "name": "get_time"}', False), ('{}', False), ('{"name": "get_time"}', False)])
def test_objects_told_apart_by_a_first_constant_are_a_union_the_constant_decides(text, ok):
    """anyOf of objects that all begin alike: allowed where each one's first property is the same
    required name holding a constant of its own (tool calls, tagged unions): its value picks the rest."""
    assert is_object(text, Grammar(CALL)) == ok
    with pytest.raises(SchemaError, match="tagged union"):
        Grammar({"oneOf": [{"type": "object", "properties": {"name": {"const": "a"}}},
                           {"type": "object", "properties": {"name": {"const": "b"}}, "required": ["name"]}]})


# pydantic's schema for Owner(name: str, pet: Cat | Dog = Field(discriminator="kind")), kind first in each
OWNER = {"$defs": {"Cat": {"properties": {"kind": {"const": "cat", "type": "string"}, "meows": {"type": "integer"}},
                           "required": ["kind", "meows"], "type": "object"},
                   "Dog": {"properties": {"kind": {"const": "dog", "type": "string"}, "barks": {"type": "boolean"}},
                           "required": ["kind", "barks"], "type": "object"}},
         "properties": {"name": {"type": "string"}, "pet": {
             "discriminator": {"mapping": {"cat": "#/$defs/Cat", "dog": "#/$defs/Dog"}, "propertyName": "kind"},
             "oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}]}},
         "required": ["name", "pet"], "type": "object"}


@pytest.mark.parametrize("text, ok", [
    ('{"name": "Ann", "pet": {"kind": "cat", "meows": 3}}', True), ('{"name": "Ann", "pet": {"kind": "dog", "barks": true}}', True),
    ('{"name": "Ann", "pet": {"kind": "cat", "barks": true}}', False), ('{"name": "Ann", "pet": {"kind": "cow"}}', False),
    ('{"name": "Ann", "pet": {"meows": 3, "kind": "cat"}}', False)])
def test_one_of_is_any_of_whose_alternatives_match_one_at_most(text, ok):
    """oneOf (pydantic's discriminated unions) is taken as anyOf: the alternatives anyOf allows are
    told apart by their first bytes or first constant, so no value matches two."""
    assert is_object(text, Grammar(OWNER)) == ok
    with pytest.raises(SchemaError, match="begin differently"):
        Grammar({"type": "object", "properties": {"a": {"oneOf": [{"type": "integer"}, {"type": "number"}]}}})
    with pytest.raises(SchemaError, match="together"):
        Grammar({"type": "object", "properties": {"a": {"oneOf": [{"type": "integer"}], "anyOf": [{"type": "null"}]}}})


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return JsonVocab(token_bytes(tokenizer, len(tokenizer)), {tokenizer.eos_token_id})


def test_the_vocabulary_is_the_tokenizer_s_bytes(tokenizer, vocab):
    text = 'Hello, {"caf\u00e9": [1, 2]}\n\t\u4e2d'
    ids = tokenizer(text)["input_ids"]
    assert b"".join(vocab.pieces[i] for i in ids) == text.encode()
    assert vocab.pieces[tokenizer.eos_token_id] is None


@pytest.mark.parametrize("schema, prefix", [(None, p) for p in [
    '', '{', '{"a', '{"a\\', '{"a\\u00', '{"a"', '{"a":', '{"a": 1', '{"a": -', '{"a": 1.5e', '{"a": t', '{"a": [',
    '{"a": [1, {"b": "c"}', '{}', '{\n  "a": 0', ' ']] + [(CAT, p) for p in [
    '{', '{"na', '{"name": "T", "age": 1', '{"name": "T", "age": 1, "colour": "bl', '{"name": "T", "age": 1, "colour": 3',
    '{"name": "T", "age": 1, "toys": ["a"', '{"name": "T", "age": 1, "toys": ["a", "b"]', '{"name": "T", "age": 1, "toys": [']]
    + [(CALL, p) for p in ['{', '{"name": "get_', '{"name": "get_time", ']]
    + [(NAME, p) for p in ['{"s": "', '{"s": "a', '{"s": "ab\u00e9']]
    + [({"type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 250}}}, p)
       for p in ['{"n": ', '{"n": 2', '{"n": 25']]
    + [(PERSON, p) for p in ['{"name": "A", "age": ', '{"name": "A", "age": null, "pets": [{"na',
                             '{"name": "A", "age": null, "pets": [], "boss": {']])
def test_a_state_s_mask_is_every_token_that_keeps_the_output_valid(vocab, schema, prefix):
    grammar = Grammar(schema, json.dumps(schema))
    state = grammar.feed(grammar.initial, prefix.encode())
    assert state is not None
    expected = [vocab.is_valid(grammar, state, t) for t in range(vocab.size)]
    assert vocab.mask(grammar, state).tolist() == expected and any(expected)
    assert vocab.mask(grammar, state) is vocab.mask(grammar, state)            # cached


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.from_config(EngineConfig(model_path=str(tiny_model_dir), quantization="fp32", max_model_len=256,
                                           max_num_seqs=8))


def request(engine, i, max_new, **kw) -> Request:
    ids = engine.tokenizer("Describe a cat as JSON:")["input_ids"]
    return Request(request_id=f"json-{i}", prompt_ids=ids, params=SamplingParams(max_new_tokens=max_new, **kw))


def test_a_row_s_own_choice_stands_if_valid_else_the_valid_tokens_are_drawn_from(engine, tokenizer):
    r = request(engine, "choose", 8, response_schema="null")
    r.json_grammar = engine.json_vocab.grammar("null")
    r.json_state = r.json_grammar.feed(r.json_grammar.initial, b'{"a":')
    scores = torch.zeros(engine.json_vocab.size)
    word, quote, brace = (tokenizer(text)["input_ids"][0] for text in (" hello", ' "', " {"))
    scores[word], scores[quote], scores[brace] = 30.0, 20.0, 19.9   # the likeliest is invalid after a colon
    assert engine._json_token(r, r.json_state, scores, word) == quote       # greedy
    r.params = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=50, response_schema="null")
    r.generator = torch.Generator().manual_seed(0)
    draws = [engine._json_token(r, r.json_state, scores, word) for _ in range(50)]
    assert all(engine.json_vocab.is_valid(r.json_grammar, r.json_state, t) for t in draws)
    assert {quote, brace} <= set(draws)                       # drawn, not the likeliest
    assert engine._json_token(r, r.json_state, scores, quote) == quote      # a valid choice stands
    r.json_state = r.json_grammar.feed(r.json_grammar.initial, b"{}")   # a closed object: only the end of text
    assert engine._json_token(r, r.json_state, scores, quote) == tokenizer.eos_token_id
    r.params = SamplingParams(max_new_tokens=8, stop_token_ids=(quote,), response_schema="null")
    assert engine._json_token(r, r.json_state, scores, word) == quote       # ... or a stop token of its own
    # a verify step's positions: each the grammar's choice after the draft before it (the draft " \"" kept
    # though the likeliest token at its position is " hello"; inside the string a newline is not valid)
    r.params, r.json_state = SamplingParams(max_new_tokens=8, response_schema="null"), r.json_grammar.feed(
        r.json_grammar.initial, b'{"a":')
    newline = tokenizer("\n")["input_ids"][0]
    logits = torch.zeros(2, engine.json_vocab.size)
    logits[0, word], logits[0, quote] = 30.0, 20.0
    logits[1, newline], logits[1, word] = 30.0, 20.0
    assert engine._json_positions(r, [quote], logits, [word, newline]) == [quote, word]


def test_a_random_model_s_output_is_held_to_a_json_object_or_a_schema_and_its_neighbour_is_unchanged(engine):
    """A random model's likeliest tokens are anything; in JSON mode every output is an object's
    prefix (a whole one where it stopped), greedy and sampled, with or without a schema, while a
    plain request in the same batch gets the tokens it gets alone."""
    plain_alone = request(engine, "alone", 24)
    engine.generate([plain_alone])
    cat = response_schema({"type": "json_schema", "json_schema": {"name": "cat", "schema": CAT}})
    constrained = [request(engine, i, 64, response_schema=schema, **kw)
                   for i, (schema, kw) in enumerate([("null", {}), ("null", {"temperature": 1.0, "seed": 3}),
                                                     ("null", {"temperature": 0.7, "top_p": 0.9}), (cat, {}),
                                                     (cat, {"temperature": 1.0, "seed": 4})])]
    plain = request(engine, "plain", 24)
    engine.generate(constrained + [plain])
    assert plain.output_ids == plain_alone.output_ids
    unconstrained = request(engine, "free", 48)
    engine.generate([unconstrained])
    assert feed(INITIAL, engine.tokenizer.decode(unconstrained.output_ids).encode()) is None   # the model alone is not JSON
    for r in constrained:
        grammar = Grammar(json.loads(r.params.response_schema))
        text = engine.tokenizer.decode(r.output_ids, skip_special_tokens=True)
        assert text == r.text and grammar.feed(grammar.initial, text.encode()) is not None, text
        assert r.finish_reason == "length" or is_object(text, grammar) and parses_to_object(text)
    assert len({tuple(r.output_ids) for r in constrained}) == len(constrained)
    for r in constrained[3:]:                                 # the schema's first property first
        rest = r.text.lstrip(" \n\t").removeprefix("{").lstrip(" \n\t")
        assert '"name"'.startswith(rest) or rest.startswith('"name"'), r.text


def test_a_grammar_that_fails_ends_its_request_alone(engine, monkeypatch):
    """A fault in JSON mode (here: its automaton raising for one schema) is that request's error;
    the plain request and the other JSON one beside it get their tokens."""
    plain_alone, json_alone = request(engine, "alone", 12), request(engine, "json-alone", 12, response_schema="null")
    engine.generate([plain_alone, json_alone])
    broken_schema = json.dumps({"type": "object", "properties": {"a": {"type": "string"}}})
    real_step = Grammar.step
    monkeypatch.setattr(Grammar, "step", lambda self, state, b: (_ for _ in ()).throw(KeyError("lost"))
                        if self.key == broken_schema and state[0] != 0 else real_step(self, state, b))
    broken, plain, other = (request(engine, "broken", 12, response_schema=broken_schema), request(engine, "plain", 12),
                            request(engine, "other", 12, response_schema="null"))
    engine.generate([broken, plain, other])
    assert broken.finish_reason == "error" and "JSON mode failed: KeyError" in broken.error
    assert plain.output_ids == plain_alone.output_ids and other.output_ids == json_alone.output_ids
    engine.check_invariants()


def test_a_greedy_json_request_drafts_and_keeps_its_tokens(tiny_model_dir, monkeypatch):
    """Drafts verified position by position under the grammar (here: the one-by-one answer's next
    token and a wrong one after it, cut to their valid part): greedy JSON answers, any object and a
    schema's, are the ones decoded one by one, with drafts kept; a sampled JSON request does not draft."""
    from llmserve.speculative import PromptLookup

    spec = Engine.from_config(EngineConfig(model_path=str(tiny_model_dir), quantization="fp32", max_model_len=256,
                                           max_num_seqs=8, spec_tokens=3, spec_max_rows=8))
    cat = response_schema({"type": "json_schema", "json_schema": {"name": "cat", "schema": CAT}})

    def run(max_rows: int) -> list[Request]:
        spec.spec_max_rows = max_rows                          # 1: no room for a draft
        answers = [request(spec, f"{max_rows}-{i}", 48, response_schema=schema, **kw) for i, (schema, kw) in
                   enumerate([("null", {}), (cat, {}), ("null", {"temperature": 1.0, "seed": 5})])]
        spec.generate(answers)
        return answers

    one_by_one = run(1)
    prompt = len(one_by_one[0].prompt_ids)

    def draft(self, tokens, limit):
        """The one-by-one answer's next two tokens, every other time with a valid wrong one second."""
        out = tokens[prompt:]
        for r in one_by_one[:2]:
            ref = r.output_ids
            if ref[:len(out)] == out and len(ref) > len(out) + 2:
                grammar = spec.json_vocab.grammar(r.params.response_schema)
                state = grammar.feed(grammar.initial, bytes(b for t in ref[:len(out) + 1] for b in spec.json_vocab.pieces[t]))
                valid = spec.json_vocab.mask(grammar, state).nonzero()[:, 0].tolist()
                wrong = next(t for t in valid if t != ref[len(out) + 1])
                return (ref[len(out):len(out) + 2] if len(out) % 2 else [ref[len(out)], wrong])[:limit]
        return []

    monkeypatch.setattr(PromptLookup, "draft", draft)
    drafted = run(12)                                          # room for two draft tokens a row
    assert [r.output_ids for r in drafted[:2]] == [r.output_ids for r in one_by_one[:2]]   # (a sampled row's
    # logits in a verify step's shape may round apart from a decode step's: not compared)
    assert all(0 < r.num_accepted_tokens < r.num_draft_tokens for r in drafted[:2]) and drafted[2].lookup is None
    for r in drafted:
        grammar = spec.json_vocab.grammar(r.params.response_schema)
        assert grammar.feed(grammar.initial, r.text.encode()) is not None


def test_a_pattern_s_mask_is_every_token_that_keeps_the_string_matching(vocab):
    """Inside a string with a pattern the plain tokens are not valid as a block: each is checked."""
    g = string_of(r"^\d{3}-\d{4}$")
    for prefix in (b'{"p": "', b'{"p": "555', b'{"p": "555-1234'):
        state = g.feed(g.initial, prefix)
        every = [i for i, piece in enumerate(vocab.pieces) if piece and g.feed(state, piece) is not None]
        assert vocab.mask(g, state).nonzero().flatten().tolist() == every and 0 < len(every) < 2000


@pytest.mark.parametrize("text, ok", [
    ('{"scores": {"ann": 3, "bo": -1}, "point": [1, "a"], "rest": {}}', True),
    ('{"scores": {}, "point": [1, "a", true, false], "rest": {}}', True),
    ('{"scores": {"ann": "3"}, "point": [1, "a"], "rest": {}}', False),
    ('{"scores": {}, "point": ["a", 1], "rest": {}}', False), ('{"scores": {}, "point": [1], "rest": {}}', False),
    ('{"scores": {}, "point": [1, "a", 2], "rest": {}}', False),
    ('{"scores": {}, "point": [1, "a"], "rest": {"x": 1}}', False)])
def test_dicts_take_one_schema_of_values_and_tuples_one_of_each_place(text, ok):
    """additionalProperties as a schema where there are no properties (pydantic's dict[str, int]),
    false (no keys), min/maxProperties (dict's min_length/max_length); prefixItems (pydantic's tuple[int, str]) and items after them; an allOf of one."""
    g = Grammar({"type": "object", "required": ["scores", "point", "rest"], "properties": {
        "scores": {"type": "object", "additionalProperties": {"type": "integer"}},
        "point": {"allOf": [{"$ref": "#/$defs/Pair"}], "description": "a pair, then flags"},
        "rest": {"type": "object", "additionalProperties": False}},
        "$defs": {"Pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}],
                           "items": {"type": "boolean"}, "minItems": 2}}})
    assert is_object(text, g) == ok
    pair = Grammar({"type": "object", "properties": {"p": {"type": "array", "prefixItems": [{"type": "integer"}] * 2,
                                                           "items": False}}})
    assert [is_object('{"p": %s}' % v, pair) for v in ("[1, 2]", "[1]", "[1, 2, 3]", "[]")] == [True, True, False, True]
    with pytest.raises(SchemaError, match="allOf"):
        Grammar({"type": "object", "properties": {"a": {"allOf": [{"type": "integer"}, {"minimum": 1}]}}})
    with pytest.raises(SchemaError, match="additionalProperties"):
        Grammar({"type": "object", "additionalProperties": 3})
    few = Grammar({"type": "object", "properties": {"d": {"type": "object", "additionalProperties": {"type": "integer"},
                                                          "minProperties": 1, "maxProperties": 2}}})
    assert [is_object('{"d": %s}' % v, few) for v in ('{}', '{"a": 1}', '{"a": 1, "b": 2}', '{"a": 1, "b": 2, "c": 3}')] \
        == [False, True, True, False]
    with pytest.raises(SchemaError, match="without properties"):
        Grammar({"type": "object", "properties": {"a": {}}, "maxProperties": 1})


# pydantic's Union[Cat, Dog] without a discriminator, and int | float: alternatives that begin alike
PETS = {"type": "object", "required": ["pet", "n"], "properties": {
    "pet": {"anyOf": [{"type": "object", "properties": {"name": {"type": "string"}, "meows": {"type": "integer"}},
                       "required": ["name", "meows"]},
                      {"type": "object", "properties": {"name": {"type": "string"}, "barks": {"type": "boolean"}},
                       "required": ["name", "barks"]},
                      {"type": "array", "items": {"type": "integer"}}]},
    "n": {"anyOf": [{"type": "integer", "maximum": 9}, {"type": "number", "minimum": 100}]}}}


@pytest.mark.parametrize("text, ok", [
    ('{"pet": {"name": "Tom", "meows": 3}, "n": 5}', True), ('{"pet": {"name": "Rex", "barks": true}, "n": 5}', True),
    ('{"pet": [1, 2], "n": 150.5}', True), ('{"pet": {"name": "Tom", "meows": true}, "n": 5}', False),
    ('{"pet": {"name": "Rex", "barks": 3}, "n": 5}', False), ('{"pet": {"name": "Tom"}, "n": 5}', False),
    ('{"pet": [1], "n": 50}', False), ('{"pet": [1], "n": 5.5}', False), ('{"pet": [1], "n": 9}', True)])
def test_an_any_of_whose_alternatives_begin_alike_follows_them_side_by_side(text, ok):
    """anyOf takes alternatives that begin alike: each one the output can still be is followed (a
    state of several), and they become one again where the value closes."""
    g = Grammar(PETS)
    assert is_object(text, g) == ok
    if ok:
        state = g.feed(g.initial, text.encode())
        assert state[0] == DONE
    state = g.feed(g.initial, b'{"pet": {"name": "T')
    assert state[0] == MULTI and len(state[2]) == 2                   # a cat or a dog, so far
    assert g.feed(g.initial, b'{"pet": {"name": "Tom", "m')[0] != MULTI   # a cat


def test_a_state_of_several_alternatives_masks_every_token_one_of_them_takes(vocab):
    g = Grammar(PETS)
    for prefix in (b'{"pet": ', b'{"pet": {"name": "T', b'{"pet": {"name": "Tom", ', b'{"pet": [1], "n": 1'):
        state = g.feed(g.initial, prefix)
        every = [i for i, piece in enumerate(vocab.pieces) if piece and g.feed(state, piece) is not None]
        assert vocab.mask(g, state).nonzero().flatten().tolist() == every and every


def test_pydantic_s_set_and_bytes_fields_are_taken_their_notes_read_only():
    """set[str] is an array with uniqueItems (a list with repeats validates as the set), bytes a
    string with a format no pattern stands for: annotations, not refusals."""
    g = Grammar({"type": "object", "required": ["tags", "data"], "properties": {
        "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        "data": {"type": "string", "format": "binary", "deprecated": True}}})
    assert is_object('{"tags": ["a", "a"], "data": "xx"}', g) and not is_object('{"tags": [1], "data": "xx"}', g)
