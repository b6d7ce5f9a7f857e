"""The weight-only modes: packed int8/int4 linears against float ones, the Q4_1 grid coming back
exactly, the per-call kernel choice by rows, and the engine in w8/w4 on a tiny random Llama."""

import pytest
import torch
import torch.nn.functional as F

from llmserve.config import EngineConfig
from llmserve.engine import Engine
from llmserve.runner import ModelRunner
from llmserve.quantize import PackedLinear, choose_kernels, dequantize_w4, quantize_w4
from llmserve.request import Request, SamplingParams


def linear_with(weight: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    return layer


def q4_1_weight(N: int = 48, K: int = 128, seed: int = 0) -> torch.Tensor:
    """Weights as GGUF's Q4_1 stores them: per block of 32, d * q + m with fp16 d and m; some
    blocks use only part of the 16 levels (their min/max grid is not the source's)."""
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(N, K // 32, 1, generator=g) * 0.02 + 1e-3).half().float()
    m = (torch.randn(N, K // 32, 1, generator=g) * 0.05).half().float()
    hi = torch.randint(1, 16, (N, K // 32, 1), generator=g)                   # top level used in each block
    q = (torch.rand(N, K // 32, 32, generator=g) * (hi + 1)).floor().clamp(max=15)
    q[..., 0], q[..., 1] = 0, hi[..., 0]                                      # each block spans 0..hi
    return (d * q + m).reshape(N, K)


def test_w4_recovers_a_q4_1_grid_exactly():
    w = q4_1_weight()
    assert (dequantize_w4(*quantize_w4(w)) - w).abs().max() < 1e-6
    x = torch.randn(3, w.shape[1])                                         # the kernel: bf16 scales
    expected = F.linear(x, w)
    assert (PackedLinear(linear_with(w), bits=4)(x) - expected).norm() < 0.01 * expected.norm()


@pytest.mark.parametrize("bits,tolerance", [(8, 0.02), (4, 0.15)])
def test_packed_output_is_close_to_float_output(bits, tolerance):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    x = torch.randn(5, 256)
    expected = F.linear(x, w)
    error = (PackedLinear(linear_with(w), bits)(x) - expected).norm() / expected.norm()
    assert 0 < error < tolerance


def test_kernel_is_chosen_by_rows():
    w = torch.randn(32, 64) * 0.1
    layer = PackedLinear(linear_with(w), bits=4)
    choose_kernels([layer], max_packed_rows=2, max_rows=8)
    three, two = torch.randn(3, 64), torch.randn(2, 64)
    assert torch.equal(layer(three), F.linear(three, w))          # more than 2 rows: the float weight
    assert not torch.equal(layer(two), F.linear(two, w))          # 2 rows: the packed one
    best, timings = choose_kernels([layer], max_packed_rows=-1, max_rows=8)
    assert layer.max_packed_rows == best and 1 in timings and set(timings[1]) == {"packed_ms", "dense_ms"}


PROMPTS = ["Hello there", "The quick brown fox jumps over", "1 2 3", "x"]


@pytest.fixture(scope="module", params=["w8", "w4"])
def engine(request, tiny_model_dir):
    # packed_max_rows large: prefill and decode both take the packed kernels, so cached and
    # uncached computations use the same weights
    return Engine.from_config(EngineConfig(model_path=str(tiny_model_dir), quantization=request.param,
                                           max_model_len=128, max_num_seqs=8, packed_max_rows=1 << 20))


def run(engine, prompts: list[str], max_new: int = 10) -> list[list[int]]:
    requests = [Request(f"{i}-{p}", engine.tokenizer(p)["input_ids"], SamplingParams(max_new_tokens=max_new))
                for i, p in enumerate(prompts)]
    engine.generate(requests)
    return [r.output_ids for r in requests]


def test_weight_only_engine_cached_equals_uncached(engine):
    assert engine.facts.packed_max_rows == 1 << 20 and engine.facts.dtype in (torch.float32, torch.bfloat16)
    for p in PROMPTS:
        out = run(engine, [p])[0]
        ids = engine.tokenizer(p)["input_ids"] + out[:-1]
        r = Request("uncached", ids, SamplingParams(max_new_tokens=1))   # the last step, recomputed whole
        engine.generate([r])
        assert r.output_ids == out[-1:]


def test_weight_only_engine_batched_equals_alone(engine):
    alone = [run(engine, [p])[0] for p in PROMPTS]
    assert run(engine, PROMPTS) == alone


def test_compiled_decode_matches_eager_and_builds_no_graph_after_start_up(tiny_model_dir):
    def make(compile: bool) -> Engine:
        return Engine.from_config(EngineConfig(model_path=str(tiny_model_dir), quantization="w4", max_model_len=128,
                                               max_num_seqs=8, packed_max_rows=8, compile=compile))
    eager, compiled = make(False), make(True)
    assert compiled.facts.compiled_graphs >= 2 and eager.facts.compiled_graphs == 0   # batch 1 and 2..8, at start-up
    graphs = ModelRunner.compiled_graphs()                 # built in this process so far
    assert len(eager.tokenizer(PROMPTS[3])["input_ids"]) == 1        # alone, its first decode has a context of 1
    for prompts in (PROMPTS, PROMPTS[:1], PROMPTS[1:4], PROMPTS * 2, PROMPTS[3:], PROMPTS[3:] * 2):
        # batch sizes 4, 1, 3, 8, 1, 2; contexts grow
        assert run(compiled, prompts, 24) == run(eager, prompts, 24)
    assert ModelRunner.compiled_graphs() == graphs         # no recompilation while serving
