"""JSON mode: the automaton against Python's own JSON parser, each state's valid tokens against a
check of every token, the choice of a constrained row's token, and the engine holding a random
model's output to a JSON object beside a request it must not change."""

import json
import random

import pytest
import torch

from llmserve.config import EngineConfig
from llmserve.engine import Engine
from llmserve.json_mode import DONE, INITIAL, MAX_SPACES, JsonVocab, feed, token_bytes
from llmserve.request import Request, SamplingParams

DOCUMENTS = ['{}', '{"a": 1}', ' {"a": -0.5E-3, "b": [1, 2.25e+10, {"c": null}], "d": true}\n', '{"k": ""}',
             '{"s": "tab\\tquote\\"slash\\/u\\u00e9\\uD83D"}', '{"x": [], "y": {}, "z": [[], [{}]]}',
             '{"n": 0, "m": -0, "e": 1e5, "f": false}', '{"\u00e9t\u00e9": "h\u00e9"}', '{ "a" : [ 1 , 2 ] }']
NOT_OBJECTS = ['[1]', '"a"', '1', 'true', '', '{', '{"a": 01}', '{"a": 1.}', '{"a": .5}', '{"a": 1e}', '{"a" 1}',
               '{"a": 1,}', '{"a": [1,]}', '{a: 1}', '{"a": "\\x"}', '{"a": "\\u12G4"}', '{"a": "line\nbreak"}',
               '{"a": tru}', '{"a": nul}', '{"a": 1}}', '{"a": 1} x', '{"a": 1]', '{"a": [1}', '{"a": -}',
               '{"a": +1}', '{"a": 1e+}', '{} {}', "{'a': 1}", '{"a": TRUE}']


def parses_to_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def is_object(text: str) -> bool:
    state = feed(INITIAL, text.encode())
    return state is not None and state[0] == DONE


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
    alphabet = list('{}[]":,0123456789-+.eE tfrunlsa\\\n') + ['"a"', '": ', 'true', 'null', '1.5', '\\u00e9']
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


def test_whitespace_outside_strings_is_bounded():
    assert is_object("{" + " " * MAX_SPACES + "}") and feed(INITIAL, ("{" + " " * (MAX_SPACES + 1)).encode()) is None
    assert is_object('{"a": "' + " " * 100 + '"}')


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return JsonVocab(token_bytes(tokenizer, len(tokenizer)), {tokenizer.eos_token_id})


def test_the_vocabulary_is_the_tokenizer_s_bytes(tokenizer, vocab):
    text = 'Hello, {"caf\u00e9": [1, 2]}\n\t\u4e2d'
    ids = tokenizer(text)["input_ids"]
    assert b"".join(vocab.pieces[i] for i in ids) == text.encode()
    assert vocab.pieces[tokenizer.eos_token_id] is None


@pytest.mark.parametrize("prefix", ['', '{', '{"a', '{"a\\', '{"a\\u00', '{"a"', '{"a":', '{"a": 1', '{"a": -',
                                    '{"a": 1.5e', '{"a": t', '{"a": [', '{"a": [1, {"b": "c"}', '{}', '{"a": 0} '])
def test_a_state_s_mask_is_every_token_that_keeps_the_output_valid(vocab, prefix):
    state = feed(INITIAL, prefix.encode())
    expected = [vocab.is_valid(state, t) for t in range(vocab.size)]
    assert vocab.mask(state).tolist() == expected
    assert vocab.mask(state) is vocab.mask(state)            # cached


def test_a_row_s_own_choice_stands_if_valid_else_the_valid_tokens_are_drawn_from(tokenizer, vocab):
    state = feed(INITIAL, b'{"a":')
    scores = torch.zeros(vocab.size)
    word, quote = tokenizer(" hello")["input_ids"][0], tokenizer(' "')["input_ids"][0]
    scores[word], scores[quote] = 30.0, 20.0                  # the likeliest is invalid after a colon
    greedy = SamplingParams(max_new_tokens=8)
    assert vocab.choose(state, scores, word, greedy, None) == quote
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=50)
    g = torch.Generator().manual_seed(0)
    draws = [vocab.choose(state, scores, word, sampled, g) for _ in range(50)]
    assert all(vocab.is_valid(state, t) for t in draws) and quote in draws
    assert vocab.choose(state, scores, quote, sampled, g) == quote          # a valid choice stands
    # a closed object with its whitespace spent: only the end of text
    done = feed(INITIAL, ("{}" + " " * MAX_SPACES).encode())
    assert vocab.choose(done, scores, quote, greedy, None) == tokenizer.eos_token_id


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.from_config(EngineConfig(model_path=str(tiny_model_dir), quantization="fp32", max_model_len=256,
                                           max_num_seqs=8))


def request(engine, i, max_new, **kw) -> Request:
    ids = engine.tokenizer("Describe a cat as JSON:")["input_ids"]
    return Request(request_id=f"json-{i}", prompt_ids=ids, params=SamplingParams(max_new_tokens=max_new, **kw))


def test_a_random_model_s_output_is_held_to_a_json_object_and_its_neighbour_is_unchanged(engine):
    """A random model's likeliest tokens are anything; in JSON mode every output is an object's
    prefix (a whole one where it stopped), greedy and sampled, while a plain request in the same
    batch gets the tokens it gets alone."""
    plain_alone = request(engine, "alone", 24)
    engine.generate([plain_alone])
    constrained = [request(engine, i, 48, json_object=True, **kw)
                   for i, kw in enumerate([{}, {"temperature": 1.0, "seed": 3}, {"temperature": 0.7, "top_p": 0.9}])]
    plain = request(engine, "plain", 24)
    engine.generate(constrained + [plain])
    assert plain.output_ids == plain_alone.output_ids
    unconstrained = request(engine, "free", 48)
    engine.generate([unconstrained])
    assert feed(INITIAL, engine.tokenizer.decode(unconstrained.output_ids).encode()) is None   # the model alone is not JSON
    for r in constrained:
        text = engine.tokenizer.decode(r.output_ids, skip_special_tokens=True)
        assert text == r.text and feed(INITIAL, text.encode()) is not None, text
        assert r.finish_reason == "length" or parses_to_object(text)
    assert len({tuple(r.output_ids) for r in constrained}) == 3


def test_json_mode_does_not_draft(tiny_model_dir, monkeypatch):
    from llmserve.speculative import PromptLookup

    monkeypatch.setattr(PromptLookup, "draft", lambda self, tokens, limit: tokens[-1:] * min(limit, 2))
    spec = Engine.from_config(EngineConfig(model_path=str(tiny_model_dir), quantization="fp32", max_model_len=128,
                                           max_num_seqs=8, spec_tokens=3, spec_max_rows=8))
    constrained, plain = request(spec, 0, 16, json_object=True), request(spec, 1, 16)
    spec.generate([constrained, plain])
    assert plain.num_draft_tokens > 0 and constrained.num_draft_tokens == 0 and constrained.lookup is None
    assert feed(INITIAL, bytes(b for t in constrained.output_ids for b in spec.json_vocab.pieces[t] or b"")) is not None
