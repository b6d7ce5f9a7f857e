"""The real SmolLM2 weights in fp32, in process: greedy output must not depend on who else is in
the batch or when a request joins it. (bf16 matrix products round differently for different
batch shapes, so exact equality is checked in fp32, where the engine adds no difference.)"""

from dataclasses import replace

import pytest

from conftest import MODEL_DIR
from llmserve.config import EngineConfig
from llmserve.engine import Engine
from llmserve.request import parse_request

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about rain.",
             "What is 12 times 12?", "Give me a fun fact about octopuses."]


@pytest.fixture(scope="module")
def engine():
    if not (MODEL_DIR / "config.json").is_file():
        pytest.skip("model not prepared: run make mar")
    return Engine.from_config(EngineConfig(model_path=str(MODEL_DIR), quantization="fp32", max_model_len=512,
                                           max_num_seqs=8))


def chat(engine, rid: str, question: str, max_new_tokens: int = 24):
    body = {"messages": [{"role": "user", "content": question}], "max_new_tokens": max_new_tokens}
    return parse_request(rid, body, engine.config, engine.tokenizer)


def test_joining_a_running_batch_mid_way_gives_the_same_tokens(engine):
    alone = {}
    for q in QUESTIONS:
        r = chat(engine, f"alone-{q}", q)
        engine.generate([r])
        alone[q] = r.output_ids
    assert "Paris" in engine.tokenizer.decode(alone[QUESTIONS[0]])

    running = [chat(engine, f"early-{q}", q) for q in QUESTIONS[1:3]]
    for r in running:
        engine.add_request(r)
    joiners = {3: chat(engine, "late-0", QUESTIONS[0]), 7: chat(engine, "late-3", QUESTIONS[3]),
               12: chat(engine, "late-4", QUESTIONS[4])}
    step = 0
    while engine.has_unfinished() or joiners:
        if step in joiners:
            r = joiners.pop(step)
            engine.add_request(r)
            running.append(r)
        engine.step()
        step += 1
    by_id = {r.request_id: r for r in running}
    assert by_id["late-0"].output_ids == alone[QUESTIONS[0]]
    assert by_id["late-3"].output_ids == alone[QUESTIONS[3]]
    assert by_id["late-4"].output_ids == alone[QUESTIONS[4]]
    assert by_id[f"early-{QUESTIONS[1]}"].output_ids == alone[QUESTIONS[1]]
    assert by_id[f"early-{QUESTIONS[2]}"].output_ids == alone[QUESTIONS[2]]
    assert max(r.max_batch_size for r in running) >= 3


COPYING = ["Repeat this sentence exactly: The quick brown fox jumps over the lazy dog near the river bank.",
           "Fix the typo in this Python code and return the whole code:\ndef add_numbers(a, b):\n"
           "    total = a + b\n    retrun total\n"]


def test_prompt_lookup_and_the_prefix_cache_leave_answers_unchanged(engine):
    """Speculative decoding and the prefix cache on: the same tokens as the plain engine, with drafts
    kept on prompts the answer copies (a seeded sampled one's too), and a second round served from
    the prefix cache."""
    fast = Engine.from_config(replace(engine.config, spec_tokens=4, spec_max_rows=32, prefix_cache_tokens=1024))

    def answers(e, tag):
        rs = [chat(e, f"{tag}-{q}", q, max_new_tokens=40) for q in COPYING + QUESTIONS[:2]]
        rs.append(parse_request(f"{tag}-sampled", {"messages": [{"role": "user", "content": COPYING[0]}],
                                                   "max_new_tokens": 16, "temperature": 0.8, "seed": 5},
                                e.config, e.tokenizer))
        e.generate(rs)
        e.check_invariants()
        return rs

    plain = [r.output_ids for r in answers(engine, "plain")]
    for round_ in range(2):
        got = answers(fast, f"fast{round_}")
        assert [r.output_ids for r in got] == plain
        assert sum(r.num_accepted_tokens for r in got[:2]) >= 10 and got[-1].num_accepted_tokens > 0
        assert all(r.num_cached_tokens >= 16 for r in got) == (round_ == 1)
