"""Quantization modes: how each turns into from_pretrained arguments, and the weight-only modes'
packed linear layers. The only module that imports bitsandbytes. A mode the device cannot run is
an error here, at start-up, never a silent fallback to another mode.

w8 / w4 keep the float weights (for steps with many sequences, where a dense matrix product is
fastest) beside a packed int8 / int4 copy (for steps with few, which are bound by reading the
weights), and choose per call by the number of rows; the crossover is measured at start-up.
w4's 4-bit kernel is our own (lowbit_avx2.cpp, built at start-up: int8 activations per block of 32
times 4-bit weights, summed in integers as llama.cpp does) where the CPU has AVX2 and a compiler
is at hand, else torch's; 8-bit layers likewise take our kernel (float activations times int8
weights) there, torch's weight-only int8 kernel elsewhere."""

import functools
import itertools
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .kv_cache import zeros

FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BNB_MODES = ("int8", "nf4", "fp4")
WEIGHT_ONLY_MODES = ("w8", "w4")
W4_GROUP_SIZE = 32   # the default model's source weights are Q4_1: blocks of 32 with a scale and a minimum
# quantize_w4 takes this many rows at a time: its grid search's 14 passes over a block stay in cache
# (about half the time over the default model, timings in dd21ea2's message); groups run along a
# row, so blocks give the same result bit for bit
W4_QUANTIZE_ROWS = 256
ALWAYS_PACKED = 1 << 30   # a max_packed_rows no step reaches
# choose_kernels times the kernels up to a prefill step's rows, at most this many (each doubling
# of the rows doubles the timing: 256 rows took 6.7 s in all on an AMD EPYC with AVX-512)
TIMED_PREFILL_ROWS = 256
logger = logging.getLogger(__name__)


@functools.cache
def cpu_has_amx() -> bool:
    """AMX tiles multiply bf16 matrices natively. AVX512-BF16 alone does not count: on such a Xeon
    (no AMX) the default archive's bf16 prefill answered "What is the capital of France?" with
    "L'Étoile de la Cité, ..." (the first token is a near tie) where fp32 answers Paris."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags


def dense_dtype() -> torch.dtype:
    """The dtype w8/w4 keep their float weights in, for the steps with many rows and prefills:
    bf16 where AMX runs it, fp32 elsewhere (on CPUs that emulate bf16, fp32 decode steps were
    1.7-2.5x faster at 16-64 sequences: benchmarks/results/profile/profile.md). Activations, the
    residual stream and the KV cache stay fp32 on the CPU either way (compute_dtype): a model run
    wholly in bf16 answered "What is the capital of France?" with "L'Étoile, la Marseillaise, ..."
    on an AMX Xeon, where bf16 products with fp32 activations around them answer Paris. CPU only,
    as w8/w4 are (check_supported)."""
    return torch.bfloat16 if cpu_has_amx() else torch.float32


def check_supported(mode: str, device: torch.device) -> None:
    """Raise ValueError if `mode` cannot run on `device`."""
    if mode in FLOAT_DTYPES:
        if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"quantization bf16 is not supported by {torch.cuda.get_device_name(device)}")
        return
    if mode in BNB_MODES:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ValueError(f"quantization {mode} needs bitsandbytes, which failed to import: {e}") from e
        return
    if mode in WEIGHT_ONLY_MODES:
        if device.type != "cpu":
            raise ValueError(f"quantization {mode} runs on the CPU only so far (its CUDA kernels are untested)")
        return
    raise ValueError(f"unknown quantization mode {mode!r}")


def compute_dtype(mode: str, device: torch.device) -> torch.dtype:
    """The dtype activations and the KV cache use under `mode`."""
    if mode in FLOAT_DTYPES:
        return FLOAT_DTYPES[mode]
    if mode in WEIGHT_ONLY_MODES:
        return torch.float32            # the float weights: dense_dtype
    if mode == "int8":
        # bitsandbytes' int8 matmul takes fp16 activations (it casts them otherwise)
        return torch.float16
    return torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16


def from_pretrained_kwargs(mode: str, device: torch.device) -> dict:
    """Arguments for AutoModelForCausalLM.from_pretrained that load weights in `mode` (w8/w4 load
    float weights: pack_linears packs them once the projections are fused)."""
    check_supported(mode, device)
    dtype = compute_dtype(mode, device)
    if mode in FLOAT_DTYPES or mode in WEIGHT_ONLY_MODES:
        return {"dtype": dtype}
    from transformers import BitsAndBytesConfig

    if mode == "int8":
        quant = BitsAndBytesConfig(load_in_8bit=True)
    elif mode in ("nf4", "fp4"):
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_compute_dtype=dtype)
    else:
        raise ValueError(f"unknown quantization mode {mode!r}")
    return {"dtype": dtype, "quantization_config": quant, "device_map": {"": device}}


def clear_stale_lock(build: Path, max_age_s: float = 600) -> bool:
    """Remove the build lock torch's extension loader left in `build` (an extension's build
    directory) when a process building it was killed mid-build (a worker stopped during its first
    start): every later load waits on it forever, and TorchServe reports only that the worker did
    not start in time. A lock older than any build here takes (~70 s on two cores) is stale. Returns
    whether one was removed."""
    lock = build / "lock"
    try:
        if time.time() - lock.stat().st_mtime < max_age_s:
            return False
        lock.unlink()
    except FileNotFoundError:
        return False
    logger.warning("removed a stale build lock %s (a build killed mid-way)", lock)
    return True


def stable_source(build: Path) -> str:
    """lowbit_avx2.cpp copied into `build`, the extension's build directory (rewritten only when it
    changed): ninja rebuilds when a source's path changes, and TorchServe unpacks the archive into a
    new directory at every start, so building from there cost every worker start a ~30 s compile."""
    source = Path(__file__).with_name("lowbit_avx2.cpp")
    copy = build / "src" / source.name
    text = source.read_bytes()
    if not copy.is_file() or copy.read_bytes() != text:
        copy.parent.mkdir(parents=True, exist_ok=True)
        partial = copy.with_name(f"{source.name}.{os.getpid()}")   # workers starting together: whole files only
        partial.write_bytes(text)
        os.replace(partial, copy)
    return str(copy)


@functools.cache
def lowbit_kernels() -> str:
    """Build (once per machine: torch's extension cache, TORCH_EXTENSIONS_DIR) and load
    llmserve::q4_mm; the build's instruction set ("amx", "avx512", "vnni" or "avx2"), or "" with a warning
    where the CPU lacks AVX2/FMA/F16C or the build fails."""
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        flags = set()
    if not {"avx2", "fma", "f16c"} <= flags:
        logger.warning("no AVX2/FMA/F16C on this CPU; w4 uses torch's kernels")
        return ""
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        # one build per instruction set (its own name: a cache shared between machines never hands
        # a build to a CPU without its instructions): AVX-512 VNNI takes four blocks a step,
        # AVX-VNNI one instruction for the integer products instead of two
        name_suffix = ""
        if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
            variant, isa = "_avx512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
            if {"amx_tile", "amx_bf16", "avx512_bf16", "avx512vbmi"} <= flags:   # bf16 tiles for steps of many rows
                variant, isa = "_amx", [*isa, "-mavx512bf16", "-mavx512vbmi", "-mamx-tile", "-mamx-bf16"]
            elif "avx512_bf16" in flags:   # vdpbf16ps for the LM head's sampled rows (q8_mm_bf16), q8_mm_top: Zen 4
                name_suffix, isa = "_bf16", [*isa, "-mavx512bf16"]
        elif "avx_vnni" in flags:
            variant, isa = "_vnni", ["-mavxvnni"]
        else:
            variant, isa = "", []
        name = "llmserve_lowbit_avx2" + variant + name_suffix
        build = Path(_get_build_directory(name, verbose=False))   # in torch's extension cache
        clear_stale_lock(build)
        load(name=name, sources=[stable_source(build)],
             extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", *isa, "-ffp-contract=off", "-fopenmp"],
             extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=os.environ.get("LLMSERVE_VERBOSE_BUILD") == "1")
    except Exception as e:     # no compiler, no ninja, a failed build: the slower kernel still works
        logger.warning("building lowbit_avx2.cpp failed (%s); w4 uses torch's kernels", e)
        return ""
    torch.library.register_fake("llmserve::q4_mm")(   # the output's shape, for torch.compile
        lambda x, packed, scale, low: x.new_empty(x.shape[0], packed.shape[0] * (packed.shape[2] // 16 if packed.dim() == 3 else 1)))
    torch.library.register_fake("llmserve::q8_mm")(lambda x, q, scale: x.new_empty(x.shape[0], scale.shape[0]))
    torch.library.register_fake("llmserve::q8_mm_top")(lambda x, q, scale, norms: x.new_empty(x.shape[0], scale.shape[0]))
    torch.library.register_fake("llmserve::q8_mm_bf16")(lambda x, q, scale: x.new_empty(x.shape[0], scale.shape[0]))
    torch.library.register_fake("llmserve::mkl_mm")(lambda x, packed, n: x.new_empty(x.shape[0], n))
    return variant.lstrip("_") or "avx2"


def amx_min_rows() -> int:
    """The rows from which our 4-bit kernel takes AMX tiles and bf16 activations, where below it
    rounds them to int8 (lowbit_avx2.cpp); ALWAYS_PACKED where it never does (no AMX)."""
    return torch.ops.llmserve.amx_min_rows(-1) if lowbit_kernels() else ALWAYS_PACKED


def prefill_packed_rows(max_packed_rows: int, rows: int) -> int:
    """The packed-kernel row limit for a prefill of `rows` rows (several tokens a row) on our 4-bit
    kernel, whose int8 activations can flip a near-tied first token ("What is the capital of
    France?": "The" ... Paris, or "L'" ... French rambling, once in an eager archive on the AVX-512
    kernel), which every later token follows. AMX tiles take bf16 activations and beat the bf16
    products up to 512 rows (scratch timings in commit e758a75's message), so from amx_min_rows()
    rows every prefill packs, and below them takes the float weights. On CPUs without AVX-512 the
    8-column kernel beats MKL's fp32 product at every size (an 85-token prefill 130 against 212 ms
    on an AVX2 EPYC, whose float prefills made the service prefill-bound: README, the AVX2 runs),
    so there every prefill packs; with AVX-512 and no AMX, prefills pack up to the rows where the
    packed kernels beat the float ones at start-up (choose_kernels: on a Xeon 16 rows; on an AMD
    EPYC with AVX-512 they never lost, so every size, where a 4-token prefill took 72 ms on the
    float weights and 6 ms packed, 256 tokens 455 against 173 ms: commit message). Packed prefills
    have the int8 activations' perplexity (`make quality` measures w4 with packed prefills). Never
    where the layers never pack. PackedLinear.forward and the C++ decoder step (runner.prefill)
    both follow it."""
    if max_packed_rows >= ALWAYS_PACKED or (max_packed_rows > 0 and (rows >= amx_min_rows()
                                                                     or lowbit_kernels() in ("avx2", "vnni"))):
        return ALWAYS_PACKED
    return max_packed_rows if lowbit_kernels() == "avx512" else 0


def q4_columns(own_kernel: str, out_features: int) -> int:
    """Output columns q4_mm takes together in its column layout on this build: 16 with AVX-512 (a
    512-bit vector's lanes), 8 with AVX2 alone; 0 (the rows layout) where they do not divide N."""
    columns = 16 if own_kernel in ("amx", "avx512") else 8
    return columns if out_features % columns == 0 else 0


def pack_q4_columns(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q4_mm's column layout of q [N, K] (0..15) and its scale and low [N, K/32], G columns (16 for
    AVX-512, 8 for AVX2) a group, N a multiple of G: packed [N/G, K/32, 16 G], where vector m (4 G
    bytes) of a block holds in byte 4c + t weight 4(2m) + t of column c (low nibble) and 4(2m + 1) + t
    (high nibble); scales [2, N/G, K/32, G]."""
    N, K = q.shape
    weights = q.to(torch.uint8).reshape(N // G, G, K // 32, 8, 4).permute(0, 2, 3, 1, 4).reshape(N // G, K // 32, 8, 4 * G)
    packed = (weights[:, :, 0::2] | (weights[:, :, 1::2] << 4)).reshape(N // G, K // 32, 16 * G).contiguous()
    scales = torch.stack([scale, low]).reshape(2, N // G, G, K // 32).permute(0, 1, 3, 2).contiguous()
    return packed, scales


def pack_q8_pairs(q: torch.Tensor) -> torch.Tensor:
    """q8_mm's AVX-512 and AMX layout of q [N, K] int8, N a multiple of 16, K of 32: [N/16, K/32, 512],
    block b of column group g holding in byte 32j + 2c + t weight 32b + 2j + t of column 16g + c
    (AMX's bf16 weight tile, in int8)."""
    N, K = q.shape
    return q.reshape(N // 16, 16, K // 32, 16, 2).permute(0, 2, 3, 1, 4).reshape(N // 16, K // 32, 512).contiguous()


def pack_q4(q: torch.Tensor) -> torch.Tensor:
    """q4_mm's rows layout of q [N, K] (0..15): per block of 32, byte j holds weight j (low nibble) and j + 16."""
    N, K = q.shape
    blocks = q.reshape(N, K // 32, 2, 16).to(torch.uint8)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(N, K // 2).contiguous()


def quantize_w8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: (q [N, K] int8, scales [N]), w ~ q * scale."""
    scales = w.float().abs().amax(dim=1).clamp(min=1e-12) / 127                       # [N]
    q = torch.round(w.float() / scales[:, None]).clamp(-127, 127).to(torch.int8)        # [N, K]
    return q, scales


def quantize_w4(w: torch.Tensor, group_size: int = W4_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups along the input: (q [N, K] int32 in 0..15, scales_and_zeros
    [K/g, N, 2]), w ~ (q - 8) * scale + zero. Each group takes the coarsest 16-level grid from its
    minimum that holds every value (so weights that came from a 4-bit grid, like Q4_1's, come back
    exactly), or min/max over 15 steps when none does."""
    N, K = w.shape
    assert K % group_size == 0, f"input size {K} is not a multiple of the group size {group_size}"
    if N > W4_QUANTIZE_ROWS:
        blocks = [quantize_w4(rows, group_size) for rows in w.split(W4_QUANTIZE_ROWS)]
        return torch.cat([q for q, _ in blocks]), torch.cat([sz for _, sz in blocks], dim=1)
    wg = w.float().reshape(N, K // group_size, group_size)                                # [N, G, g]
    lo, span = wg.amin(-1), wg.amax(-1) - wg.amin(-1)                                     # [N, G]
    above = wg - lo[..., None]                                                            # [N, G, g]
    step = span / 15
    for levels in range(14, 0, -1):          # fewer levels: a coarser grid that may be the source's
        d = span / levels
        q = above / d.clamp(min=1e-30)[..., None]
        on_grid = ((q - q.round()).abs() < 1e-3).all(-1) & (span > 0)
        step = torch.where(on_grid, d, step)
    q = torch.round(above / step.clamp(min=1e-30)[..., None]).clamp(0, 15).to(torch.int32)
    zeros = lo + 8 * step
    scales_and_zeros = torch.stack([step, zeros], dim=-1).transpose(0, 1).contiguous()   # [G, N, 2] fp32
    return q.reshape(N, K), scales_and_zeros


def dequantize_w4(q: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """quantize_w4's inverse: (q - 8) * scale + zero, [N, K] float32."""
    scale, zero = scales_and_zeros.transpose(0, 1).unbind(-1)                             # [N, G]
    g = q.shape[1] // scale.shape[1]
    return ((q.reshape(*scale.shape, g) - 8) * scale[..., None] + zero[..., None]).reshape(q.shape)


# torch's packed CPU kernels are vectorized for bf16 activations only: with fp32 or fp16 ones they
# were 15x slower (AVX2 EPYC, one thread), so the packed path computes in bf16 whatever the model's dtype
KERNEL_DTYPE = torch.bfloat16


class PackedLinear(torch.nn.Module):
    """A linear layer with its float weight and a packed int8 / int4 copy; forward takes the
    packed kernel when the input has at most max_packed_rows rows, the float one otherwise.
    own_kernel: our AVX2 kernels where they build (lowbit_avx2.cpp), else torch's. 4-bit layers:
    faster, but it rounds the activations to int8 per block of 32 (w4's WikiText-2 perplexity +0.7 %
    against +0.1 % with torch's; on AMX, steps of 16 rows or more take bf16 activations and tiles).
    8-bit layers (w8, w4's LM head): float activations times int8 weights, no rounding: an
    int8-activation kernel rounded w8 0.66 % off bf16 (the aim is 0.5 %) and as w4's LM head turned
    the first token of "What is the capital of France?" from "The" (capital ... is Paris) to "L'"
    (French rambling): the last hidden state's outliers. On AMX, from 16 rows, bf16 activations
    (as the float weights' products take) times the int8 weights widened exactly in tiles."""

    def __init__(self, linear: torch.nn.Linear, bits: int, pack_dense: bool = False) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias      # shared, not copied, unless converted:
        dense = dense_dtype()
        if dense != linear.weight.dtype:                          # bf16 products on AMX
            self.weight = torch.nn.Parameter(linear.weight.detach().to(dense), requires_grad=False)
            if linear.bias is not None:
                self.bias = torch.nn.Parameter(linear.bias.detach().to(dense), requires_grad=False)
        self.bits = bits
        self.out_features = linear.out_features
        self.max_packed_rows = ALWAYS_PACKED
        self.own_kernel = (linear.weight.device.type == "cpu" and linear.in_features % 32 == 0
                           and lowbit_kernels())
        norms = None
        with torch.no_grad():
            if bits == 8:
                packed, scales = quantize_w8(linear.weight)
                if self.own_kernel in ("amx", "avx512") and self.out_features % 16 == 0:
                    if self.own_kernel == "avx512" and torch.ops.llmserve.has_bf16_dot():
                        norms = column_norms(packed, scales)
                    packed = pack_q8_pairs(packed)
            elif bits == 4:
                q, scales = quantize_w4(linear.weight)
                if self.own_kernel:   # weight = q * scale + low, fp16 per block, for llmserve::q4_mm
                    scale, zero = scales.transpose(0, 1).unbind(-1)                          # [N, K/32]
                    if columns := q4_columns(self.own_kernel, self.out_features):
                        packed, scales = pack_q4_columns(q, scale, zero - 8 * scale, columns)
                    else:
                        packed, scales = pack_q4(q), torch.stack([scale, zero - 8 * scale])     # [2, N, K/32]
                else:
                    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
            else:
                raise ValueError(f"bits must be 8 or 4, got {bits}")
        # buffers, not plain attributes: torch.compile then treats their shapes as fixed
        self.register_buffer("packed", packed)
        own_dtype = torch.float16 if bits == 4 else torch.float32     # the source's Q4_1 scales are fp16 too
        self.register_buffer("scales", scales.to(own_dtype if self.own_kernel else KERNEL_DTYPE).contiguous())
        self.register_buffer("norms", norms)   # 8 bits, pairs layout, vdpbf16ps without AMX: top() takes it
        # pack_dense: fp32 float weights packed once for MKL (torch's product repacks them every call),
        # in place of the plain ones. MKL's buffers are several times the weights' bytes, of which it
        # touches part: more memory resident, and more still counted in weight_bytes
        self.register_buffer("dense_packed", None)
        if pack_dense and self.own_kernel and self.weight.dtype == torch.float32 and self.bias is None:
            dense_packed = torch.ops.llmserve.mkl_pack(self.weight.detach())
            if dense_packed.numel():
                self.dense_packed = dense_packed
                # the shape alone stays (choose_kernels, the C++ step's checks read it), 4 bytes
                self.weight = torch.nn.Parameter(torch.zeros((), dtype=torch.float32).expand(self.weight.shape),
                                                 requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])                                                     # [rows, K]
        limit = self.max_packed_rows
        if self.own_kernel and self.bits == 4 and x.dim() == 3 and x.shape[1] > 1:   # a prefill: [B, T > 1, K]
            limit = prefill_packed_rows(limit, x2.shape[0])
        # (our 8-bit kernel rounds no activations: a verify step's LM head, [B, W > 1, K], stays on it)
        if x2.shape[0] > limit:
            if self.dense_packed is not None:
                y = torch.ops.llmserve.mkl_mm(x2.float(), self.dense_packed, self.out_features)
                return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
            return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)
        if self.own_kernel and self.bits == 4:
            y = torch.ops.llmserve.q4_mm(x2.float(), self.packed, self.scales[0], self.scales[1])
        elif self.own_kernel:
            y = torch.ops.llmserve.q8_mm(x2.float(), self.packed, self.scales)
        elif self.bits == 8:
            y = torch._weight_int8pack_mm(x2.to(KERNEL_DTYPE), self.packed, self.scales)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2.to(KERNEL_DTYPE), self.packed, W4_GROUP_SIZE, self.scales)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def top(self, x: torch.Tensor) -> torch.Tensor:
        """forward's product where nothing but each row's largest is read (greedy rows' LM head):
        exactly forward's at the largest, from int8 activations elsewhere (llmserve::q8_mm_top), so the
        argmax is forward's, however many rows a step takes. w4's LM head at 6 / 64 rows took 1.86 /
        18.7 ms on its float activations, 1.12 / 10.6 ms with a bf16 pass, 0.71 / 8.6 with the int8
        one (Zen 4, 2 threads, the head alone; commit messages). Where it cannot (no vdpbf16ps build,
        AMX, a single row, rows past the float weights' crossover): forward."""
        return self._pairs_pass(x, 2, torch.ops.llmserve.q8_mm_top, self.norms)

    def rounded(self, x: torch.Tensor) -> torch.Tensor:
        """forward's product with the activations rounded to bf16 (llmserve::q8_mm_bf16), for rows whose
        logits are read whole (sampled rows' LM head): w4's 16-row step spent 4.9 ms in it on float
        activations against 3.0 ms on vdpbf16ps (Zen 4). Each row's values are the same in a step of
        any number of rows, one included, so its logits do not depend on the batch. Rounding moves a
        sampling distribution by 0.28 % (total variation, mean over 2,000 WikiText-2 positions at
        temperature 0.7), where w4's own weights and int8 activations move it 5.7 % from fp32's
        (commit message). Where the kernel cannot (no vdpbf16ps, AMX, rows past the float weights'
        crossover): forward."""
        return self._pairs_pass(x, 1, torch.ops.llmserve.q8_mm_bf16)

    def _pairs_pass(self, x: torch.Tensor, min_rows: int, op, *args) -> torch.Tensor:
        """op(x, packed, scales, *args) over x's rows where the pairs layout's own kernels can take them
        (norms kept: 8 bits in that layout, the vdpbf16ps build, no AMX) and min_rows to
        max_packed_rows of them; else forward."""
        x2 = x.reshape(-1, x.shape[-1])
        if self.norms is None or not min_rows <= x2.shape[0] <= self.max_packed_rows:
            return self(x)
        y = op(x2.float(), self.packed, self.scales, *args).to(x.dtype)
        return (y if self.bias is None else y + self.bias).reshape(*x.shape[:-1], self.out_features)


def column_norms(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Each column's norm of 8-bit weights q [N, K] times scales [N], rounded up to float32: the
    bound llmserve::q8_mm_top puts on its rounding (integer squares summed exactly)."""
    norms = q.to(torch.int32).square().sum(1, dtype=torch.int64).double().sqrt() * scales.double()
    return torch.nextafter(norms.float(), torch.tensor(float("inf")))


def pack_linears(model, mode: str) -> list[PackedLinear]:
    """Replace every projection of the decoder layers (fused where fused) and the LM head with a
    PackedLinear. w4 keeps the LM head in 8 bits: the GGUF holds the tied embeddings as Q8_0, and
    4 bits there cost the most accuracy. The decoder's float weights are MKL-packed where they can
    be; the fused projections' parts (q|k|v, gate|up), views of the fused weights, are dropped so
    that the plain weights go (the engine runs the fused ones). The LM head's stay: tied to the
    embeddings, packing them would add their size."""
    bits = {"w8": 8, "w4": 4}[mode]
    packed = []
    def pack(parent, name: str, layer_bits: int, pack_dense: bool = True) -> None:
        linear = getattr(parent, name, None)
        if type(linear) is torch.nn.Linear:
            setattr(parent, name, PackedLinear(linear, layer_bits, pack_dense))
            packed.append(getattr(parent, name))
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("qkv_proj",) if attn.qkv_proj is not None else ("q_proj", "k_proj", "v_proj"):
            pack(attn, name, bits)
        pack(attn, "o_proj", bits)
        for name in ("gate_up_proj",) if mlp.gate_up_proj is not None else ("gate_proj", "up_proj"):
            pack(mlp, name, bits)
        pack(mlp, "down_proj", bits)
        # the fused projections run; their parts (views of the fused weights) would keep the plain weights
        if attn.qkv_proj is not None:
            attn.q_proj = attn.k_proj = attn.v_proj = None
        if mlp.gate_up_proj is not None:
            mlp.gate_proj = mlp.up_proj = None
    pack(model, "lm_head", 8, pack_dense=False)
    into_huge_pages(packed)
    return packed


def into_huge_pages(layers: list[PackedLinear]) -> None:
    """Move the packed weights and scales that our kernels read (CPU) into one arena of transparent
    huge pages (kv_cache.zeros): a one-row decode step reads every one of them, ~80 MB for w4, and
    in 4 KiB pages, each its own TLB entry, the model's 120 4-bit products of one row took 2.73 ms
    against 2.27 ms in 2 MiB pages (AMD EPYC with AVX-512; commit message). A tensor alone is too
    small for a huge page: they share the arena, each at a 64-byte boundary."""
    tensors = [(layer, name) for layer in layers if layer.own_kernel for name in ("packed", "scales")
               if getattr(layer, name).device.type == "cpu"]
    if not tensors:
        return
    sizes = [getattr(layer, name).nbytes for layer, name in tensors]
    starts = [0, *itertools.accumulate(-(-size // 64) * 64 for size in sizes)]   # the last: the arena's size
    arena = zeros((starts[-1],), torch.uint8, torch.device("cpu"), prefault=True)
    for (layer, name), start, size in zip(tensors, starts, sizes):
        t = getattr(layer, name)
        setattr(layer, name, arena[start:start + size].view(t.dtype).view(t.shape).copy_(t))


def choose_kernels(layers: list[PackedLinear], max_packed_rows: int, max_rows: int) -> tuple[int, dict]:
    """Set every layer's max_packed_rows: as configured, or (-1) the most rows at which the packed
    kernels beat the float ones, timed here on the real weights, each kernel's layers together
    (w4: the decoder's 4-bit layers, the 8-bit LM head: on AMX the first won to 64 rows, the
    second lost from 16). Returns the first layer's (a decoder layer's) and the timings
    {"4-bit" / "8-bit": {rows: {"packed_ms", "dense_ms"}}}."""
    if not layers or max_packed_rows >= 0:
        for layer in layers:
            layer.max_packed_rows = max_packed_rows
        return max_packed_rows, {}
    timings, crossover = {}, {}
    for bits in dict.fromkeys(layer.bits for layer in layers):
        group = [layer for layer in layers if layer.bits == bits]
        crossover[bits], timings[f"{bits}-bit"] = time_kernels(group, max_rows)
        for layer in group:
            layer.max_packed_rows = crossover[bits]
    return crossover[layers[0].bits], timings


def time_kernels(layers: list[PackedLinear], max_rows: int) -> tuple[int, dict]:
    """The most rows (1, 2, 4, ... up to max_rows) at which the packed kernels beat the float ones
    over all the layers, or ALWAYS_PACKED where they never lost (every size: on an AMD EPYC with
    AVX-512 they stayed 2.4x faster to 2048 rows, 898 against 2196 ms, where a 256-row crossover
    had sent longer prompts to the float weights: 12266ca's message); and the timings
    {rows: {"packed_ms", "dense_ms"}}."""
    timings, best = {}, 0
    rows = 1
    while rows <= max_rows and best == rows // 2:      # until the packed kernels first lose
        samples = {"packed": [], "dense": []}
        xs = {n: torch.randn(rows, n) for n in {l.weight.shape[1] for l in layers}}   # fp32: compute_dtype
        for _ in range(3):        # taking turns: a machine whose speed drifts slows both alike
            for kind, limit in (("packed", ALWAYS_PACKED), ("dense", 0)):
                for layer in layers:
                    layer.max_packed_rows = limit
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    for layer in layers:
                        layer(xs[layer.weight.shape[1]])
                    samples[kind].append(time.perf_counter() - t0)
        ms = {f"{kind}_ms": round(min(s) * 1000, 2) for kind, s in samples.items()}   # the least disturbed
        timings[rows] = ms
        if ms["packed_ms"] < ms["dense_ms"]:
            best = rows
        rows *= 2
    return (ALWAYS_PACKED if best and best == rows // 2 else best), timings
