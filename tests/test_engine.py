"""The engine on a tiny random Llama (fp32, CPU): batching, the KV cache, joining mid-way and
preemption must not change a greedy request's tokens."""

from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch

from llmserve.config import EngineConfig
from llmserve.engine import Engine
from llmserve.kv_cache import KVCache
from llmserve.prefix_cache import BLOCK, PrefixCache
from llmserve.request import TIERS, Request, SamplingParams

PROMPTS = ["Hello there", "The quick brown fox jumps over", "1 2 3", "A much longer prompt about many things, "
           "with commas, words and more words to pad it out", "x"]


@pytest.fixture(scope="module", params=[0, 512], ids=["no-prefix-cache", "prefix-cache"])
def engine(tiny_model_dir, request):
    """Every test runs without and with the prefix cache: a repeated prompt then hits it."""
    return Engine.from_config(EngineConfig(model_path=str(tiny_model_dir), quantization="fp32", max_model_len=128,
                                           max_num_seqs=8, prefix_cache_tokens=request.param))


def make(engine, i, prompt, max_new=12, **kw) -> Request:
    ids = engine.tokenizer(prompt)["input_ids"]
    return Request(request_id=f"{i}-{prompt[:5]}-{kw}", prompt_ids=ids, params=SamplingParams(max_new_tokens=max_new, **kw))


def alone(engine, prompt, max_new=12, **kw) -> list[int]:
    r = make(engine, "alone", prompt, max_new, **kw)
    engine.generate([r])
    return r.output_ids


def reference_no_cache(engine, prompt, max_new=12, presence=0.0, frequency=0.0, repetition=1.0,
                       bias: dict | None = None) -> list[int]:
    """Hugging Face's own forward over the whole sequence at every step, no KV cache; greedy, with
    a logit bias and vLLM's penalties applied by hand where asked, in vLLM's order: the bias, then
    repetition_penalty on the prompt's and output's tokens, then presence and frequency x count on
    the output's."""
    model = engine.runner.model
    ids = engine.tokenizer(prompt)["input_ids"]
    out = []
    with torch.inference_mode():
        for _ in range(max_new):
            logits = model(torch.tensor([ids + out]), use_cache=False).logits[0, -1]
            for t, b in (bias or {}).items():
                logits[t] += b
            if (presence, frequency, repetition) != (0.0, 0.0, 1.0):
                for t in set(ids + out):
                    logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
                for t in set(out):
                    logits[t] -= frequency * out.count(t) + presence
            out.append(int(logits.argmax()))
            if out[-1] in engine.facts.stop_token_ids:
                break
    return out


PENALTIES = [dict(presence=1.5), dict(presence=-1.0), dict(frequency=0.5), dict(repetition=1.5),
             dict(presence=0.5, frequency=0.25, repetition=2.0)]


def test_penalties_change_the_tokens_as_vllm_applies_them_alone_and_batched(engine):
    """presence_penalty, frequency_penalty and repetition_penalty give the tokens a by-hand
    application to Hugging Face's logits gives, alone and in a batch beside unpenalized requests
    (whose tokens they leave alone); they do change the tokens."""
    changed = False
    for kw in PENALTIES:
        params = {f"{k}_penalty": v for k, v in kw.items()}
        for p in PROMPTS[1:3]:
            expected = reference_no_cache(engine, p, 16, **kw)
            assert alone(engine, p, 16, **params) == expected, (kw, p)
            changed |= expected != reference_no_cache(engine, p, 16)
        batch = [make(engine, i, p, 16, **(params if i % 2 else {})) for i, p in enumerate(PROMPTS)]
        engine.generate(batch)
        for i, (r, p) in enumerate(zip(batch, PROMPTS)):
            assert r.output_ids == (reference_no_cache(engine, p, 16, **kw) if i % 2 else alone(engine, p, 16))
    assert changed


def test_a_logit_bias_bans_and_favours_tokens_before_the_penalties(engine):
    """logit_bias adds to each listed token's logit before the penalties: -100 bans the token the
    unbiased answer starts with, and a bias beside a penalty gives the by-hand tokens."""
    for p in PROMPTS[1:3]:
        first = reference_no_cache(engine, p, 12)[0]
        bias = {first: -100.0, 7: 3.5}
        banned = alone(engine, p, 12, logit_bias=tuple(sorted(bias.items())))
        assert banned == reference_no_cache(engine, p, 12, bias=bias) and first not in banned
        both = alone(engine, p, 12, logit_bias=tuple(sorted(bias.items())), repetition_penalty=2.0)
        assert both == reference_no_cache(engine, p, 12, repetition=2.0, bias=bias)


def test_a_penalized_request_does_not_draft_and_keeps_its_tokens(tiny_model_dir, monkeypatch):
    """In verify steps beside a request that drafts (every step, here: its last token twice), a
    penalized one drafts nothing: its tokens are the penalized ones, one a step."""
    from llmserve.speculative import PromptLookup

    monkeypatch.setattr(PromptLookup, "draft", lambda self, tokens, limit: tokens[-1:] * min(limit, 2))
    spec = Engine.from_config(EngineConfig(model_path=str(tiny_model_dir), quantization="fp32", max_model_len=128,
                                           max_num_seqs=8, spec_tokens=3, spec_max_rows=8))
    prompt = "x"
    penalized = make(spec, 0, prompt, 16, presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    plain = make(spec, 1, prompt, 16)
    spec.generate([penalized, plain])
    assert plain.num_draft_tokens > 0 and penalized.num_draft_tokens == 0
    assert penalized.output_ids == reference_no_cache(spec, prompt, 16, presence=0.5, frequency=0.25, repetition=2.0)
    assert plain.output_ids == reference_no_cache(spec, prompt, 16) != penalized.output_ids


def test_cached_equals_uncached(engine):
    for p in PROMPTS:
        assert alone(engine, p) == reference_no_cache(engine, p)


def test_batched_equals_one_at_a_time(engine):
    expected = [alone(engine, p) for p in PROMPTS]
    batch = [make(engine, i, p) for i, p in enumerate(PROMPTS)]
    engine.generate(batch)
    assert [r.output_ids for r in batch] == expected
    assert all(r.max_batch_size == len(PROMPTS) for r in batch)


def test_early_finisher_gets_exactly_its_tokens(engine):
    short = make(engine, 0, PROMPTS[0], max_new=3)
    long = make(engine, 1, PROMPTS[1], max_new=12)
    engine.generate([short, long])
    assert short.output_ids == alone(engine, PROMPTS[0], max_new=3) and len(short.output_ids) == 3
    assert short.finish_reason == "length"
    assert long.output_ids == alone(engine, PROMPTS[1])
    assert short.result()["usage"] == {"prompt_tokens": len(short.prompt_ids), "completion_tokens": 3,
                                       "cached_prompt_tokens": 0, "draft_tokens": 0, "accepted_draft_tokens": 0}


def test_joining_mid_way_does_not_change_output(engine):
    expected = {p: alone(engine, p, max_new=20) for p in PROMPTS}
    first = make(engine, 0, PROMPTS[1], max_new=20)
    engine.add_request(first)
    late = []
    for step in range(40):
        if step in (2, 5, 9):   # requests enter while others run and leave
            r = make(engine, step, PROMPTS[step % len(PROMPTS)], max_new=20)
            engine.add_request(r)
            late.append(r)
        if not engine.has_unfinished():
            break
        engine.step()
    for r in [first] + late:
        assert r.is_finished
        prompt = engine.tokenizer.decode(r.prompt_ids)
        assert r.output_ids == expected[prompt], prompt


def test_preemption_recomputes_to_the_same_output(tiny_model_dir):
    small = Engine.from_config(EngineConfig(model_path=str(tiny_model_dir), quantization="fp32", max_model_len=64,
                                            max_num_seqs=4, kv_budget_tokens=64))
    expected = [alone(small, p, max_new=20) for p in PROMPTS[:3]]
    batch = [make(small, i, p, max_new=20) for i, p in enumerate(PROMPTS[:3])]
    small.generate(batch)
    assert [r.output_ids for r in batch] == expected
    assert sum(r.num_preemptions for r in batch) > 0


def test_premium_newcomers_displace_and_jump_without_changing_anyone_s_tokens(tiny_model_dir):
    """Tiers on the real engine: premium requests arriving mid-way take the rows of running batch
    ones (recomputed later) at once; every greedy output is still its alone output."""
    small = Engine.from_config(EngineConfig(model_path=str(tiny_model_dir), quantization="fp32", max_model_len=64,
                                            max_num_seqs=2))
    expected = {p: alone(small, p, max_new=16) for p in PROMPTS[:4]}
    batch = [make(small, i, p, max_new=16) for i, p in enumerate(PROMPTS[:2])]
    premium = [make(small, i, p, max_new=16) for i, p in enumerate(PROMPTS[2:4])]
    for r in batch:
        r.tier = TIERS.index("batch")
        small.add_request(r)
    for _ in range(3):
        small.step()
    decoded = [len(r.output_ids) for r in batch]
    for r in premium:
        r.tier = TIERS.index("premium")
        small.add_request(r)
    small.step()
    assert [len(r.output_ids) for r in batch] == decoded and all(len(r.output_ids) == 1 for r in premium)
    while small.has_unfinished():
        small.step()
        small.check_invariants()
    assert all(r.num_preemptions == 1 for r in batch) and not any(r.num_preemptions for r in premium)
    assert all(r.output_ids == expected[small.tokenizer.decode(r.prompt_ids)] for r in batch + premium)


@pytest.mark.parametrize("prefault", [False, True])
def test_the_kv_cache_is_resident_from_start_up_only_when_prefaulted(prefault):
    """kv_prefault maps every page of the cache when it is made (zeros, writable), in 2 MiB pages
    where the kernel gives them to those who ask (transparent huge pages: always or madvise);
    without it the pages stay unmapped until rows use them."""
    def huge() -> int:
        return sum(int(line.split()[1]) * 1024 for line in Path("/proc/self/smaps_rollup").read_text().splitlines()
                   if line.startswith("AnonHugePages:"))
    rss, huge_before = psutil.Process().memory_info().rss, huge()
    cache = KVCache(4, 8, 2, 4096, 64, torch.float32, torch.device("cpu"), prefault=prefault)   # 2 x 64 MiB
    grown = psutil.Process().memory_info().rss - rss
    assert grown > 120 * 2**20 if prefault else grown < 20 * 2**20
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if prefault and thp.exists() and "[never]" not in thp.read_text():
        assert huge() - huge_before > 64 * 2**20     # most of it (a fragmented memory may refuse a few)
    assert not cache.k.any() and not cache.v.any()
    cache.k[1, 2, 1, 7] = 1.0
    assert cache.k.sum() == 64


def test_a_prefaulted_engine_gives_the_same_tokens(engine, tiny_model_dir):
    prefaulted = Engine.from_config(replace(engine.config, kv_prefault=True))
    assert [alone(prefaulted, p) for p in PROMPTS[:2]] == [alone(engine, p) for p in PROMPTS[:2]]


def test_stop_string_cuts_text(engine):
    full = make(engine, 0, PROMPTS[1], max_new=12)
    engine.generate([full])
    text = engine.tokenizer.decode(full.output_ids, skip_special_tokens=True)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip()
    r = make(engine, 1, PROMPTS[1], max_new=12, stop=(stop,))
    engine.generate([r])
    assert r.finish_reason == "stop" and r.text == text[:text.find(stop)]
    assert len(r.output_ids) < 12


def test_seeded_sampling_is_independent_of_batch(engine):
    kw = dict(temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    solo = alone(engine, PROMPTS[2], **kw)
    batch = [make(engine, 0, PROMPTS[0]), make(engine, 1, PROMPTS[2], **kw),
             make(engine, 2, PROMPTS[3], temperature=1.0)]
    engine.generate(batch)
    assert batch[1].output_ids == solo
    assert alone(engine, PROMPTS[2], **{**kw, "seed": 99}) != solo


def test_abort_frees_the_row(engine):
    a, b = make(engine, 0, PROMPTS[0], max_new=30), make(engine, 1, PROMPTS[1], max_new=5)
    engine.add_request(a)
    engine.add_request(b)
    engine.step()
    assert len(engine.rows) == 2
    engine.abort(a.request_id)
    assert a.finish_reason == "abort" and len(engine.rows) == 1 and b.row == 0
    while engine.has_unfinished():
        engine.step()
    assert b.output_ids == alone(engine, PROMPTS[1], max_new=5)


def test_detokenization_is_incremental_and_holds_back_half_characters(engine):
    ids = engine.tokenizer("Smile 🙂, wave 👋 and café")["input_ids"]
    assert len(ids) > len("Smile , wave  and café".split()) + 2     # the emoji span several tokens
    r = Request("detok", [1], SamplingParams(max_new_tokens=64))
    texts = []
    for token in ids:
        r.output_ids.append(token)
        engine._detokenize(r)
        texts.append(r.text)
        assert "\ufffd" not in r.text                               # half a character is held back
        assert len(r.output_ids) - r.prefix_offset <= 8             # a short window, not the whole output
    assert any(a == b for a, b in zip(texts, texts[1:]))            # something was held back a step
    engine._detokenize(r, final=True)
    assert r.text == engine.tokenizer.decode(ids, skip_special_tokens=True)


def test_ignore_eos_and_min_tokens(engine, monkeypatch):
    free = alone(engine, PROMPTS[1], max_new=20)
    eos = free[5]                                    # the tiny model never ends: call its 6th token EOS
    monkeypatch.setattr(engine, "facts", replace(engine.facts, stop_token_ids=frozenset({eos})))
    monkeypatch.setattr(engine, "stop_ids", torch.tensor([eos]))
    natural = alone(engine, PROMPTS[1], max_new=20)
    assert natural == free[:free.index(eos) + 1]
    forced = make(engine, 1, PROMPTS[1], max_new=20, ignore_eos=True)
    engine.generate([forced])
    assert forced.output_ids == free and forced.finish_reason == "length"
    at_least = make(engine, 2, PROMPTS[1], max_new=20, min_tokens=12)
    engine.generate([at_least])
    assert len(at_least.output_ids) >= 12 and eos not in at_least.output_ids[:11]   # EOS masked until then


def test_stop_token_ids_end_the_request_after_min_tokens_even_ignoring_eos(engine):
    """A request's stop_token_ids end it at the first one produced, kept in its output (vLLM's
    meaning), with or without ignore_eos; min_tokens masks them as it masks EOS."""
    free = alone(engine, PROMPTS[1], max_new=20)
    stop = free[4]
    first = free.index(stop)
    for kw in ({}, {"ignore_eos": True}):
        r = make(engine, 0, PROMPTS[1], 20, stop_token_ids=(stop,), **kw)
        engine.generate([r])
        assert r.output_ids == free[:first + 1] and r.finish_reason == "stop"
    late = make(engine, 1, PROMPTS[1], 20, stop_token_ids=(stop,), min_tokens=first + 2)
    engine.generate([late])
    assert stop not in late.output_ids[:first + 1] and len(late.output_ids) >= first + 2


def test_the_engines_forward_scores_a_window_like_hugging_faces(engine):
    from benchmarks.measure import engine_loss, perplexity

    ids = engine.tokenizer("The quick brown fox jumps over the lazy dog. " * 6)["input_ids"]
    ours = perplexity(engine_loss(engine), ids, 32, 16, torch.device("cpu"))
    theirs = perplexity(engine.runner.model, ids, 32, 16, torch.device("cpu"))
    assert ours == pytest.approx(theirs, rel=1e-4)


def test_engine_time_is_shared_by_tokens_computed(engine, monkeypatch):
    """Chargeback: every step's time goes to its requests, a prefill's by its prompt length."""
    clock = iter(range(10**6))                           # every reading of the clock is 1 s later
    monkeypatch.setattr("llmserve.engine.time.perf_counter", lambda: float(next(clock)))
    short, long = make(engine, "share", "x", max_new=1, ignore_eos=True), make(engine, "share", PROMPTS[3], max_new=1, ignore_eos=True)
    steps = []
    engine.generate([short, long], on_step=lambda: steps.append(1))
    assert len(steps) == 1 and short.engine_s + long.engine_s > 0
    computed = [len(r.prompt_ids) - r.num_cached_tokens for r in (long, short)]
    assert long.engine_s / short.engine_s == pytest.approx(computed[0] / computed[1]) and computed[0] > computed[1]


def test_a_preempted_sequence_s_keys_and_values_are_kept_for_its_recompute(tiny_model_dir):
    """A premium newcomer displaces a running batch request: the prefix cache takes the victim's
    prompt and output, so resuming it computes at most its last partial block, and its tokens are
    still its alone output."""
    small = Engine.from_config(EngineConfig(model_path=str(tiny_model_dir), quantization="fp32", max_model_len=96,
                                            max_num_seqs=1, prefix_cache_tokens=512))
    expected = alone(small, PROMPTS[3], max_new=40)
    victim = make(small, "victim", PROMPTS[3], max_new=40)
    victim.tier = TIERS.index("batch")
    small.add_request(victim)
    for _ in range(30):
        small.step()
    premium = make(small, "premium", PROMPTS[0], max_new=4)
    premium.tier = TIERS.index("premium")
    small.add_request(premium)
    small.step()
    assert victim.num_preemptions == 1 and victim.num_tokens > len(victim.prompt_ids) + BLOCK
    assert small._uncached(victim) <= BLOCK
    while small.has_unfinished():
        small.step()
    assert victim.output_ids == expected


def test_a_long_prompt_beside_a_decoding_one_is_prefilled_in_chunks_to_the_same_tokens(tiny_model_dir):
    """Chunked prefill on the real engine: with a request decoding, a long standard prompt waits while
    its chunks go to the prefix cache a step at a time, the running one decoding a token each step;
    both answer their alone tokens."""
    small = Engine.from_config(EngineConfig(model_path=str(tiny_model_dir), quantization="fp32", max_model_len=128,
                                            max_num_seqs=4, prefix_cache_tokens=512, prefill_chunk_tokens=BLOCK))
    long_prompt = " ".join([PROMPTS[3]] * 4)                   # ~80 tokens: over 8 chunks of BLOCK, so chunks of 2
    expected = [alone(small, PROMPTS[1], max_new=30), alone(small, long_prompt, max_new=8)]
    small.prefix = PrefixCache(small.cache, 512)   # nothing of the alone runs cached
    running, long = make(small, "running", PROMPTS[1], max_new=30), make(small, "long", long_prompt, max_new=8)
    small.add_request(running)
    small.step()
    small.add_request(long)
    chunked = []
    while long.status == "waiting" and len(chunked) < 20:
        before = len(running.output_ids)
        small.step()
        small.check_invariants()
        chunked.append(long.num_chunked_tokens)
        assert len(running.output_ids) == before + 1
    size = small.scheduler.chunk_tokens(long)
    assert size == 2 * BLOCK
    assert chunked[:-1] == [size * (i + 1) for i in range(len(chunked) - 1)] and len(chunked) >= 3
    assert 0 < len(long.prompt_ids) - chunked[-1] <= size and long.num_cached_tokens == 0
    assert long.status == "running" and not running.is_finished   # admitted beside it, its rest a chunk at most
    while small.has_unfinished():
        small.step()
    assert [running.output_ids, long.output_ids] == expected
