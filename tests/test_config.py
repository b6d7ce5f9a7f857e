from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
import yaml

from llmserve.config import PREFIX_BLOCK, EngineConfig
from llmserve.tenants import Tenants

ROOT = Path(__file__).resolve().parent.parent


def test_repo_model_config_parses():
    section = yaml.safe_load((ROOT / "config/model-config.yaml").read_text())["handler"]
    config = EngineConfig.from_dict(section)
    assert config.quantization == "w4"       # the shipped default since 480edc9
    assert config.kv_capacity_tokens == config.max_num_seqs * config.max_model_len
    assert config.kv_prefault                # the server maps its KV cache at start-up
    tenants = Tenants(yaml.safe_load((ROOT / "config/model-config.yaml").read_text())["tenants"])
    assert tenants.policy("trial").max_requests_per_s > 0    # tests/test_e2e.py's rate-limited tenant


def test_unknown_key_is_rejected():
    with pytest.raises(ValueError, match="unknown handler config keys \\['quantisation'\\]"):
        EngineConfig.from_dict({"model_path": "m", "quantisation": "int8"})


def test_model_path_required():
    with pytest.raises(ValueError, match="model_path"):
        EngineConfig.from_dict({"quantization": "bf16"})


@pytest.mark.parametrize("key,value,match", [
    ("quantization", "int4", "quantization must be one of"),
    ("device", "tpu", "device must be one of"),
    ("max_num_seqs", 0, "max_num_seqs must be a positive integer"),
    ("max_model_len", "2048", "max_model_len must be a positive integer"),
    ("max_new_tokens_cap", True, "max_new_tokens_cap must be a positive integer"),
    ("kv_budget_tokens", -1, "kv_budget_tokens must be a non-negative integer"),
    ("kv_budget_tokens", 100, "must hold one whole sequence"),
    ("default_max_new_tokens", 5000, "exceeds max_new_tokens_cap"),
    ("kv_prefault", "yes", "kv_prefault must be true or false"),
    ("kv_cache_dtype", "bf16", "kv_cache_dtype must be one of"),
    ("prefix_cache_tokens", -16, "prefix_cache_tokens must be a non-negative integer"),
    ("spec_tokens", 1.5, "spec_tokens must be a non-negative integer"),
    ("spec_max_rows", -1, "spec_max_rows must be a non-negative integer"),
    ("spec_lookup_min", 4, "1 <= min <= max"),
    ("spec_lookup_max", 0, "1 <= min <= max"),
    ("max_queue_wait_s", float("inf"), "max_queue_wait_s must be a non-negative number"),
    ("priority_ageing_s", -1, "priority_ageing_s must be a non-negative number"),
    ("prefill_chunk_tokens", -16, "prefill_chunk_tokens must be a non-negative integer"),
    ("prefill_chunk_tokens", 64, "needs prefix_cache_tokens > 0"),   # the chunks wait in the prefix cache
])
def test_bad_values_are_rejected(key, value, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig.from_dict({"model_path": "m", key: value})


def test_prefill_chunks_are_whole_prefix_cache_blocks():
    with pytest.raises(ValueError, match=f"prefill_chunk_tokens must be a multiple of {PREFIX_BLOCK}"):
        EngineConfig(model_path="m", prefix_cache_tokens=256, prefill_chunk_tokens=PREFIX_BLOCK + 4)
    assert EngineConfig(model_path="m", prefix_cache_tokens=256, prefill_chunk_tokens=32).prefill_chunk_tokens == 32


def test_config_is_frozen():
    config = EngineConfig(model_path="m")
    with pytest.raises(FrozenInstanceError, match="cannot assign to field 'quantization'"):
        config.quantization = "fp32"
    assert config.quantization == "bf16"
