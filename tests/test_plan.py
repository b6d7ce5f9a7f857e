"""The capacity planner's simulation (loadtest/plan.py) on a hand-made engine; its real counterpart is
`python -m loadtest.plan measure`, which checks the simulation against open-loop Locust runs."""

import dataclasses

import pytest
import yaml

from loadtest.plan import DT, HPA, HPA_SYNC_S, Engine, Hpa, fit_engine, paced_users, poisson, simulate, stats

# a step 10 ms + 1 ms a sequence, 0.1 ms a prompt token; every request 100 prompt and 64 output tokens
ENGINE = Engine(step_s=0.01, per_seq_s=0.001, per_prompt_token_s=0.0001, requests=[(100, 64)], startup_s=60.0)


def alone(n: int) -> float:
    """n requests arriving together: their prefill, then 63 steps of n sequences."""
    return n * 100 * 0.0001 + 63 * (0.01 + 0.001 * n)


def test_the_engine_model_is_fitted_back_from_runs_it_would_take():
    """The prompt token's cost from the one-user TTFTs, the step's and the sequence's from the runs'
    windows less that; a prompt's tokens found in the prefix cache cost nothing (every other
    request's first 48 here)."""
    runs = {}
    for n in (1, 4, 16, 64):
        prompt_each = {1: 50, 4: 300, 16: 120, 64: 80}[n]
        decoded, prompt = 63 * 10 * n, prompt_each * 10 * n          # 10 answers a user, prompts computed
        window = 0.01 * decoded / n + 0.001 * decoded + 0.0001 * prompt
        runs[n] = [{"start": 0.0, "latency_ms": 1000 * window * (i == 0), "output_tokens": 64,
                    "prompt_tokens": prompt_each + 48 * (i % 2), "cached_prompt_tokens": 48 * (i % 2)}
                   for i in range(10 * n)]
    # the one-user run's TTFTs: a step's overhead, then 0.1 ms a prompt token computed
    runs[1] = [{**r, "server_ttft_ms": 1000 * (0.011 + 0.0001 * p), "prompt_tokens": p + r["cached_prompt_tokens"]}
               for r, p in zip(runs[1], (40, 60, 60, 40) * 3)]
    engine = fit_engine(runs, startup_s=60.0)
    assert (engine.step_s, engine.per_seq_s, engine.per_prompt_token_s) == pytest.approx((0.01, 0.001, 0.0001))
    mean_prompt = sum(p for p, _ in engine.requests) / len(engine.requests)
    assert engine.capacity_rps() == pytest.approx(1 / (0.0001 * mean_prompt + (0.01 / 64 + 0.001) * 63))


def test_a_cost_the_windows_would_make_negative_is_fitted_as_zero():
    """Windows that shrink as more tokens are decoded (a machine that sped up between runs) would
    fit a negative cost a sequence: it is 0, and the step's cost the best fit alone."""
    runs = {n: [{"start": 0.0, "latency_ms": 1000 * (0.01 * 63 * 10 - 1e-5 * 63 * 10 * n) * (i == 0),
                 "output_tokens": 64, "prompt_tokens": 50} for i in range(10 * n)] for n in (1, 4, 16, 64)}
    engine = fit_engine(runs, startup_s=60.0)
    assert engine.per_seq_s == 0 and engine.per_prompt_token_s == 0 and 0.005 < engine.step_s < 0.01


def test_a_lone_request_takes_its_prefill_and_one_step_a_token():
    latency = simulate(ENGINE, [1.0])["latencies"][0]
    assert latency == pytest.approx(alone(1), abs=DT)


def test_newcomers_join_as_the_prefill_budget_admits_at_least_one_a_step():
    budget = dataclasses.replace(ENGINE, max_prefill_tokens=150)
    together = simulate(ENGINE, [0.0, 0.0], sizes=[(100, 64), (100, 64)])["latencies"]
    one_by_one = simulate(budget, [0.0, 0.0], sizes=[(100, 64), (100, 64)])["latencies"]
    assert together[0] == pytest.approx(together[1]) == pytest.approx(alone(2), abs=DT)
    assert one_by_one[1] - one_by_one[0] == pytest.approx(0.01 + 0.001, abs=1e-9)   # a step later, alone by then
    assert simulate(budget, [0.0], sizes=[(300, 64)])["latencies"][0] == pytest.approx(0.03 + 63 * 0.011, abs=DT)


def test_a_replay_gives_each_request_its_own_lengths():
    short, long = simulate(ENGINE, [0.0, 0.0], sizes=[(100, 2), (100, 64)])["latencies"]
    assert short == pytest.approx(2 * 100 * 0.0001 + 0.012, abs=DT) and long == pytest.approx(alone(2) - 62 * 0.001, abs=DT)


def test_a_full_batch_answers_at_the_64_sequence_pace_and_the_queue_beyond_it_is_bounded():
    burst = [0.0] * 200                   # 64 run, 64 wait, 72 refused
    s = simulate(ENGINE, burst)
    assert stats(s["latencies"])["refused"] == 200 - 128
    first = sorted(x for x in s["latencies"] if x is not None)[:64]
    assert first[0] == pytest.approx(alone(64), abs=DT) and first[-1] == pytest.approx(first[0])


def test_more_replicas_answer_an_overload_that_one_refuses():
    arrivals = poisson(lambda t: 2.5 * ENGINE.capacity_rps(), 120)
    one, three = (stats(simulate(ENGINE, arrivals, replicas=n)["latencies"]) for n in (1, 3))
    assert one["refused"] > 0 and three["refused"] == 0
    assert three["latency_p99_s"] < one["latency_p99_s"]


def test_both_routings_spread_requests_over_idle_replicas():
    for routing in ("round-robin", "least"):   # four at once on two replicas: two each
        s = simulate(ENGINE, [0.0] * 4, routing, replicas=2)
        assert all(x == pytest.approx(alone(2), abs=DT) for x in s["latencies"]), routing
    # three replicas: the second and third arrivals go to idle ones under both rules, the fourth
    # has to share (round-robin by turn, least-connections by a tie)
    arrivals = [0.0, 0.0, 0.1, 0.2]
    least = simulate(ENGINE, arrivals, "least", replicas=3)["latencies"]
    rr = simulate(ENGINE, arrivals, "round-robin", replicas=3)["latencies"]
    assert least[2] == pytest.approx(alone(1), abs=DT) and rr[2] == pytest.approx(alone(1), abs=DT)
    assert rr[3] > alone(1) + DT and least[3] > alone(1) + DT   # four on three: someone shares
    assert least[1] == pytest.approx(alone(1), abs=DT) and rr[1] == pytest.approx(alone(1), abs=DT)


def test_the_hpa_adds_pods_at_its_policy_rate_and_they_serve_after_start_up():
    hpa = Hpa(metric="llm_requests_waiting", min_replicas=1, max_replicas=8, target=4, up_window_s=0, down_window_s=300, up_pods=2,
              up_period_s=60, down_pods=1, down_period_s=120)
    arrivals = poisson(lambda t: 4 * ENGINE.capacity_rps(), 600)
    tl = simulate(ENGINE, arrivals, replicas=1, hpa=hpa)["timeline"]
    replicas = [p["replicas"] for p in tl]
    assert max(replicas) > 1
    added = [(b["t"], b["replicas"] - a["replicas"]) for a, b in zip([{"t": 0, "replicas": 1}, *tl], tl)]
    for t0, _ in added:                   # never more than 2 pods added within 60 s
        assert sum(n for t, n in added if t0 <= t < t0 + 60 and n > 0) <= 2
    first_up = next(p["t"] for p in tl if p["replicas"] > 1)
    ready_then = [p["ready"] for p in tl if first_up <= p["t"] < first_up + ENGINE.startup_s - HPA_SYNC_S]
    assert ready_then and max(ready_then) == 1    # the new pod is not ready before its start-up time


def test_the_hpa_scales_down_only_to_the_most_it_wanted_within_its_window():
    hpa = Hpa("llm_requests_waiting", 1, 8, 4, 0, 300, 2, 60, 1, 120)
    arrivals = poisson(lambda t: 4 * ENGINE.capacity_rps() if t < 300 else 0.05, 1200)
    tl = simulate(ENGINE, arrivals, replicas=1, hpa=hpa, horizon_s=1300)["timeline"]
    downs = [(a, b) for a, b in zip(tl, tl[1:]) if b["replicas"] < a["replicas"]]
    assert downs and tl[-1]["replicas"] < max(p["replicas"] for p in tl)
    for _, b in downs:
        wanted = max(p["desired"] for p in tl if b["t"] - 300 < p["t"] <= b["t"])
        assert b["replicas"] >= wanted
    for (_, b), (_, c) in zip(downs, downs[1:]):   # one pod per 120 s
        assert c["t"] - b["t"] >= 120 - HPA_SYNC_S


def test_the_planner_reads_the_deployed_hpa():
    spec = yaml.safe_load(HPA.read_text())["spec"]
    hpa = Hpa.from_manifest()
    assert (hpa.min_replicas, hpa.max_replicas) == (spec["minReplicas"], spec["maxReplicas"])
    assert hpa.target == float(spec["metrics"][0]["pods"]["target"]["averageValue"])
    assert hpa.metric == spec["metrics"][0]["pods"]["metric"]["name"]
    assert hpa.down_window_s == spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"]


def test_paced_users_send_at_the_asked_rate_each_a_period_apart():
    arrivals = paced_users(rate=8.0, users=64, duration_s=120, seed=3)
    assert len(arrivals) == pytest.approx(8.0 * 120, rel=0.05)
    assert arrivals == sorted(arrivals) and 0 <= arrivals[0] and arrivals[-1] < 120
    counts = [sum(1 for a in arrivals if lo <= a < lo + 8) for lo in range(8, 112, 8)]   # past the first period
    assert all(c == 64 for c in counts)


def test_poisson_arrivals_follow_the_rate():
    arrivals = poisson(lambda t: 2.0 if t < 500 else 10.0, 1000, seed=5)
    low, high = sum(a < 500 for a in arrivals), sum(a >= 500 for a in arrivals)
    assert low == pytest.approx(1000, rel=0.1) and high == pytest.approx(5000, rel=0.05)
    assert arrivals == sorted(arrivals)


def test_the_plan_runs_every_trace_and_routing_from_a_measurement(tmp_path):
    import json
    import subprocess
    import sys

    from loadtest.plan import ROOT
    measurement = tmp_path / "plan-measure.json"
    measurement.write_text(json.dumps({"engine": {"step_s": 0.01, "per_seq_s": 0.001, "per_prompt_token_s": 0.0001,
                                                  "startup_s": 60.0}, "requests": [[100, 64], [300, 32]]}))
    out = tmp_path / "plan"
    proc = subprocess.run([sys.executable, "-m", "loadtest.plan", "--measurement", str(measurement), "--minutes", "10",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "plan.json").read_text())
    assert {(r["trace"], r["routing"]) for r in report["rows"]} == {
        (t, r) for t in ("steady", "ramp", "burst", "diurnal") for r in ("least", "round-robin")}
    assert all(r["usd_per_1k_requests"] > 0 and r["max_replicas"] >= 1 for r in report["rows"])
    need = report["sizing"]["replicas"]["least"]
    assert need is not None and need >= 3          # 3x one replica's capacity at p99 <= 10 s
    assert (out / "plan.png").stat().st_size > 0


def test_validate_keeps_the_machine_that_measured(tmp_path):
    """plan validate refits a committed measurement, maybe elsewhere: its report names the machine
    the runs were measured on (settings.json's), not the one that validated them."""
    import json

    from loadtest.plan import CURVE_USERS, validate
    measured_on = {"cpu": "the measuring machine", "num_cores": 2, "git_sha": "abc"}
    (tmp_path / "settings.json").write_text(json.dumps({
        "machine": measured_on, "seconds": 10, "users_open_loop": 4, "startup_s": 20.0, "max_prefill_tokens": 256,
        "open": [{"fraction": 0.5, "rate_rps": 1.0}]}))
    def log(name: str, n: int, spacing_s: float) -> None:
        records = [{"name": "generate", "ok": True, "start": i * spacing_s, "latency_ms": 500.0 + 10 * (i % 3),
                    "prompt_tokens": 40 + 20 * (i % 2), "cached_prompt_tokens": 0, "output_tokens": 16,
                    "server_ttft_ms": 20.0 + 10 * (i % 2)} for i in range(n)]
        (tmp_path / f"{name}_requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for users in CURVE_USERS:
        log(f"curve-{users}", 8 * users, 0.5 / users)
    log("open-0.5", 10, 1.0)
    result = validate(tmp_path)
    assert result["machine"] == measured_on
    assert json.loads((tmp_path / "plan-measure.json").read_text())["machine"] == measured_on
