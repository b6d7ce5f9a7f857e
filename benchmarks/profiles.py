"""Named profiles (quick, full) in profiles.yaml: how much the benchmark, the sweep and the optlab measure.
Loads one tool's section and checks it, so that a typo fails before anything runs."""

from pathlib import Path

import yaml

from llmserve.config import QUANTIZATION_MODES

PROFILES = Path(__file__).resolve().parent / "profiles.yaml"
KEYS = {"bench": {"modes", "context_lengths", "kv_cache", "num_prompts", "warmup_runs", "timed_runs",
                  "max_new_tokens", "seed", "perplexity"},
        "sweep": {"batch_sizes", "users", "requests", "fixed_tokens"},
        "optlab": {"modes", "student_modes", "onnx", "prune", "distill", "prompt_tokens", "max_new_tokens",
                   "batch_size", "num_prompts", "seed", "perplexity"}}
RUN_COUNTS = ("num_prompts", "warmup_runs", "timed_runs")   # the bench's optional no_cache section may lower these


def load_profile(name: str, tool: str, path: Path = PROFILES) -> dict:
    """The `tool` section (bench, sweep or optlab) of profile `name`."""
    profiles = yaml.safe_load(path.read_text())
    if name not in profiles:
        raise ValueError(f"profile {name!r} is not in {path}; it has {sorted(profiles)}")
    section = profiles[name].get(tool, {})
    optional = {"no_cache", "packed_max_rows"} if tool == "bench" else set()
    if not KEYS[tool] <= set(section) <= KEYS[tool] | optional:
        raise ValueError(f"{tool} in profile {name!r} must have the keys {sorted(KEYS[tool])}"
                         f"{f' (and may have {sorted(optional)})' if optional else ''}, got {sorted(section)}")
    if tool == "bench":
        no_cache = section.get("no_cache", {})
        if not set(no_cache) <= set(RUN_COUNTS) or no_cache.get("num_prompts", 0) > section["num_prompts"]:
            raise ValueError(f"no_cache in profile {name!r} may only lower {RUN_COUNTS}, got {no_cache}")
        if section.get("packed_max_rows", 0) != "always" and not isinstance(section.get("packed_max_rows", 0), int):
            raise ValueError(f"packed_max_rows in profile {name!r} must be an integer or always")
    if tool in ("bench", "optlab"):
        bad = [m for m in section["modes"] + section.get("student_modes", []) if m not in QUANTIZATION_MODES]
        if bad:
            raise ValueError(f"unknown modes {bad} in profile {name!r}; known: {QUANTIZATION_MODES}")
    return section


def run_counts(grid: dict, kv_cache: bool) -> dict:
    """num_prompts, warmup_runs and timed_runs of one KV setting of a bench grid."""
    counts = {k: grid[k] for k in RUN_COUNTS}
    return counts if kv_cache else {**counts, **grid.get("no_cache", {})}
