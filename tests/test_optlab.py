"""The optimization lab: pruning masks and the student's layers on a tiny model, then the smoke
profile end to end (ONNX export and ORT, pruning, distillation, MLflow store) on a tiny random Llama
with the real tokenizer, the student served by the handler. `make optlab` runs the real model
(its committed results: optlab/results)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.profiles import load_profile
from optlab import compress
from benchmarks.machine import ROOT


def test_unstructured_pruning_zeroes_the_smallest_weights():
    weight = torch.tensor([[0.1, -4.0, 0.3, 2.0], [-0.2, 1.0, 3.0, -0.05]])
    mask = compress.sparsity_mask(weight, 0.5)
    assert mask.tolist() == [[False, True, False, True], [False, True, True, False]]


def test_two_of_four_keeps_the_two_largest_of_every_four_inputs():
    weight = torch.randn(8, 32)
    mask = compress.sparsity_mask(weight, "2:4")
    groups, kept = weight.abs().view(8, 8, 4), mask.view(8, 8, 4)
    assert (kept.sum(-1) == 2).all()
    smallest_kept = torch.where(kept, groups, torch.inf).amin(-1)
    largest_pruned = torch.where(kept, -torch.inf, groups).amax(-1)
    assert (smallest_kept >= largest_pruned).all()


def test_pruning_rejects_a_sparsity_it_does_not_know():
    with pytest.raises(ValueError, match="sparsity"):
        compress.sparsity_mask(torch.ones(4, 4), "1:4")


def test_the_student_holds_every_other_teacher_layer():
    from transformers import LlamaConfig, LlamaForCausalLM

    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                           num_attention_heads=2, num_key_value_heads=1))
    student = compress.half_layers(teacher)
    assert student.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    for kept, original in zip(student.model.layers, teacher.model.layers[::2]):
        assert torch.equal(kept.mlp.up_proj.weight, original.mlp.up_proj.weight)
        assert kept.mlp.up_proj.weight.data_ptr() != original.mlp.up_proj.weight.data_ptr()   # a copy


def test_distillation_loss_is_zero_only_where_the_student_agrees():
    logits = torch.randn(2, 6, 10)
    labels = logits.argmax(-1)
    same = compress.distill_loss(logits, logits, labels, temperature=2.0, alpha=1.0)
    other = compress.distill_loss(logits, torch.randn(2, 6, 10), labels, temperature=2.0, alpha=1.0)
    assert abs(float(same)) < 1e-6 < float(other)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, tiny_model_dir):
    """`python -m optlab.run --profile smoke` on the tiny model into a temporary folder."""
    out, work = tmp_path_factory.mktemp("optlab"), tmp_path_factory.mktemp("optlab-models")
    proc = subprocess.run([sys.executable, "-m", "optlab.run", "--profile", "smoke", "--model-path", str(tiny_model_dir),
                           "--out", str(out), "--work", str(work)], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, work, json.loads(proc.stdout.strip().splitlines()[-1])


def test_smoke_profile_measures_every_variant(smoke):
    out, _, _ = smoke
    results = json.loads((out / "results.json").read_text())
    settings = load_profile("smoke", "optlab")
    expected = ([f"engine {m}" for m in settings["modes"]] + [f"onnx {d}" for d in settings["onnx"]]
                + ["pruned 50% fp32", "pruned 2:4 fp32"] + [f"student {m}" for m in settings["student_modes"]])
    assert [r["variant"] for r in results["variants"]] == expected
    for row in results["variants"]:
        assert row["tokens_s_single"] > 0 and row["tokens_s_batch"] > 0 and row["peak_mb"] > 0
        assert 1 < row["ppl"] < float("inf")
    assert results["machine"]["cpu"] and results["machine"]["git_sha"]
    assert (out / "ppl_vs_speed.png").stat().st_size > 0 and "| variant |" in (out / "table.md").read_text()
    by_name = {r["variant"]: r for r in results["variants"]}
    assert by_name["pruned 50% fp32"]["zero_fraction"] == pytest.approx(0.5, abs=0.01)
    assert by_name["pruned 2:4 fp32"]["zero_fraction"] == pytest.approx(0.5, abs=0.01)
    distill = results["notes"]["distill"]
    assert distill["steps"] > 0 and distill["num_layers"] == distill["teacher_layers"] // 2 == 1


def test_the_onnx_export_answers_like_the_engine(smoke):
    """fp32 ONNX Runtime and the engine's fp32 weights: the same greedy tokens for every prompt."""
    _, _, summary = smoke
    assert summary["greedy_matches_engine"] is True


def test_every_variant_is_in_the_mlflow_store(smoke):
    out, _, summary = smoke
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=summary["mlflow"])
    runs = client.search_runs([client.get_experiment_by_name("optlab").experiment_id])
    names = {run.info.run_name: run for run in runs}
    assert set(summary["ppl"]) <= set(names)
    assert names["onnx int8"].data.metrics["ppl"] == pytest.approx(summary["ppl"]["onnx int8"], rel=1e-3)
    parent = next(run for run in runs if "mlflow.parentRunId" not in run.data.tags)
    assert len(client.get_metric_history(parent.info.run_id, "distill_loss")) == json.loads(
        (out / "results.json").read_text())["notes"]["distill"]["steps"]


def test_the_student_is_served_by_the_handler(smoke):
    from test_handler import body, make_handler, run_steps, whole

    _, work, _ = smoke
    handler, ctx = make_handler(work / "student", max_model_len=512)
    answer = whole(run_steps(handler, ctx, {0: {"a": body("The capital of France is", max_new_tokens=8)}})["a"])
    assert answer["usage"]["completion_tokens"] == 8
