"""The benchmark: prompt cutting, perplexity windows, profiles, the memory sampler and tables on
their own (fast), then the smoke profile end to end on the real model (CPU, minutes): every output
is written and its numbers agree."""

import csv
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from benchmarks import measure
from benchmarks.memory import PeakMemory
from benchmarks.profiles import load_profile, run_counts
from benchmarks.tables import format_table, write_report
from benchmarks.workload import TEMPLATES, WIKITEXT, exact_prompt

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ("prefill_vs_decode", "tokens_per_s", "memory", "ppl_degradation", "kv_cache", "summary_table")


def test_prompts_are_exactly_the_length_asked(tokenizer):
    wiki = (WIKITEXT / "test.txt").read_text()
    for length in (128, 256, 2048):
        prompts = [exact_prompt(tokenizer, wiki, i, length) for i in range(6)]
        assert {t for t, _ in prompts} == set(TEMPLATES)
        assert all(len(ids) == length for _, ids in prompts)
        assert len({tuple(ids) for _, ids in prompts}) == 6


class RecordsScoredTokens:
    """A stand-in model: loss 1.0 per token; remembers which target tokens each window scored."""

    def __init__(self) -> None:
        self.scored: list[int] = []
        self.num_calls = 0

    def __call__(self, x, labels, use_cache):
        targets = labels[0, 1:]                     # the model shifts labels by one
        self.scored += targets[targets != -100].tolist()
        self.num_calls += 1
        return SimpleNamespace(loss=torch.tensor(1.0))


@pytest.mark.parametrize("num_tokens, window, stride", [(1000, 256, 128), (100, 256, 128), (257, 256, 128),
                                                        (1000, 300, 7)])
def test_perplexity_scores_every_token_once(num_tokens, window, stride):
    ids = list(range(1000, 1000 + num_tokens))
    model = RecordsScoredTokens()
    ppl = measure.perplexity(model, ids, window, stride, torch.device("cpu"))
    assert model.scored == ids[1:]
    assert model.num_calls == measure.num_windows(num_tokens, window, stride)
    assert ppl == pytest.approx(math.e)


def test_perplexity_rejects_a_stride_wider_than_the_window():
    with pytest.raises(ValueError, match="stride"):
        measure.perplexity(RecordsScoredTokens(), list(range(10)), 4, 5, torch.device("cpu"))


def test_profiles_say_what_is_wrong(tmp_path):
    assert set(load_profile("full", "sweep")) == {"batch_sizes", "users", "requests", "fixed_tokens"}
    with pytest.raises(ValueError, match="profile 'huge' is not in"):
        load_profile("huge", "bench")
    typo = tmp_path / "profiles.yaml"
    typo.write_text(yaml.safe_dump({"quick": {"bench": {**load_profile("quick", "bench"), "mode": ["fp32"]}}}))
    with pytest.raises(ValueError, match=r"bench in profile 'quick' must have the keys .* got .*'mode'"):
        load_profile("quick", "bench", typo)


def test_peak_memory_sees_a_runs_allocation_and_forgets_it_on_reset():
    with PeakMemory() as peak:
        base = peak.read_bytes()
        block = b"\x01" * (200 * 2**20)    # written, so resident
        time.sleep(0.05)                   # where the kernel cannot reset VmHWM, let the sampler see it
        assert peak.read_bytes() - base >= 190 * 2**20
        del block
        peak.reset()
        assert peak.read_bytes() - base < 50 * 2**20


def test_tables_show_a_missing_value_as_a_dash():
    rows = [{"mode": "bf16", "ms": 1.234}, {"mode": "fp4", "ms": None}]
    columns = (("mode", "mode", "{}"), ("ms", "time", "{:.1f}"))
    assert format_table(rows, columns, markdown=True).splitlines() == [
        "| mode | time |", "|---|---|", "| bf16 | 1.2 |", "| fp4 | - |"]
    assert format_table(rows, columns).splitlines() == ["mode  time", "bf16   1.2", " fp4     -"]


# -- the smoke profile, end to end ------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    if not (ROOT / "models" / "smollm2-135m-instruct" / "config.json").is_file():
        pytest.skip("model not prepared: run make mar")
    out = tmp_path_factory.mktemp("bench")
    # one torch thread: on a shared 2-core machine two threads wait on each other for seconds
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--profile", "smoke",
                           "--num-threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "benchmarks" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return SimpleNamespace(out=out, last_line=json.loads(proc.stdout.strip().splitlines()[-1]), rows=rows,
                           report=json.loads((out / "metrics" / "final_report.json").read_text()),
                           grid=load_profile("smoke", "bench"))


@pytest.mark.e2e
def test_every_output_is_written(quick):
    for name in FIGURES:
        assert (quick.out / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    html = (quick.out / "benchmarks" / "report.html").read_text()
    assert "plotly" in html.lower() and all(m in html for m in quick.report if m in quick.grid["modes"])
    assert quick.last_line["num_timed_runs"] == len(quick.rows)
    assert all(r["git_sha"] == quick.report["machine"]["git_sha"] and r["cpu"] for r in quick.rows)


@pytest.mark.e2e
def test_every_mode_runs_or_says_why_not(quick):
    ran = [m for m in quick.grid["modes"] if m in quick.report]
    assert set(ran) | set(quick.report["skipped"]) == set(quick.grid["modes"])
    assert all(quick.report["skipped"][m] for m in quick.report["skipped"])
    assert set(ran) == set(quick.grid["modes"]), f"a mode was skipped on the CPU: {quick.report['skipped']}"
    assert {"device", "machine", "baseline_mode"} <= set(quick.report)
    assert {"cpu", "num_cores", "torch", "transformers", "git_sha", "date"} <= set(quick.report["machine"])


@pytest.mark.e2e
def test_rows_cover_the_grid_with_exact_lengths(quick):
    g = quick.grid
    for mode in (m for m in g["modes"] if m in quick.report):
        for length in g["context_lengths"]:
            for kv in g["kv_cache"]:
                runs = [r for r in quick.rows if (r["mode"], int(r["context_len"]), r["kv_cache"]) == (mode, length, str(kv))]
                counts = run_counts(g, kv)
                assert len(runs) == counts["num_prompts"] * counts["timed_runs"], (mode, length, kv)
                assert {r["template"] for r in runs} == set(TEMPLATES[:counts["num_prompts"]])
                assert all(int(r["prompt_tokens"]) == length for r in runs)
                assert all(int(r["new_tokens"]) == g["max_new_tokens"] for r in runs)


@pytest.mark.e2e
def test_numbers_agree_with_each_other(quick):
    for r in quick.rows:
        prefill, decode, total = float(r["prefill_ms"]), float(r["decode_ms"]), float(r["total_ms"])
        assert 0 < prefill and 0 < decode and prefill + decode <= total + 0.01, r
        assert float(r["decode_tokens_s"]) == pytest.approx((int(r["new_tokens"]) - 1) / decode * 1000, rel=1e-3)
        assert float(r["peak_mem_mb"]) > float(r["weight_mb"]) > 0     # the weights are resident


@pytest.mark.e2e
def test_report_comes_from_the_rows(quick):
    top = max(quick.grid["context_lengths"])
    baseline = quick.report["baseline_mode"]
    assert baseline == "fp32" and quick.report[baseline]["ppl_degradation_pct"] == 0
    for mode in (m for m in quick.grid["modes"] if m in quick.report):
        entry = quick.report[mode]
        for key in ("prefill_ms", "vram_gb", "weights_gb", "ppl", "ppl_degradation_pct",
                    *(f"tokens_s_{n}" for n in quick.grid["context_lengths"])):
            assert entry[key] is not None, (mode, key)
        assert math.isfinite(entry["ppl"]) and 1 < entry["ppl"] < 1000
        assert entry["ppl"] == quick.last_line["ppl"][mode]
        runs = [r for r in quick.rows if (r["mode"], int(r["context_len"]), r["kv_cache"]) == (mode, top, "True")]
        assert entry[f"tokens_s_{top}"] == pytest.approx(statistics.median(float(r["decode_tokens_s"]) for r in runs), rel=1e-3)
        assert entry["prefill_ms"] == pytest.approx(statistics.median(float(r["prefill_ms"]) for r in runs), rel=1e-3)
        # the physics the benchmark is about: without a cache every token re-reads the whole prompt
        assert entry[f"tokens_s_{top}"] > entry[f"tokens_s_no_cache_{top}"], mode


def test_a_report_names_its_machine_and_the_command_as_it_was_run(tmp_path, monkeypatch):
    """write_report: the JSON as given, and the Markdown's first line with the machine and the
    arguments this process got (not a command rebuilt from some of them), then the tables."""
    machine = {"cpu": "Some CPU", "num_cores": 2, "torch": "2.13.0", "git_sha": "abc", "date": "2026-12-07"}
    monkeypatch.setattr(sys, "argv", ["spec_ceiling.py", "--workloads", "copy", "--out", "/tmp/x y"])
    write_report(tmp_path / "r", "name", {"machine": machine, "rows": [1]}, "benchmarks.spec_ceiling", "TABLE", "; more")
    assert json.loads((tmp_path / "r" / "name.json").read_text()) == {"machine": machine, "rows": [1]}
    first, rest = (tmp_path / "r" / "name.md").read_text().split("\n", 1)
    assert first == ("Measured on Some CPU, 2 cores, torch 2.13.0, git abc, 2026-12-07; command: python -m "
                     "benchmarks.spec_ceiling --workloads copy --out '/tmp/x y'; more")
    assert rest == "\nTABLE\n"
