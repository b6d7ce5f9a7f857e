"""Loads a tokenizer and a causal LM from a local directory in the configured quantization mode,
and records what was learned at start-up (ModelFacts). Never touches a model hub."""

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import EngineConfig
from .quantize import (TIMED_PREFILL_ROWS, WEIGHT_ONLY_MODES, choose_kernels, compute_dtype, from_pretrained_kwargs,
                       pack_linears)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")   # the runner's forward is written for these


@dataclass(frozen=True)
class ModelFacts:
    device: torch.device
    dtype: torch.dtype            # activations and KV cache
    stop_token_ids: frozenset[int]
    weight_bytes: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    packed_max_rows: int = -1      # w8/w4: steps of at most this many rows ran the packed kernels
    kernel_ms: dict | None = None  # w8/w4: {"4-bit" / "8-bit": {rows: {packed_ms, dense_ms}}}, timed at start-up
    compiled_graphs: int = 0       # compile: the decode graphs torch.compile built at start-up


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but no CUDA device is available")
    return torch.device(name)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every weight storage, each counted once (tied embeddings, fused views, packed copies)."""
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [t for m in model.modules() for t in vars(m).values() if isinstance(t, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def fuse_linears(linears: list[torch.nn.Linear]) -> torch.nn.Linear | None:
    """One Linear computing all of `linears` side by side; the originals' weights become views into
    it, so the model keeps working and no memory is added. None for quantized (non-Linear) layers."""
    if not all(type(m) is torch.nn.Linear for m in linears):
        return None
    first = linears[0]
    fused = torch.nn.Linear(first.in_features, sum(m.out_features for m in linears), bias=first.bias is not None,
                            device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in linears]))
        if first.bias is not None:
            fused.bias.copy_(torch.cat([m.bias for m in linears]))
    start = 0
    for m in linears:
        end = start + m.out_features
        m.weight = torch.nn.Parameter(fused.weight[start:end], requires_grad=False)
        if m.bias is not None:
            m.bias = torch.nn.Parameter(fused.bias[start:end], requires_grad=False)
        start = end
    return fused


def fuse_projections(model) -> None:
    """q|k|v and gate|up as one Linear each (attn.qkv_proj, mlp.gate_up_proj; None where the
    weights are quantized by bitsandbytes or the MLP is not SiLU-gated): fewer, larger products."""
    silu = model.config.hidden_act == "silu"
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        mlp.gate_up_proj = fuse_linears([mlp.gate_proj, mlp.up_proj]) if silu else None


def load_model(config: EngineConfig):
    """Returns (model, tokenizer, facts)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # before transformers may look at a hub
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(config.model_path)
    if not (path / "config.json").is_file():
        raise ValueError(f"model_path {str(path)!r} is not a local Hugging Face model directory (no config.json)")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model type {hf_config.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    kwargs = from_pretrained_kwargs(config.quantization, device)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    fuse_projections(model)
    packed_max_rows, kernel_ms = -1, None
    if config.quantization in WEIGHT_ONLY_MODES:
        layers = pack_linears(model, config.quantization)
        # timed up to a prefill step's rows too (prefill_packed_rows reads the crossover)
        timed_rows = max(config.max_num_seqs, min(config.max_prefill_tokens, TIMED_PREFILL_ROWS))
        packed_max_rows, kernel_ms = choose_kernels(layers, config.packed_max_rows, timed_rows)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)

    stop_ids = set()
    for ids in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if ids is not None:
            stop_ids.update(ids if isinstance(ids, list) else [ids])
    facts = ModelFacts(
        device=device,
        dtype=compute_dtype(config.quantization, device),
        stop_token_ids=frozenset(stop_ids),
        weight_bytes=weight_bytes(model),
        num_layers=hf_config.num_hidden_layers,
        num_kv_heads=hf_config.num_key_value_heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
        packed_max_rows=packed_max_rows,
        kernel_ms=kernel_ms,
    )
    return model, tokenizer, facts
