"""The weight-only modes: packed int8/int4 linears against float ones (our AVX2 kernels and
torch's), the Q4_1 grid coming back exactly, the per-call kernel choice by rows, and the engine in
w8/w4 on a tiny random Llama."""

import os
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import MODEL_DIR

from llmserve.config import EngineConfig
from llmserve.engine import Engine
from llmserve import runner as runner_module
from llmserve.runner import ModelRunner
from llmserve import quantize
from llmserve.quantize import ALWAYS_PACKED, PackedLinear, choose_kernels, dequantize_w4, lowbit_kernels, quantize_w4
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


def test_w4_recovers_a_q4_1_grid_exactly(kernels):
    w = q4_1_weight()
    assert (dequantize_w4(*quantize_w4(w)) - w).abs().max() < 1e-6
    # off by torch's bf16 scales, or our kernel's int8 activations (up to 1.3 % over 2,000 seeds of x:
    # unseeded, 1 % failed now and then)
    x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0))
    expected = F.linear(x, w)
    assert (PackedLinear(linear_with(w), bits=4)(x) - expected).norm() < 0.02 * expected.norm()


def test_w4_quantizes_in_row_blocks_to_the_same_bits(monkeypatch):
    """quantize_w4 takes W4_QUANTIZE_ROWS rows at a time (the grid search stays in cache): the same
    q and scales as all rows at once, over whole blocks and a part, source grids and none."""
    w = torch.cat([q4_1_weight(N=300, K=128), torch.randn(300, 128, generator=torch.Generator().manual_seed(1))])
    assert w.shape[0] > 2 * quantize.W4_QUANTIZE_ROWS
    blocked = quantize_w4(w)
    monkeypatch.setattr(quantize, "W4_QUANTIZE_ROWS", 1 << 30)
    whole = quantize_w4(w)
    assert torch.equal(blocked[0], whole[0]) and torch.equal(blocked[1], whole[1])


def test_w4_recovers_the_default_models_weights_exactly():
    """The default model's fp32 weights are dequantized from a Q4_1 GGUF: w4 finds every block's grid."""
    if not (MODEL_DIR / "model.safetensors").is_file():
        pytest.skip("model not prepared: run make mar")
    weights = load_file(MODEL_DIR / "model.safetensors")
    layer = [w for name, w in weights.items() if name.startswith("model.layers.0.") and name.endswith("proj.weight")]
    assert len(layer) == 7
    for w in layer:
        assert (dequantize_w4(*quantize_w4(w.float())) - w.float()).abs().max() == 0


@pytest.fixture(params=["own", "torch"])
def kernels(request, monkeypatch):
    """Each packed layer made with our AVX2 kernels, then with torch's (the fallback)."""
    if request.param == "torch":
        monkeypatch.setattr(quantize, "lowbit_kernels", lambda: False)
    elif "avx2" in Path("/proc/cpuinfo").read_text():
        assert lowbit_kernels(), "the AVX2 kernels failed to build on an AVX2 CPU (see the warning logged)"
    else:
        pytest.skip("no AVX2 on this CPU")
    return request.param


def test_a_build_lock_left_by_a_killed_build_is_removed_a_fresh_one_kept(tmp_path):
    """torch's extension loader waits forever on a lock a killed build left (a worker stopped during
    its first start hung every later start until TorchServe's startup timeout): an old lock goes,
    a fresh one (another worker building now) stays."""
    lock = tmp_path / "lock"
    lock.touch()
    assert not quantize.clear_stale_lock(tmp_path) and lock.exists()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    assert quantize.clear_stale_lock(tmp_path) and not lock.exists()
    assert not quantize.clear_stale_lock(tmp_path)                          # none: nothing to do


def test_the_kernel_is_built_from_one_place_wherever_the_archive_was_unpacked(tmp_path, monkeypatch):
    """TorchServe unpacks the archive into a new directory at every start, and ninja rebuilds when a
    source's path changes (every worker start paid a ~30 s compile): the build reads a copy kept in
    the extension's directory, rewritten only when the source changed."""
    build = tmp_path / "extensions" / "llmserve_x"
    built = quantize.stable_source(build)
    first = os.stat(built).st_mtime_ns
    unpacked = tmp_path / "models" / "c290b17f"
    unpacked.mkdir(parents=True)
    (unpacked / "lowbit_avx2.cpp").write_bytes(Path(quantize.__file__).with_name("lowbit_avx2.cpp").read_bytes())
    monkeypatch.setattr(quantize, "__file__", str(unpacked / "quantize.py"))
    assert quantize.stable_source(build) == built and os.stat(built).st_mtime_ns == first
    (unpacked / "lowbit_avx2.cpp").write_text("// changed\n")
    assert quantize.stable_source(build) == built and Path(built).read_text() == "// changed\n"


@pytest.mark.parametrize("bits,tolerance", [(8, 0.02), (4, 0.15)])
def test_packed_output_is_close_to_float_output(bits, tolerance, kernels):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    x = torch.randn(5, 256)
    expected = F.linear(x, w)
    layer = PackedLinear(linear_with(w), bits)
    assert bool(layer.own_kernel) == (kernels == "own")
    error = (layer(x) - expected).norm() / expected.norm()
    assert 0 < error < tolerance


@pytest.mark.parametrize("N", [40, 44, 48])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 8, 9, 17, 70])
def test_own_kernel_matches_its_weights_at_every_row_tile(rows, N):
    """Against the layer's weights, which sit on a 4-bit grid (so only the rounding of the activations
    differs): every output column, every row of a tile (4 rows; 8 in the AVX-512 16-column layout, which
    the CPU with AVX-512 VNNI takes where N is a multiple of 16, the AVX2 build's 8-column one where
    it is of 8 (two groups of 8 columns at once in tiles of 3 rows, their weights unpacked once from
    12 rows, a thread's odd last group alone in tiles of 4: N = 40 is 5 groups), the rows layout
    otherwise (44); on AMX from 16 rows, tiles of 16 rows four at a time: 70 rows are 4 tiles, then
    one of 6) and the rows past the last full tile; 7 blocks: a group of 4 and 3 alone."""
    w = q4_1_weight(N=N, K=224, seed=rows)                # on a 4-bit grid: q4_mm's weights are exact
    layer = PackedLinear(linear_with(w), bits=4)
    if not layer.own_kernel:
        pytest.skip("our kernel did not load (no AVX2 here?); test_packed_output_is_close_to_float_output checks")
    assert layer.packed.dim() == (3 if quantize.q4_columns(layer.own_kernel, N) else 2)
    x = torch.randn(rows, 224, generator=torch.Generator().manual_seed(2))
    x[0, :32] *= 50                                       # one block far larger: scales are per block
    error = (layer(x) - F.linear(x, w)).abs().amax(dim=1) / F.linear(x, w).abs().amax(dim=1)
    assert error.max() < 0.02, error


@pytest.fixture
def amx_rows():
    """Sets the rows from which our kernels take AMX tiles (llmserve::amx_min_rows) for one test."""
    if not lowbit_kernels():
        pytest.skip("our kernels did not load (no AVX2 here?); test_packed_output_is_close_to_float_output checks")
    before = torch.ops.llmserve.amx_min_rows(-1)
    yield lambda rows: torch.ops.llmserve.amx_min_rows(rows)
    torch.ops.llmserve.amx_min_rows(before)


@pytest.mark.parametrize("N", [40, 48])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 9, 17])
def test_own_8bit_kernel_multiplies_float_activations_exactly(rows, N, amx_rows):
    """Our 8-bit kernel (w8, w4's LM head) rounds nothing but the weights, without AMX tiles: it gives
    the product with its dequantized weights to float rounding, in every row of a tile (6 rows; 8 in
    the AVX-512 pairs layout, where N is a multiple of 16) and past the last one (8, 9, 17 rows)."""
    amx_rows(ALWAYS_PACKED)
    w = torch.randn(N, 96, generator=torch.Generator().manual_seed(rows)) * 0.05
    layer = PackedLinear(linear_with(w), bits=8)
    assert layer.packed.dim() == (3 if layer.own_kernel in ("amx", "avx512") and N % 16 == 0 else 2)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(2))
    x[0, :32] *= 50
    q, scales = quantize.quantize_w8(w)
    expected = F.linear(x, q.float() * scales[:, None])
    assert (layer(x) - expected).abs().max() < 1e-5 * expected.abs().max()
    # several tokens per row (a verify step's LM head) stay on it: no float-weight rule for 8 bits
    choose_kernels([layer], max_packed_rows=32, max_rows=32)
    assert torch.equal(layer(x[None]), layer(x)[None])


@pytest.mark.parametrize("rows", [16, 17, 64, 70])
def test_own_8bit_kernel_on_amx_tiles_rounds_only_the_activations_to_bf16(rows, amx_rows):
    """On AMX, from amx_min_rows rows, the 8-bit weights are widened to bf16 exactly and the
    activations rounded to bf16 (as the float weights' bf16 products round them): every row of
    the 4 tiles of 16 and of a partial one, each column times its own scale."""
    if amx_rows(-1) == ALWAYS_PACKED:
        pytest.skip("no AMX tiles on this CPU")
    amx_rows(16)
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(rows)) * 0.05
    w[5] *= 40                                                        # one column's scale far larger
    layer = PackedLinear(linear_with(w), bits=8)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(2))
    q, scales = quantize.quantize_w8(w)
    expected = F.linear(x.bfloat16().float(), q.float() * scales[:, None])
    assert (layer(x) - expected).abs().max() < 1e-5 * expected.abs().max()


def bf16_top() -> bool:
    return bool(lowbit_kernels()) and torch.ops.llmserve.has_bf16_dot()


@pytest.mark.parametrize("rows", [2, 6, 9, 64])
def test_8bit_top_is_the_float_product_at_each_rows_largest_among_near_ties(rows):
    """PackedLinear.top (llmserve::q8_mm_top, an int8 pass): at each row's largest, the float
    kernel's value bit for bit, so its argmax is forward's, where each row's two largest (in
    different groups of 16 columns, which it recomputes whole) are a millionth apart (rounded
    activations alone put the wrong one first in some rows), and in a row with one huge input;
    elsewhere it may differ. One row, or none of these instructions: forward."""
    if not bf16_top():
        pytest.skip("no vdpbf16ps in this build (AVX-512 BF16 without AMX)")
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(48, 96, generator=g, dtype=torch.float64) * torch.rand(48, 1, generator=g, dtype=torch.float64)
    q, scales = quantize.quantize_w8(w)
    layer = PackedLinear(linear_with(w.float()), bits=8)
    assert layer.norms is not None and layer.packed.dim() == 3
    dequantized = q.double() * scales.double()[:, None]
    x = torch.randn(rows, 96, generator=g, dtype=torch.float64)
    for r in range(rows):      # columns a and b, in groups of 16 apart, tied (a millionth apart), far above the rest
        a, b = dequantized[r % 16], dequantized[16 + (5 * r) % 32]
        d, both = a - b, a + b
        both = both - (both @ d) / (d @ d) * d
        x[r] = x[r] - (x[r] @ d) / (d @ d) * d + 50 * both / both.norm() + 1e-6 * d / d.norm()
    x = x.float()
    x[-1, 7] = 1e4
    exact, top = layer(x), layer.top(x)
    best = exact.argmax(-1)
    assert torch.equal(top.argmax(-1), best)
    assert torch.equal(top.gather(1, best[:, None]), exact.gather(1, best[:, None]))
    if rows >= 9:      # the ties are real: rounded activations alone get some wrong
        assert (layer(x.bfloat16().float()).argmax(-1) != best).any()
    assert not torch.equal(top, exact)                  # and the rest of each row was not recomputed
    assert torch.equal(layer.top(x[:1]), exact[:1])     # one row: forward


@pytest.mark.parametrize("rows", [1, 6, 9, 64])
def test_8bit_rounded_is_the_product_on_bf16_activations_the_same_in_steps_of_any_rows(rows):
    """PackedLinear.rounded (llmserve::q8_mm_bf16, sampled rows' LM head): the product of the weights
    with the activations rounded to bf16, to float rounding; each row's values bit for bit the same
    alone as among the others (a seed's tokens do not depend on the batch); not forward's."""
    if not bf16_top():
        pytest.skip("no vdpbf16ps in this build (AVX-512 BF16 without AMX)")
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(48, 96, generator=g) * 0.05
    layer = PackedLinear(linear_with(w), bits=8)
    q, scales = quantize.quantize_w8(w)
    x = torch.randn(rows, 96, generator=g)
    x[0, :32] *= 50
    expected = F.linear(x.bfloat16().double(), q.double() * scales.double()[:, None])
    rounded = layer.rounded(x)
    assert (rounded.double() - expected).abs().max() < 1e-5 * expected.abs().max()
    for r in range(rows):
        assert torch.equal(layer.rounded(x[r:r + 1]), rounded[r:r + 1])
    assert not torch.equal(rounded, layer(x))


def test_packed_weights_move_into_one_arena_with_their_values_and_products(kernels):
    """into_huge_pages: every packed weight and scale our kernels read shares one storage (the huge
    page arena), each at a 64-byte boundary, with the same values and the same products; torch's
    kernels' layers (the fallback) keep theirs."""
    layers = [PackedLinear(linear_with(torch.randn(N, 64, generator=torch.Generator().manual_seed(N)) * 0.05), bits)
              for N, bits in ((48, 4), (80, 4), (32, 8))]
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    before = [(layer.packed.clone(), layer.scales.clone(), layer(x)) for layer in layers]
    quantize.into_huge_pages(layers)
    tensors = [t for layer in layers for t in (layer.packed, layer.scales)]
    storages = {t.untyped_storage().data_ptr() for t in tensors}
    assert len(storages) == (1 if kernels == "own" else len(tensors))
    if kernels == "own":
        assert all(t.data_ptr() % 64 == 0 for t in tensors)
    for layer, (packed, scales, y) in zip(layers, before):
        assert torch.equal(layer.packed, packed) and torch.equal(layer.scales, scales) and torch.equal(layer(x), y)


def test_each_kernel_gets_a_crossover_of_its_own(monkeypatch):
    """w4's decoder layers (our 4-bit kernel) and LM head (8-bit) are timed apart and each takes
    its own row limit: on an AMX Xeon the first beat bf16 past 64 rows, the second lost from 16."""
    layers = [PackedLinear(linear_with(torch.randn(32, 64)), bits) for bits in (4, 4, 8)]
    def time_kernels(group, max_rows):
        assert len({layer.bits for layer in group}) == 1
        return {4: 64, 8: 8}[group[0].bits], {1: {}}
    monkeypatch.setattr(quantize, "time_kernels", time_kernels)
    assert choose_kernels(layers, max_packed_rows=-1, max_rows=64) == (64, {"4-bit": {1: {}}, "8-bit": {1: {}}})
    assert [layer.max_packed_rows for layer in layers] == [64, 64, 8]


def test_mkl_packed_float_weights_give_the_float_product(monkeypatch):
    """pack_dense: above the packed limit the product runs on the float weights packed once for MKL
    (the plain ones dropped, their shape kept), prefill-shaped inputs too, to float rounding."""
    monkeypatch.setattr(quantize, "cpu_has_amx", lambda: False)
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(3)) * 0.1
    layer = PackedLinear(linear_with(w), bits=4, pack_dense=True)
    if layer.dense_packed is None:
        pytest.skip("no MKL in this torch, or our kernels did not load: the plain float weights stay")
    assert layer.weight.shape == w.shape and layer.weight.untyped_storage().nbytes() == 4
    choose_kernels([layer], max_packed_rows=2, max_rows=8)
    # as on a build whose prefills take the float weights (which do: test_prefills_pack_where_...)
    monkeypatch.setattr(quantize, "prefill_packed_rows", lambda limit, rows: 0)
    for x in (torch.randn(5, 64), torch.randn(2, 7, 64)):       # 5 rows; a prefill of 2 x 7
        expected = F.linear(x, w)
        assert (layer(x) - expected).abs().max() < 1e-5 * expected.abs().max()


@pytest.mark.parametrize("bf16_units", [False, True])
def test_float_weights_are_bf16_only_where_the_cpu_multiplies_bf16_and_activations_stay_fp32(bf16_units, monkeypatch):
    """On AMX the many-row products take bf16 weights, but the layer takes and returns
    fp32 and the engine's activations and KV cache stay fp32 (the model wholly in bf16 lost Paris)."""
    monkeypatch.setattr(quantize, "cpu_has_amx", lambda: bf16_units)
    w = torch.randn(32, 64) * 0.1
    layer = PackedLinear(linear_with(w), bits=4)
    choose_kernels([layer], max_packed_rows=0, max_rows=8)          # every row count: the float weights
    x = torch.randn(3, 64)
    y = layer(x)
    assert layer.weight.dtype == (torch.bfloat16 if bf16_units else torch.float32) and y.dtype == torch.float32
    error = (y - F.linear(x, w)).abs().max()
    assert (0 < error < 0.02) if bf16_units else error == 0
    assert quantize.compute_dtype("w4", torch.device("cpu")) == quantize.compute_dtype("w8", torch.device("cpu")) == torch.float32


def test_kernel_is_chosen_by_rows(monkeypatch):
    monkeypatch.setattr(quantize, "cpu_has_amx", lambda: False)    # fp32 float weights: exact equality
    w = torch.randn(32, 64) * 0.1
    layer = PackedLinear(linear_with(w), bits=4)
    choose_kernels([layer], max_packed_rows=2, max_rows=8)
    three, two = torch.randn(3, 64), torch.randn(2, 64)
    assert torch.equal(layer(three), F.linear(three, w))          # more than 2 rows: the float weight
    assert not torch.equal(layer(two), F.linear(two, w))          # 2 rows: the packed one
    best, timings = choose_kernels([layer], max_packed_rows=-1, max_rows=8)
    assert layer.max_packed_rows == best and set(timings["4-bit"][1]) == {"packed_ms", "dense_ms"}


def test_prefills_pack_where_the_4bit_kernel_beats_the_float_weights(monkeypatch):
    """AVX-512 without AMX: the packed kernel up to the rows where it beat the float weights at
    start-up (64 here: a prefill of 8 rows packs, one of 200 does not), at every size where it
    never lost; AMX: bf16 tiles from amx_min_rows rows; AVX2 alone: the 8-column kernel at every
    size; never where the layers never pack, always where told to."""
    # build: its amx_min_rows, then the limits for prefills of 8 and of 200 rows
    for build, min_rows, expected in (("avx512", ALWAYS_PACKED, (64, 64)), ("amx", 16, (0, ALWAYS_PACKED)),
                                      ("avx2", ALWAYS_PACKED, (ALWAYS_PACKED,) * 2),
                                      ("vnni", ALWAYS_PACKED, (ALWAYS_PACKED,) * 2)):
        monkeypatch.setattr(quantize, "lowbit_kernels", lambda: build)
        monkeypatch.setattr(quantize, "amx_min_rows", lambda: min_rows)
        assert (quantize.prefill_packed_rows(64, 8), quantize.prefill_packed_rows(64, 200)) == expected, build
        assert quantize.prefill_packed_rows(0, 200) == 0 and quantize.prefill_packed_rows(ALWAYS_PACKED, 8) == ALWAYS_PACKED
    # AVX-512 without AMX, where the packed kernels never lost at start-up (time_kernels): every prefill packs
    monkeypatch.setattr(quantize, "lowbit_kernels", lambda: "avx512")
    monkeypatch.setattr(quantize, "amx_min_rows", lambda: ALWAYS_PACKED)
    assert quantize.prefill_packed_rows(ALWAYS_PACKED, 8) == quantize.prefill_packed_rows(ALWAYS_PACKED, 2048) == ALWAYS_PACKED


@pytest.mark.parametrize("packed_loses_from, expected", [(4, 2), (1, 0), (None, ALWAYS_PACKED)])
def test_kernels_that_never_lose_are_taken_at_every_size(packed_loses_from, expected):
    """time_kernels: the most rows at which the packed kernels won (1, 2, 4, ...), or ALWAYS_PACKED
    where they never lost up to max_rows (longer prompts then pack too, not only those timed).
    Stand-in layers whose losing side sleeps 20 ms."""
    class Layer:
        weight, max_packed_rows = torch.zeros(4, 8), 0

        def __call__(self, x):
            packed = self.max_packed_rows == ALWAYS_PACKED
            loses = packed == (packed_loses_from is not None and x.shape[0] >= packed_loses_from)
            time.sleep(0.02 if loses else 0)

    best, timings = quantize.time_kernels([Layer()], max_rows=8)
    assert best == expected
    assert set(timings) == ({1, 2, 4} if packed_loses_from == 4 else {1} if packed_loses_from == 1 else {1, 2, 4, 8})


PROMPTS = ["Hello there", "The quick brown fox jumps over", "1 2 3", "x"]


@pytest.fixture(scope="module", params=["w8", "w4"])
def engine(request, tiny_model_dir):
    # packed_max_rows large: prefill and decode both take the packed kernels, so cached and
    # uncached computations use the same weights
    return Engine.from_config(EngineConfig(model_path=str(tiny_model_dir), quantization=request.param,
                                           max_model_len=128, max_num_seqs=8, packed_max_rows=ALWAYS_PACKED))


def run(engine, prompts: list[str], max_new: int = 10) -> list[list[int]]:
    requests = [Request(f"{i}-{p}", engine.tokenizer(p)["input_ids"], SamplingParams(max_new_tokens=max_new))
                for i, p in enumerate(prompts)]
    engine.generate(requests)
    return [r.output_ids for r in requests]


def steps(engine, rows: slice, prompts: list[list[int]], num_decode: int = 3, fed=None) -> list[torch.Tensor]:
    """Logits of a prefill of `prompts` into `rows` and of num_decode decode steps, each fed the
    greedy tokens of the step before, or of the logits `fed` (another run's, so both read alike)."""
    logits = [engine.runner.prefill(rows, prompts)]
    for i in range(num_decode):
        engine.cache.last_tokens[rows] = (fed or logits)[i].argmax(-1)
        logits.append(engine.runner.decode(rows.stop))
    return logits


def close(a: torch.Tensor, b: torch.Tensor, engine, tolerance: float = 0.10) -> bool:
    """Equal with torch's kernels (their bf16 activations round float noise away); within 10 % of the
    largest logit with ours: another batch size or a compiled layer changes float rounding by ulps,
    which an int8 activation can round to a whole step, and this random model amplifies (0-5.5 %
    seen with the AVX-512 build, whose sums round in another order; scaling its embeddings by
    1 + 1e-6 moves the eager engine's own verify logits 3-4 %; a row that mixed with another would
    be off by about 100 %)."""
    own = any(getattr(m, "own_kernel", False) for m in engine.runner.model.modules())
    return torch.equal(a, b) if not own else bool((a - b).abs().max() < tolerance * a.abs().max())


def test_weight_only_engine_cached_equals_uncached(engine):
    """Decode steps over the KV cache give the logits a prefill of the whole sequence gives."""
    assert engine.facts.packed_max_rows == ALWAYS_PACKED and engine.facts.dtype in (torch.float32, torch.bfloat16)
    for p in PROMPTS:
        ids = engine.tokenizer(p)["input_ids"]
        cached = steps(engine, slice(0, 1), [ids], 3)
        fed = [int(logits[0].argmax()) for logits in cached[:-1]]
        uncached = engine.runner.prefill(slice(0, 1), [ids + fed])      # the last step, recomputed whole
        assert close(cached[-1], uncached, engine)


@pytest.mark.parametrize("amx_rows", [1, ALWAYS_PACKED])
def test_weight_only_engine_batched_equals_alone(engine, amx_rows):
    """Rows never mix: each prompt gets the same logits in a padded batch as alone. On AMX, once
    with tiles at every row count and once with none: by default a 24-row batched prefill takes
    them (bf16 activations) and a 6-row one alone our int8 kernel, which this random model tells apart."""
    if quantize.amx_min_rows() == ALWAYS_PACKED and amx_rows == 1:
        pytest.skip("no AMX tiles here: the kernel is the same at every row count")
    before = torch.ops.llmserve.amx_min_rows(amx_rows) if quantize.lowbit_kernels() else None
    try:
        ids = [engine.tokenizer(p)["input_ids"] for p in PROMPTS]
        batched = steps(engine, slice(0, len(ids)), ids)
        for i, prompt in enumerate(ids):
            # fed the batch's tokens: a near-tie that one run rounds the other way must not fork the two
            for a, b in zip(steps(engine, slice(0, 1), [prompt], fed=[logits[i:i + 1] for logits in batched]), batched):
                assert close(a[0], b[i], engine)
    finally:
        if before is not None:
            torch.ops.llmserve.amx_min_rows(before)


def test_greedy_rows_take_the_top_lm_head_and_answer_as_on_the_float_one(engine, monkeypatch):
    """In a batch, greedy rows' LM head is PackedLinear.top: the same tokens as the float kernel's
    product gives them (and a greedy answer alone, one row a step, takes), while a sampled row (seeded)
    takes rounded() and one asking for logprobs gets its logits whole, in the same steps."""
    if not bf16_top():
        pytest.skip("no vdpbf16ps in this build (AVX-512 BF16 without AMX)")
    rows = []
    top = PackedLinear.top
    monkeypatch.setattr(PackedLinear, "top", lambda self, x: rows.append(x.reshape(-1, x.shape[-1]).shape[0]) or top(self, x))

    def answers() -> list:
        params = [SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=12, temperature=0.8, seed=3),
                  SamplingParams(max_new_tokens=12, logprobs=2), SamplingParams(max_new_tokens=12, min_tokens=5)]
        requests = [Request(f"{i}", engine.tokenizer(p)["input_ids"], params[i % 4]) for i, p in enumerate(PROMPTS * 2)]
        engine.generate(requests)
        return [(r.output_ids, r.logprobs) for r in requests]

    fast = answers()
    assert rows and max(rows) >= 2
    monkeypatch.setattr(PackedLinear, "top", lambda self, x: self(x))
    assert answers() == fast


def test_sampled_rows_take_the_rounded_lm_head_and_no_greedy_row_does(engine, monkeypatch):
    """A sampled row's LM head is PackedLinear.rounded in every step, one row or several together;
    greedy rows, with or without logprobs, never take it (their tokens stay a plain greedy step's)."""
    if not bf16_top():
        pytest.skip("no vdpbf16ps in this build (AVX-512 BF16 without AMX)")
    taken = []
    rounded = PackedLinear.rounded
    monkeypatch.setattr(PackedLinear, "rounded", lambda self, x: taken.append(x.reshape(-1, x.shape[-1]).shape[0]) or rounded(self, x))

    def answer(params: list[SamplingParams]) -> None:
        engine.generate([Request(f"{i}", engine.tokenizer(p)["input_ids"], params[i % len(params)])
                         for i, p in enumerate(PROMPTS * 2)])

    answer([SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=12, logprobs=2),
            SamplingParams(max_new_tokens=12, min_tokens=5)])
    assert taken == []
    sampled = SamplingParams(max_new_tokens=12, temperature=0.8, seed=3)
    answer([sampled, SamplingParams(max_new_tokens=12), sampled, SamplingParams(max_new_tokens=12, logprobs=2)])
    assert max(taken) == 4                   # 4 of the 8 rows sample, their decode steps together


def test_compiled_decode_matches_eager_and_builds_no_graph_after_start_up(tiny_model_dir, kernels, monkeypatch):
    """compile: true fuses the decode steps, by torch.compile (torch's kernels: the packed-kernel
    steps, up to 4 rows here) or our C++ decoder step (ours: every step, float products above 4
    rows): the same logits as the eager layers at batch sizes 1-8 over left-padded prompts and
    growing contexts, and no graph built while serving. Prefills on the float weights, as without
    AVX-512 they are not: both sides' int8 prefills (padded eager, ragged C++) put this chaotic
    model's first logits up to 11 % apart before any decode step (AVX2 EPYC)."""
    for module in (quantize, runner_module):
        monkeypatch.setattr(module, "prefill_packed_rows", lambda limit, rows: 0)
    torch._dynamo.reset()   # one graph serves every layer, unguarded on modules: not another test's kernels
    def make(compile: bool) -> Engine:
        return Engine.from_config(EngineConfig(model_path=str(tiny_model_dir), quantization="w4", max_model_len=128,
                                               max_num_seqs=8, packed_max_rows=4, compile=compile))
    eager, compiled = make(False), make(True)
    assert eager.facts.compiled_graphs == 0 and eager.runner.fused_weights is None
    if kernels == "own":     # our C++ decoder step (llmserve::decode_layers) instead of torch.compile
        assert compiled.facts.compiled_graphs == 0 and compiled.runner.fused_weights is not None
    else:
        assert compiled.facts.compiled_graphs >= 2 and compiled.runner.fused_weights is None   # batch 1 and 2..4
    graphs = ModelRunner.compiled_graphs()                 # built in this process so far
    assert len(eager.tokenizer(PROMPTS[3])["input_ids"]) == 1        # alone, its first decode has a context of 1
    for prompts in (PROMPTS, PROMPTS[:1], PROMPTS[1:4], PROMPTS * 2, PROMPTS[3:], PROMPTS[3:] * 2):
        # batch sizes 4, 1, 3, 8, 1, 2 (8: float products); contexts grow
        if kernels == "torch":
            assert run(compiled, prompts, 24) == run(eager, prompts, 24)
        else:
            ids = [eager.tokenizer(p)["input_ids"] for p in prompts]
            # 24 steps for the graphs' sake; logits compared over the first 3, before roundings compound
            expected = steps(eager, slice(0, len(ids)), ids, 24)
            for a, b in zip(expected[:4], steps(compiled, slice(0, len(ids)), ids, 24, fed=expected)[:4]):
                assert close(a, b, eager)
    assert ModelRunner.compiled_graphs() == graphs         # no recompilation while serving


def test_our_prefill_computes_no_padding_and_gives_the_padded_ones_keys_values_and_logits(tiny_model_dir):
    """Our C++ decoder step prefills each row's tokens alone, one row after another (no left
    padding computed): the keys and values at every real position and the last token's logits are
    the padded prefill's (all positions, every row padded to the longest), bit for bit, rows of
    several lengths at once; and with a cached prefix only the tail is computed, to the same values
    and logits."""
    engine = Engine.from_config(EngineConfig(model_path=str(tiny_model_dir), quantization="w4", max_model_len=128,
                                             max_num_seqs=8, packed_max_rows=4, compile=True))
    if engine.runner.fused_weights is None:
        pytest.skip("our C++ decoder step does not run here (no AVX2 kernels)")
    runner, c = engine.runner, engine.cache
    ids = [engine.tokenizer(p)["input_ids"] * 3 for p in PROMPTS]                 # 6, 18, 15, 3 tokens: 42 rows
    T = max(map(len, ids))
    padded = runner.prefill(slice(0, 4), ids, all_positions=True)[:, -1]
    k, v = c.k[:, :4, :, :T].clone(), c.v[:, :4, :, :T].clone()
    calls = []
    decode_layers = torch.ops.llmserve.decode_layers
    with mock.patch.object(torch.ops.llmserve, "decode_layers", lambda *a: calls.append(a[0].shape[0]) or decode_layers(*a)):
        alone = runner.prefill(slice(0, 4), ids)
        cached = runner.prefill(slice(0, 4), ids, num_cached=[max(len(t) - 5, 0) for t in ids])   # 5, 5, 5, 3 computed
    assert calls == [sum(map(len, ids)), 18]                                     # 42 rows, not 4 x 18; then 18, not 20
    # (the padded run's LM head took 4 x 18 rows, bf16 tiles on AMX: close; the two tail-only runs' equal)
    assert torch.equal(alone, cached) and close(alone, padded, engine)
    for row, t in enumerate(ids):
        assert torch.equal(c.k[:, row, :, T - len(t):T], k[:, row, :, T - len(t):]), row
        assert torch.equal(c.v[:, row, :, T - len(t):T], v[:, row, :, T - len(t):]), row


@pytest.fixture(scope="module")
def model_dir_64(tmp_path_factory, tokenizer):
    """A tiny random Llama whose heads are the default model's shape: 64 values each, 3 query heads
    a KV head (our C++ step's vectorized attention takes such heads; the tiny model's are 16 wide)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=192, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=512,
                         initializer_range=0.1, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny-llama-64")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_our_decoder_steps_attention_matches_torchs_over_long_contexts(model_dir_64):
    """Our C++ step's attention (heads of 64 values, 3 sharing a KV head; scores 16 positions at a
    time with AVX-512, one at a time in 256-bit vectors with AVX2 alone) gives the eager layers'
    logits, prompts of 40-60 tokens and 20 decode steps: the float
    products on both sides (packed_max_rows 0: bf16 on AMX, whose logits round to a step of ~0.4 %)
    and an fp32 cache, so only attention's summation order differs."""
    def make(compile: bool) -> Engine:
        return Engine.from_config(EngineConfig(model_path=str(model_dir_64), quantization="w4", max_model_len=128,
                                               max_num_seqs=4, packed_max_rows=0, compile=compile,
                                               kv_cache_dtype="fp32"))
    eager, ours = make(False), make(True)
    if ours.runner.fused_weights is None:
        pytest.skip("our C++ decoder step does not run here (no AVX2 kernels)")
    ids = [eager.tokenizer(" ".join(PROMPTS * k))["input_ids"][:n] for k, n in ((4, 40), (6, 60), (5, 47))]
    expected = steps(eager, slice(0, 3), ids, 20)
    for a, b in zip(expected, steps(ours, slice(0, 3), ids, 20, fed=expected)):
        assert (a - b).abs().max() < 0.02 * a.abs().max()   # one bf16 step of the logits: 0.4-0.6 %; wrong order ~100 %


def test_a_tokens_attention_is_the_same_bits_in_a_prefill_a_verify_step_or_alone(model_dir_64, amx_rows):
    """Our C++ step's attention (AVX-512) scores a lone token's heads a key row at a time, several
    tokens' (a prefill's, a verify step's) with each 16 positions' keys in columns, the products and
    sums in one order either way: 45 tokens prefilled at once or as 7, then verify steps of 6 to 1
    tokens, give every position's keys, values and logits bit for bit (speculative decoding's greedy
    answers rest on it). No AMX tiles, whose bf16 products of many rows round otherwise."""
    amx_rows(ALWAYS_PACKED)
    engine = Engine.from_config(EngineConfig(model_path=str(model_dir_64), quantization="w4", max_model_len=128,
                                             max_num_seqs=2, packed_max_rows=ALWAYS_PACKED, compile=True))
    if engine.runner.fused_weights is None:
        pytest.skip("our C++ decoder step does not run here (no AVX2 kernels)")
    runner, c = engine.runner, engine.cache
    ids = engine.tokenizer(" ".join(PROMPTS * 6))["input_ids"][:45]
    assert len(ids) == 45
    whole = runner.prefill(slice(1, 2), [ids], all_positions=True)[0]              # [45, V], row 1
    parts = [runner.prefill(slice(0, 1), [ids[:7]], all_positions=True)[0]]         # row 0
    at = 7
    for W in (6, 5, 4, 3, 2, 1, 6, 5, 4, 2):
        parts.append(runner.verify(torch.tensor([ids[at:at + W]]), ["exact"])[0])  # [W, V]
        c.lengths[0] += W - 1                                                     # all W kept
        c.row_lengths[0] += W - 1
        at += W
    assert at == 45 and int(c.row_lengths[0]) == 45
    assert torch.equal(c.k[:, 0, :, :45], c.k[:, 1, :, :45]) and torch.equal(c.v[:, 0, :, :45], c.v[:, 1, :, :45])
    assert torch.equal(torch.cat(parts), whole)


def test_kv_cache_is_fp16_under_our_decoder_step_and_errors_name_the_key(tiny_model_dir, kernels):
    """kv_cache_dtype auto: fp16 where our C++ decoder step runs (half the bytes its attention reads),
    the fp32 cache's logits over a prefill and decode steps (as close as another batch size's: this
    random model amplifies roundings, here 5.7 % of the largest logit); else the activations' dtype. fp16 where the step cannot run, fp32 under bf16 activations: errors naming it."""
    def make(kv: str, mode: str = "w4", compile: bool = True) -> Engine:
        return Engine.from_config(EngineConfig(model_path=str(tiny_model_dir), quantization=mode, max_model_len=128,
                                               max_num_seqs=8, packed_max_rows=4, compile=compile, kv_cache_dtype=kv))
    auto, fp32 = make("auto"), make("fp32")
    assert fp32.cache.k.dtype == torch.float32
    if kernels == "own":
        assert auto.cache.k.dtype == torch.float16 and auto.runner.fused_weights is not None
        ids = [auto.tokenizer(p)["input_ids"] for p in PROMPTS]
        expected = steps(fp32, slice(0, len(ids)), ids, 3)
        for a, b in zip(expected, steps(auto, slice(0, len(ids)), ids, 3, fed=expected)):
            assert close(a, b, auto)
    else:
        assert auto.cache.k.dtype == torch.float32
    assert make("auto", compile=False).cache.k.dtype == torch.float32
    with pytest.raises(ValueError, match="kv_cache_dtype fp16 needs our C.. decoder step"):
        make("fp16", compile=False)
    with pytest.raises(ValueError, match="kv_cache_dtype fp32 needs fp32 activations"):
        make("fp32", mode="bf16")


def test_compiled_verify_steps_match_eager_and_are_built_at_start_up(tiny_model_dir, kernels):
    """With speculative decoding on, start-up also compiles the verify step (W = 1 + spec_tokens
    tokens per row, fewer at run time): verifying drafts of 1 to 3 tokens in batches of 1 and 2
    builds no graph, and gives the eager engine's logits (with our kernels: the C++ decoder step's,
    each drafted token attending to the tokens before it only)."""
    torch._dynamo.reset()
    def make(compile: bool) -> Engine:
        return Engine.from_config(EngineConfig(model_path=str(tiny_model_dir), quantization="w4", max_model_len=128,
                                               max_num_seqs=8, packed_max_rows=8, compile=compile, spec_tokens=3))
    eager, compiled = make(False), make(True)
    graphs = ModelRunner.compiled_graphs()
    for prompts in (PROMPTS[:1], PROMPTS[1:3]):
        ids = [eager.tokenizer(p)["input_ids"] for p in prompts]
        rows = slice(0, len(ids))
        for W in (2, 3, 4):
            draft = torch.tensor([[5, 6, 7, 8][:W]] * len(ids))
            a, b = ((e.runner.prefill(rows, ids), e.runner.verify(draft))[1] for e in (eager, compiled))
            # the C++ step's attention, norms and rotary against torch's: on an AVX2-only EPYC
            # (no AVX-512) 5-21 % apart through the int8 activations, with either 4-bit layout
            assert a.shape == (len(ids), W, a.shape[-1]) and close(a, b, eager, tolerance=0.30)
    assert ModelRunner.compiled_graphs() == graphs
