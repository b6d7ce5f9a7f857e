"""Loads a tokenizer and a causal LM from a local directory in the configured quantization mode,
and records what was learned at start-up (ModelFacts). Never touches a model hub."""

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import EngineConfig
from .quantize import compute_dtype, from_pretrained_kwargs

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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but no CUDA device is available")
    return torch.device(name)


def weight_bytes(model: torch.nn.Module) -> int:
    seen = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue    # tied embeddings count once
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


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
    )
    return model, tokenizer, facts
