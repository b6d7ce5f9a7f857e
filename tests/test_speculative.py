"""Speculative decoding by prompt lookup: the n-gram index (pure Python), and the engine's
verification on a tiny random Llama (fp32) with drafts from an oracle that knows the greedy answer
(a random model copies nothing, so real lookups rarely draft; test_engine_real.py has those)."""

from dataclasses import replace

import pytest
import torch

from llmserve.config import EngineConfig
from llmserve.engine import Engine
from llmserve.request import Request, SamplingParams
from llmserve.speculative import PromptLookup, accepted_length


def test_the_draft_follows_the_latest_earlier_occurrence_of_the_longest_suffix():
    lookup = PromptLookup(max_tokens=3, lookup_min=1, lookup_max=3)
    lookup.num_tokens = 3                                       # (its length adapts: the next test)
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 6, 2, 3]
    assert lookup.draft(tokens, limit=10) == [7, 8, 6]          # (2, 3) last seen before 7, not before 4
    assert lookup.draft(tokens + [4], limit=10) == [5, 9, 2]    # (2, 3, 4) is found before (3, 4) or (4,)
    assert lookup.draft(tokens + [4, 5], limit=2) == [9, 2]     # the limit cuts the draft
    assert lookup.draft(tokens + [4, 5, 11], limit=5) == []     # 11 never seen: no draft
    assert lookup.draft([1, 2, 3], limit=0) == []


def test_a_suffix_is_not_found_at_its_own_place():
    lookup = PromptLookup(max_tokens=4, lookup_min=2, lookup_max=2)
    assert lookup.draft([5, 6], limit=4) == []                  # (5, 6) occurs only as the suffix itself
    assert lookup.draft([5, 6, 5, 6], limit=4) == [5, 6]        # after the first (5, 6) came 5, 6


def test_the_draft_starts_long_shrinks_when_cut_short_and_grows_while_kept():
    lookup = PromptLookup(max_tokens=5, lookup_min=1, lookup_max=1)
    tokens = list(range(10)) + [0]
    assert lookup.draft(tokens, limit=10) == [1, 2, 3, 4, 5]    # starts at max_tokens
    lookup.kept(5, 1)
    lookup.kept(4, 0)
    assert lookup.draft(tokens, limit=10) == [1, 2, 3]          # cut short twice: 1 fewer each time
    lookup.kept(3, 3)
    assert lookup.draft(tokens, limit=10) == [1, 2, 3, 4, 5]    # kept whole: 2 more
    lookup.kept(5, 5)
    assert len(lookup.draft(tokens, limit=10)) == 5             # at most max_tokens
    lookup.kept(5, 1)
    lookup.kept(4, 0)
    for _ in range(5):
        lookup.kept(3, 0)
    assert lookup.draft(tokens, limit=10) == [1]                # never below 1


def test_a_prediction_is_drafted_from_while_the_output_follows_it_and_found_again_after_an_edit():
    lookup = PromptLookup(max_tokens=3, lookup_min=2, lookup_max=3, prediction=[7, 8, 9, 10, 11, 12, 13], prompt_len=3)
    assert lookup.draft([1, 2, 3], limit=10) == [7, 8, 9]               # nothing out yet: its start
    assert lookup.draft([1, 2, 3, 7], limit=10) == [8, 9, 10]
    assert lookup.draft([1, 2, 3, 7, 8, 5], limit=10) == []             # the model wrote 5, not 9: lost
    assert lookup.draft([1, 2, 3, 7, 8, 5, 10, 11], limit=10) == [12, 13]   # (10, 11) found again
    assert lookup.draft([1, 2, 3, 7, 8, 9, 10, 11, 12, 13], limit=10) == []  # all of it out


def test_a_repeated_n_gram_of_the_prediction_is_taken_where_the_last_kept_draft_ended():
    lookup = PromptLookup(max_tokens=2, lookup_min=2, lookup_max=2, prediction=[4, 5, 6, 4, 5, 9, 1])
    assert lookup.draft([0, 4, 5], limit=10) == [6, 4]                  # (4, 5) at its first place
    lookup.kept(2, 2)
    assert lookup.draft([0, 4, 5, 6, 4, 5], limit=10) == [9, 1]         # ... then at its second


def test_accepted_length_counts_leading_agreement():
    assert accepted_length([4, 5, 6], [4, 5, 7, 9]) == 2
    assert accepted_length([4, 5, 6], [1, 5, 6, 9]) == 0
    assert accepted_length([], [3]) == 0


class Oracle:
    """Drafts the greedy answer's next tokens, wrong from `wrong_from` on in each draft."""

    def __init__(self, prompt_len: int, answer: list[int], size: int = 4, wrong_from: int = 99) -> None:
        self.prompt_len, self.answer, self.size, self.wrong_from = prompt_len, answer, size, wrong_from

    def kept(self, num_drafted: int, num_kept: int) -> None:
        pass

    def draft(self, tokens: list[int], limit: int) -> list[int]:
        done = len(tokens) - self.prompt_len
        d = self.answer[done:done + min(limit, self.size)]
        return [t if j < self.wrong_from else (t + 1) % 1000 for j, t in enumerate(d)]


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    config = EngineConfig(model_path=str(tiny_model_dir), quantization="fp32", max_model_len=64, max_num_seqs=4)
    return Engine.from_config(config), Engine.from_config(replace(config, spec_tokens=4, spec_max_rows=16))   # batches verify too


def greedy(engine, prompts, max_new=20, oracles=None, **kw) -> list[Request]:
    rs = [Request(f"q{i}", p, SamplingParams(max_new_tokens=max_new, ignore_eos=True, **kw)) for i, p in enumerate(prompts)]
    for r in rs:
        engine.add_request(r)
        if oracles:
            r.lookup = oracles[r.request_id]
    while engine.has_unfinished():
        engine.step()
        engine.check_invariants()
    return rs


PROMPTS = [[11, 12, 13], [20, 21, 22, 23, 24, 25, 26], [7]]


# hot, yet each kept token's share of the uniforms wide: over the whole vocabulary at this heat one
# draw of ~60 fell on a neighbouring token with half-right drafts (the float path does not promise
# a verify step's logits bitwise a one-token step's; our C++ decoder step does)
SAMPLED = dict(temperature=1.5, top_k=8, seed=5)


@pytest.mark.parametrize("sampling", [{}, SAMPLED, dict(SAMPLED, logprobs=3)], ids=["greedy", "sampled", "logprobs"])
@pytest.mark.parametrize("wrong_from", [99, 2, 0])   # right drafts, half right, all wrong
def test_verified_drafts_give_exactly_the_tokens_of_one_by_one_decoding(engines, wrong_from, sampling):
    """Greedy, and sampled with a seed: a sampled row draws each position's token with the uniform
    it would have drawn one by one, so the drafts change no token; asked for, each token's
    log-probabilities come from the logits of its own position."""
    plain, spec = engines
    plain_rs = greedy(plain, PROMPTS, **sampling)
    expected = [r.output_ids for r in plain_rs]
    if sampling:
        assert expected != [r.output_ids for r in greedy(plain, PROMPTS)]     # it did sample
    oracles = {f"q{i}": Oracle(len(p), e, wrong_from=wrong_from) for i, (p, e) in enumerate(zip(PROMPTS, expected))}
    got = greedy(spec, PROMPTS, oracles=oracles, **sampling)
    assert [r.output_ids for r in got] == expected
    for a, b in zip(got, plain_rs):
        assert len(a.logprobs) == len(b.logprobs) == (20 if "logprobs" in sampling else 0)
        for (lp_a, top_a), (lp_b, top_b) in zip(a.logprobs, b.logprobs):
            assert lp_a == pytest.approx(lp_b, abs=1e-4) and [t for t, _ in top_a] == [t for t, _ in top_b]
    assert all(r.finish_reason == "length" and len(r.output_ids) == 20 for r in got)
    drafted, kept = sum(r.num_draft_tokens for r in got), sum(r.num_accepted_tokens for r in got)
    assert drafted > 0
    if wrong_from == 99:
        assert kept == drafted
    elif wrong_from == 2:
        assert 0 < kept < drafted
    else:
        assert kept == 0


def test_a_prediction_changes_no_token_and_is_kept_where_the_answer_follows_it(engines):
    """Predicted outputs: the answer itself, the answer with three tokens edited, and unrelated text
    (a random model copies nothing: every draft here comes from the prediction)."""
    plain, spec = engines
    expected = [r.output_ids for r in greedy(plain, PROMPTS)]
    edited = [e[:8] + [(t + 1) % 1000 for t in e[8:11]] + e[11:] for e in expected]
    for prediction, kept in ((expected, "all"), (edited, "some"), ([[1, 2, 3, 4]] * 3, "none")):
        rs = [Request(f"q{i}", p, SamplingParams(max_new_tokens=20, ignore_eos=True), prediction_ids=pred)
              for i, (p, pred) in enumerate(zip(PROMPTS, prediction))]
        for r in rs:
            spec.add_request(r)
        while spec.has_unfinished():
            spec.step()
        assert [r.output_ids for r in rs] == expected
        drafted, accepted = sum(r.num_draft_tokens for r in rs), sum(r.num_accepted_tokens for r in rs)
        if kept == "all":
            assert accepted == drafted >= 3 * 15
        elif kept == "some":   # past the edit the answer is found there again
            assert 0 < accepted < drafted and all(r.num_accepted_tokens > 8 for r in rs)
        else:
            assert accepted == 0


def test_a_stop_token_inside_a_kept_draft_ends_the_answer_there(engines, monkeypatch):
    plain, spec = engines
    answer = greedy(plain, PROMPTS[:1])[0].output_ids
    eos = answer[6]
    monkeypatch.setattr(spec, "facts", replace(spec.facts, stop_token_ids=frozenset({eos})))
    r = Request("q0", PROMPTS[0], SamplingParams(max_new_tokens=20))
    spec.add_request(r)
    r.lookup = Oracle(len(PROMPTS[0]), answer, size=4)
    while spec.has_unfinished():
        spec.step()
    assert r.finish_reason == "stop" and r.output_ids == answer[:answer.index(eos) + 1]
    spec.check_invariants()


def test_a_draft_cannot_end_the_answer_before_min_tokens(engines, monkeypatch):
    """A draft proposing EOS (here a token the answer holds at position 6) before min_tokens is cut
    there, as one by one decoding masks EOS at those positions; the tokens are one by one's."""
    plain, spec = engines
    answer = greedy(plain, PROMPTS[:1])[0].output_ids
    eos = answer[6]
    for e in (plain, spec):
        monkeypatch.setattr(e, "facts", replace(e.facts, stop_token_ids=frozenset({eos})))
        monkeypatch.setattr(e, "stop_ids", torch.tensor([eos]))
    def run(engine, lookup=None):
        r = Request("m0", PROMPTS[0], SamplingParams(max_new_tokens=20, min_tokens=7))   # EOS at its last masked place
        engine.add_request(r)
        r.lookup = lookup or r.lookup
        while engine.has_unfinished():
            engine.step()
        engine.check_invariants()
        return r
    expected = run(plain).output_ids
    assert eos not in expected[:7] and expected[:6] == answer[:6]
    got = run(spec, Oracle(len(PROMPTS[0]), answer, size=4))           # drafts EOS at position 6
    assert got.output_ids == expected and got.num_accepted_tokens > 0


def test_a_step_drafts_only_within_spec_max_rows(engines):
    plain, _ = engines
    narrow = Engine.from_config(replace(plain.config, spec_tokens=4, spec_max_rows=3))
    expected = [r.output_ids for r in greedy(plain, PROMPTS[:2])]
    oracles = lambda: {f"q{i}": Oracle(len(p), e) for i, (p, e) in enumerate(zip(PROMPTS, expected))}
    pair = greedy(narrow, PROMPTS[:2], oracles=oracles())          # 2 rows x (1 + 1) > 3: no step drafts
    assert [r.output_ids for r in pair] == expected and all(r.num_draft_tokens == 0 for r in pair)
    one, = greedy(narrow, PROMPTS[:1], oracles=oracles())          # 1 row: drafts of 2, all kept
    assert one.output_ids == expected[0] and one.num_draft_tokens == one.num_accepted_tokens > 0
    assert one.num_draft_tokens <= 2 * (20 // 3 + 1)


def test_the_ceiling_benchmark_replays_drafts_as_the_engine_takes_them_and_cuts_the_oracles_to_what_is_kept():
    """benchmarks.spec_ceiling's replay of an answer that copies its prompt: the archive's policy
    drafts as long as it can from the start and keeps that length while drafts are kept whole (its
    last draft runs past the answer's end); the oracle's is cut to what the answer keeps."""
    from benchmarks.spec_ceiling import replay

    config = EngineConfig(model_path="unused", spec_tokens=3, spec_lookup_min=2, spec_lookup_max=3, spec_max_rows=4)
    prompt = list(range(100, 120))
    answer = prompt[:12]
    assert replay(prompt, answer, config, max_rows=4, oracle=False) == [(1, 0), (4, 3), (4, 3), (4, 2)]
    assert replay(prompt, answer, config, max_rows=4, oracle=True) == [(1, 0), (4, 3), (4, 3), (3, 2)]
    assert replay(prompt, answer, config, max_rows=2, oracle=True) == [(1, 0)] + [(2, 1)] * 5
