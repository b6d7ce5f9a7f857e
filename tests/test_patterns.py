"""Schema patterns as automata (patterns.py): the same strings as Python's re finds them (re.search:
JSON Schema's patterns match anywhere unless anchored), and the parts of ECMA-262 we do not take
refused by name."""

import random
import re

import pytest

from llmserve.patterns import FORMATS, Pattern, PatternError

PATTERNS = [r"^\d{3}-\d{4}$", r"^[A-Z]{2}$", r"abc", r"^a(b|c)*d?$", r"^[^@\s]+@[^@\s]+\.[^@\s]+$", r"^(?:x|yz){2,3}$",
            r"^[a-f0-9]{2,}$", r"^\w+\s\w+$", r"colou?r", r"^\$\d+(\.\d\d)?$", r"^a.c$", r"^[\d\-]+$",
            r"^x{2}y{1,}z{0,1}$", r"^[^a-c]*$", r"\.$", r"^\\d$", r"^[-+]?\d*\.?\d+$", r"^[\x41-\x43]+?$", r"^\D\W\S$",
            *FORMATS.values()]
SAMPLES = ["123-4567", "AB", "xxabcxx", "abcbd", "a@b.co", "xyzx", "ff00", "hello world", "color", "$10.50", "abc",
           "1-2", "xxyz", "2024-02-29", "23:59:60", "12:30:00", "2024-01-01T10:00:00Z", "\\d", "x.", "a-- ",
           "123e4567-e89b-12d3-a456-426614174000", "ann@example.org"]


def matches(pattern: Pattern, text: str) -> bool:
    states = pattern.start
    for ch in text:
        states = pattern.step(states, ord(ch))
        if not states:
            return False
    return pattern.accepts(states)


@pytest.mark.parametrize("source", PATTERNS)
def test_a_pattern_matches_what_re_search_finds(source):
    rng = random.Random(source)
    texts = SAMPLES + ["".join(rng.choice("abcdxyzABCXYZ0123456789-+.@ $\\{},_\t:TZ") for _ in range(rng.randrange(12)))
                       for _ in range(2000)]
    pattern, expected = Pattern(source), re.compile(source)
    assert [t for t in texts if matches(pattern, t)] == [t for t in texts if expected.search(t)]


@pytest.mark.parametrize("source, words", [
    (r"^a|b$", "group"), (r"a(?=b)", "lookaround"), (r"(a)\1", "backreference"), (r"\bword", "boundar"),
    (r"\p{L}", "Unicode"), ("(ab", "unbalanced"), ("ab)", "unbalanced"), ("[ab", "unbalanced"), ("a**", "quantifier"),
    ("a{3,1}", "second"), ("x{5000}", "too large"), ("^a^b", "start or end"), ("*a", "nothing to repeat"), ("a\\", "end")])
def test_what_is_not_taken_is_refused_by_name(source, words):
    with pytest.raises(PatternError, match=words):
        Pattern(source)
