"""The prefix cache on a tiny random Llama (fp32, CPU): a prompt served partly from stored blocks
gets the tokens it gets without the store; the store's bookkeeping (blocks, hashes, eviction)."""

import pytest
import torch

from llmserve.config import EngineConfig
from llmserve.engine import Engine
from llmserve.prefix_cache import BLOCK, PrefixCache
from llmserve.request import Request, SamplingParams

SHARED = list(range(1000, 1000 + 3 * BLOCK + 5))    # 3 full blocks and 5 more tokens
TAILS = [[7, 8, 9], [6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [42], list(range(50, 90))]


def engine_of(tiny_model_dir, prefix_cache_tokens: int) -> Engine:
    return Engine.from_config(EngineConfig(model_path=str(tiny_model_dir), quantization="fp32", max_model_len=128,
                                           max_num_seqs=8, prefix_cache_tokens=prefix_cache_tokens))


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    return engine_of(tiny_model_dir, 0)


def run(engine: Engine, prompts: list[list[int]], max_new: int = 10) -> list[Request]:
    requests = [Request(f"r{i}-{len(p)}-{p[-1]}", p, SamplingParams(max_new_tokens=max_new, ignore_eos=True))
                for i, p in enumerate(prompts)]
    engine.generate(requests)
    engine.check_invariants()
    return requests


def test_a_hit_gives_the_tokens_a_miss_gives(plain, tiny_model_dir):
    cached = engine_of(tiny_model_dir, 1024)
    prompts = [SHARED + t for t in TAILS]
    expected = [r.output_ids for r in run(plain, prompts)]
    first = run(cached, prompts[:1])                                      # fills the store
    assert first[0].output_ids == expected[0] and first[0].num_cached_tokens == 0
    later = run(cached, prompts[1:])                                      # one group, tails of 1 to 40 tokens
    assert [r.output_ids for r in later] == expected[1:]
    assert [r.num_cached_tokens for r in later] == [3 * BLOCK] * 3
    again = run(cached, prompts)                                          # whole prompts stored now
    assert [r.output_ids for r in again] == expected
    assert [r.num_cached_tokens for r in again] == [(len(p) - 1) // BLOCK * BLOCK for p in prompts]


def test_a_prompt_that_differs_after_a_block_is_not_served_its_keys(plain, tiny_model_dir):
    cached = engine_of(tiny_model_dir, 1024)
    run(cached, [SHARED + TAILS[3]])
    changed = SHARED[:BLOCK + 3] + [5] + SHARED[BLOCK + 4:] + TAILS[3]   # one token differs in block 2
    r, = run(cached, [changed])
    assert r.num_cached_tokens == BLOCK
    assert r.output_ids == run(plain, [changed])[0].output_ids
    last = SHARED[:2 * BLOCK - 1] + [5] + SHARED[2 * BLOCK:] + TAILS[3]  # block 2's last token differs
    r, = run(cached, [last])
    assert r.num_cached_tokens == BLOCK


def store(max_tokens: int) -> PrefixCache:
    from llmserve.kv_cache import KVCache
    cache = KVCache(2, 2, 1, 8 * BLOCK, 4, torch.float32, torch.device("cpu"))
    return PrefixCache(cache, max_tokens)


def fill(pc: PrefixCache, tokens: list[int], value: float) -> None:
    """Prefill stand-in: the row's keys hold value + the position, then the blocks are saved."""
    n = len(tokens)
    pc.cache.k[:, 0, :, :n] = value + torch.arange(n, dtype=torch.float32)[:, None]
    pc.cache.v[:, 0, :, :n] = -value
    pc.save(tokens, row=0, start=0)


def test_blocks_come_back_where_they_were_taken_from_into_any_row_and_offset():
    pc = store(8 * BLOCK)
    a = list(range(3 * BLOCK))
    fill(pc, a, 100.0)
    keys = pc.match(a + [1])
    assert len(keys) == 3 and len(pc.match(a)) == 2                   # one token is always left to compute
    pc.load(keys, row=1, start=5)
    expected = (100.0 + torch.arange(3 * BLOCK, dtype=torch.float32)[:, None]).expand(-1, 4)
    assert torch.equal(pc.cache.k[1, 1, 0, 5:5 + 3 * BLOCK], expected) and (pc.cache.v[:, 1, :, 5:5 + 3 * BLOCK] == -100).all()
    assert not pc.cache.k[:, 1, :, :5].any()


def test_the_least_recently_used_block_goes_first_and_a_shared_root_last():
    pc = store(3 * BLOCK)                                                 # room for 3 blocks
    root, tail_a, tail_b, other = ([i] * BLOCK for i in (1, 2, 3, 4))
    fill(pc, root + tail_a + [0], 1.0)                                    # root, a
    fill(pc, root + tail_b + [0], 2.0)                                    # root, b: the store is full
    fill(pc, other + [0], 3.0)                                            # evicts a (root was refreshed by b)
    assert len(pc.match(root + tail_b + [0])) == 2 and len(pc.match(root + tail_a + [0])) == 1
    assert len(pc.match(other + [0])) == 1
    fill(pc, [5] * BLOCK + [0], 4.0)                                      # evicts b, the tail, not its root
    assert len(pc.match(root + tail_b + [0])) == 1 and len(pc.match(other + [0])) == 1
    fill(pc, [9] * 3 * BLOCK, 6.0)                                        # three new blocks evict all
    assert pc.match(root + [0]) == [] and len(pc.match([9] * 3 * BLOCK + [0])) == 3


def test_a_hash_collision_is_a_miss_not_another_prompts_keys():
    pc = store(4 * BLOCK)
    fill(pc, [1] * BLOCK, 1.0)
    key, = pc.match([1] * BLOCK + [0])
    slot, _, parent = pc.blocks[key]
    pc.blocks[key] = (slot, tuple([2] * BLOCK), parent)                   # another block under the same hash
    assert pc.match([1] * BLOCK + [0]) == []
    fill(pc, [1] * BLOCK, 5.0)                                            # and saving does not overwrite it
    assert pc.blocks[key][1] == tuple([2] * BLOCK)


def test_identical_prompts_arriving_together_prefill_the_prompt_once(plain, tiny_model_dir):
    """Three requests of one 60-token prompt at once (OpenAI's n choices, a burst): the first is
    prefilled alone, the other two a step later from its blocks in the prefix cache, and all answer
    as without the cache."""
    prompt = list(range(100, 160))
    expected = run(plain, [prompt])[0].output_ids
    same = run(engine_of(tiny_model_dir, 1024), [list(prompt) for _ in range(3)])
    assert [r.num_cached_tokens for r in same] == [0, 56, 56]
    assert all(r.output_ids == expected for r in same)
