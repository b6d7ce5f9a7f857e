"""The advisor (loadtest/advise.py) on fixture results: its advice follows the numbers. Its real
counterpart is `make advise` over the committed results."""

import csv
import json

from loadtest import advise

SWEEP_KEYS = ("config", "batch_size", "requests_per_s", "latency_p99_ms", "usd_per_1k_requests")


def sweep(tmp_path, rows) -> str:
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SWEEP_KEYS)
        w.writerows(rows)
    return path


def test_batch_size_is_the_most_throughput_within_each_class(tmp_path):
    rows = [("b8", 8, 2.0, 4000, 0.01), ("b32", 32, 5.0, 20000, 0.005), ("b64", 64, 6.0, 40000, 0.004)]
    advice = advise.batch_size(sweep(tmp_path, rows))
    assert [a.split(":")[1].split("(")[0].strip() for a in advice] == ["batch size 8", "batch size 32", "batch size 64"]
    assert "line 2]" in advice[0] and "line 4]" in advice[2]
    rows[0] = ("b8", 8, 2.0, 6000, 0.01)        # now nothing meets the interactive class
    advice = advise.batch_size(sweep(tmp_path, rows))
    assert advice[0].startswith("interactive") and "no configuration meets it" in advice[0] and "b8" in advice[0]


def test_quantization_follows_speed_memory_and_the_perplexity_budget(tmp_path):
    report = {"baseline_mode": "fp32",
              "fp32": {"tokens_s_128": 30.0, "mem_gb_128": 1.2, "ppl_degradation_pct": 0.0},
              "w8": {"tokens_s_128": 100.0, "mem_gb_128": 0.6, "ppl_degradation_pct": 0.3},
              "w4": {"tokens_s_128": 150.0, "mem_gb_128": 0.5, "ppl_degradation_pct": 1.0}}
    path = tmp_path / "final_report.json"
    path.write_text(json.dumps(report))
    latency, cost, quality = advise.quantization(path)
    assert latency.startswith("latency: w4") and cost.startswith("cost (memory): w4") and ": w4 (" in quality
    report["w4"]["ppl_degradation_pct"] = 3.0     # over the 2 % budget: the next fastest within it
    report["w8"]["mem_gb_128"] = 0.4
    path.write_text(json.dumps(report))
    latency, cost, quality = advise.quantization(path)
    assert latency.startswith("latency: w4") and cost.startswith("cost (memory): w8") and ": w8 (" in quality


def test_the_next_optimization_names_the_loads_below_the_aim_and_the_profiles_largest_part(tmp_path):
    points = tmp_path / "points.csv"
    def write(ours16):
        with open(points, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(("system", "users", "mode", "output_tokens_per_s"))
            w.writerows([("ours", 1, "plain", 130), ("llama.cpp", 1, "plain", 60), ("vllm", 1, "plain", 20),
                         ("ours", 16, "plain", ours16), ("llama.cpp", 16, "plain", 90), ("vllm", 16, "plain", 300),
                         ("ours-no-spec", 16, "plain", 900)])
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"rows": [
        {"mode": "w4", "compiled": False, "batch": 64, "phase": "decode", "step_ms": 100.0, "attention_ms": 20.0,
         "linear_ms": 50.0, "other_ms": 30.0},
        {"mode": "w4", "compiled": False, "batch": 64, "phase": "prefill", "step_ms": 900.0, "attention_ms": 800.0,
         "linear_ms": 50.0, "other_ms": 30.0}]}))
    write(ours16=350)
    advice = advise.next_optimization(points, profile)
    assert len(advice) == 2 and advice[0].startswith("16 users plain") and "1.17x vllm" in advice[0]
    assert "most in linear (50.0 of 100.0 ms)" in advice[1]
    write(ours16=400)                            # 1.33x: met, nothing to say about that load
    assert [a for a in advise.next_optimization(points, profile) if "users" in a] == []


def test_replicas_come_from_the_plan_and_refusals_are_flagged(tmp_path):
    plan = tmp_path / "plan.json"
    rows = [{"trace": "steady", "routing": "least", "requests": 100, "refused": 0},
            {"trace": "burst", "routing": "least", "requests": 100, "refused": 7}]
    plan.write_text(json.dumps({"sizing": {"target_rps": 30.0, "p99_target_s": 10.0,
                                           "replicas": {"least": 3, "round-robin": 4}}, "rows": rows}))
    advice = advise.replicas(plan)
    assert "3 replicas with least" in advice[0] and "4 replicas with round-robin" in advice[1]
    assert "refused 7 of 100" in advice[2] and "burst" in advice[2]
    rows[1]["refused"] = 0
    plan.write_text(json.dumps({"sizing": {"target_rps": 30.0, "p99_target_s": 10.0, "replicas": {"least": 3}},
                                "rows": rows}))
    assert len(advise.replicas(plan)) == 1
