"""Model optimization lab: is ONNX Runtime, pruning or distillation worth it on this model? Every
variant against the engine's quantization modes in one run: perplexity (WikiText-2 test) against
output tokens/s (one stream, and a batch decoded together) and memory. The variants are built
here (ONNX export and ORT int8, magnitude pruning, a half-depth student distilled on WikiText-2
validation text, so never on the text it is scored on), then each is measured in a fresh process
(optlab/measure.py). The profile is profiles.yaml's optlab section.

    python -m optlab.run --profile quick     # make optlab: minutes, written to build/optlab-quick
    python -m optlab.run --profile full      # make optlab PROFILE=full: about an hour, to optlab/results/<UTC time>

Writes OUT/results.json (variants, distillation, machine), OUT/table.md, OUT/ppl_vs_speed.png and
the MLflow file store OUT/mlruns (experiment optlab: a run for the whole, a nested run per variant,
the distillation's loss per step); built models go to build/optlab/ (large, not kept). Prints the
table, then one JSON line."""

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.machine import ROOT, describe
from benchmarks.plots import pyplot, save
from benchmarks.profiles import load_profile
from benchmarks.tables import format_table
from benchmarks.workload import WIKITEXT
from loadtest.tracking import open_store
from optlab import compress, measure, onnx_model

COLUMNS = (("variant", "variant", "{}"), ("weight_mb", "weights MB", "{:.0f}"), ("peak_mb", "peak MB", "{:.0f}"),
           ("tokens_s_single", "tok/s 1 stream", "{:.1f}"), ("tokens_s_batch", "tok/s batch", "{:.1f}"),
           ("ppl", "ppl", "{:.2f}"), ("ppl_vs_fp32_pct", "ppl +% vs fp32", "{:+.1f}"))
KIND_COLORS = {"engine": "#1f77b4", "onnx": "#ff7f0e", "pruned": "#d62728", "student": "#2ca02c"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="quick", help="profile in benchmarks/profiles.yaml (quick, full)")
    p.add_argument("--model-path", type=Path, default=ROOT / "models" / "smollm2-135m-instruct")
    p.add_argument("--out", type=Path, help="results folder (default: build/optlab-quick, or optlab/results/<UTC time>)")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "optlab", help="where built models are written")
    return p.parse_args()


def engine(name: str, family: str, model_dir: Path, mode: str, **extra) -> dict:
    """A variant the engine serves: a model directory in one of its quantization modes."""
    return {"variant": name, "family": family, "kind": "engine", "model_dir": str(model_dir), "mode": mode, **extra}


def build_variants(settings: dict, teacher_dir: Path, work: Path) -> tuple[list[dict], dict]:
    """Every variant to measure, each with its `family` (KIND_COLORS) and how it is run; and what
    building them learned (export and training times, sparsity reached, the distillation's losses)."""
    variants = [engine(f"engine {mode}", "engine", teacher_dir, mode) for mode in settings["modes"]]
    notes = {}
    work.mkdir(parents=True, exist_ok=True)
    if settings["onnx"]:
        start = time.perf_counter()
        onnx_model.export(teacher_dir, work / "model-fp32.onnx")
        notes["onnx_export_s"] = time.perf_counter() - start
        if "int8" in settings["onnx"]:
            onnx_model.quantize_int8(work / "model-fp32.onnx", work / "model-int8.onnx")
        variants += [{"variant": f"onnx {dtype}", "family": "onnx", "kind": "onnx", "mode": dtype,
                      "path": str(work / f"model-{dtype}.onnx"), "model_dir": str(teacher_dir)} for dtype in settings["onnx"]]
    teacher, tokenizer = compress.load(teacher_dir)
    for sparsity in settings["prune"]:
        model, _ = compress.load(teacher_dir)
        name = "2:4" if sparsity == "2:4" else f"{sparsity:.0%}"
        zero = compress.prune(model, sparsity)
        path = compress.save(model, tokenizer, work / f"pruned-{name.replace(':', 'of').replace('%', 'pct')}")
        variants.append(engine(f"pruned {name} fp32", "pruned", path, "fp32", sparsity=sparsity, zero_fraction=zero))
        if sparsity == "2:4":
            notes["sparse_2_4_kernel"] = compress.sparse_kernel_check(model)
    losses = []
    train_ids = tokenizer((WIKITEXT / "valid.txt").read_text(), add_special_tokens=False)["input_ids"]
    student, notes["distill"] = compress.distill(teacher, train_ids, settings["distill"], settings["seed"],
                                                 on_step=lambda step, loss, s: losses.append((step, loss, s)))
    notes["distill"].update(train_text="wikitext-2 valid.txt", train_tokens_available=len(train_ids),
                            first_loss=losses[0][1], last_loss=losses[-1][1], losses=losses,
                            num_layers=student.config.num_hidden_layers, teacher_layers=teacher.config.num_hidden_layers)
    student_dir = compress.save(student, tokenizer, work / "student")
    variants += [engine(f"student {mode}", "student", student_dir, mode) for mode in settings["student_modes"]]
    return variants, notes


def measure_all(variants: list[dict], settings: dict) -> list[dict]:
    """Each variant in a fresh interpreter (spawn), one after the other."""
    rows = []
    for variant in variants:
        print(f"measuring {variant['variant']}", flush=True)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
            rows.append({**variant, **pool.submit(measure.run, variant, settings).result()})
    base = next((r for r in rows if r["variant"] == "engine fp32"), None)
    for row in rows:
        if base:
            row["ppl_vs_fp32_pct"] = (row["ppl"] / base["ppl"] - 1) * 100
        if row["kind"] == "onnx" and row["mode"] == "fp32" and base:   # the export is checked against the engine
            row["greedy_matches_engine"] = row["answers"] == base["answers"]
    return rows


def plot(rows: list[dict], settings: dict, path: Path) -> None:
    fig, axes = pyplot().subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for ax, key, title in zip(axes, ("tokens_s_single", "tokens_s_batch"),
                              ("one stream", f"{settings['batch_size']} prompts decoded together")):
        for row in rows:
            ax.scatter(row[key], row["ppl"], color=KIND_COLORS[row["family"]], s=40)
            ax.annotate(row["variant"], (row[key], row["ppl"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set(title=f"Perplexity against speed: {title}", xlabel="output tokens/s", yscale="log")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("WikiText-2 test perplexity (log)")
    for family, color in KIND_COLORS.items():
        axes[1].scatter([], [], color=color, label=family)
    axes[1].legend(fontsize=8)
    save(fig, path)


def log_mlflow(rows: list[dict], notes: dict, settings: dict, out: Path, profile: str, machine: dict) -> str:
    mlflow = open_store(out / "mlruns", "optlab")
    with mlflow.start_run(run_name=f"optlab {profile} {machine['date']}"):
        mlflow.log_params({"profile": profile, **{k: json.dumps(v) for k, v in settings.items()}, **machine})
        for step, loss, _ in notes["distill"]["losses"]:
            mlflow.log_metric("distill_loss", loss, step=step)
        mlflow.log_metrics({k: v for k, v in notes.items() if isinstance(v, float)})
        for name in ("results.json", "table.md", "ppl_vs_speed.png"):
            mlflow.log_artifact(str(out / name))
        for row in rows:
            with mlflow.start_run(run_name=row["variant"], nested=True):
                mlflow.log_params({k: row[k] for k in ("family", "kind", "mode", "sparsity") if k in row})
                mlflow.log_metrics({k: float(v) for k, v in row.items()
                                    if isinstance(v, (int, float)) and k != "sparsity"})
    return mlflow.get_tracking_uri()


def main() -> None:
    args = parse_args()
    settings = load_profile(args.profile, "optlab")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or (ROOT / "optlab" / "results" / stamp if args.profile == "full" else ROOT / "build" / "optlab-quick")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    variants, notes = build_variants(settings, args.model_path, args.work)
    rows = measure_all(variants, settings)
    machine = describe()
    (out / "results.json").write_text(json.dumps({"profile": args.profile, "settings": settings, "machine": machine,
                                                  "notes": notes, "variants": rows}, indent=1) + "\n")
    table = format_table(rows, COLUMNS, markdown=True)
    (out / "table.md").write_text(table + "\n")
    plot(rows, settings, out / "ppl_vs_speed.png")
    uri = log_mlflow(rows, notes, settings, out, args.profile, machine)
    print("\n" + format_table(rows, COLUMNS))
    print(json.dumps({"profile": args.profile, "wall_s": round(time.perf_counter() - start, 1), "out": str(out),
                      "mlflow": uri, "sparse_2_4_kernel": notes.get("sparse_2_4_kernel"),
                      "greedy_matches_engine": next((r.get("greedy_matches_engine") for r in rows if "greedy_matches_engine" in r), None),
                      "ppl": {r["variant"]: round(r["ppl"], 3) for r in rows},
                      "tokens_s_single": {r["variant"]: round(r["tokens_s_single"], 1) for r in rows}}))


if __name__ == "__main__":
    main()
