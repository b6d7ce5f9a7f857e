"""The load-test sweep: its recommendation rules on hand-built rows, then the smoke profile end to
end against a real TorchServe (small user and request counts, a few minutes on 2 cores), checking
every output file and that results.csv agrees with Locust's own stats CSV."""

import csv
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks.workload import TEMPLATES, WIKITEXT, PromptMix, load_articles, parse_tokens_spec
from loadtest.measure import percentile
from loadtest.report import baseline_ratio, recommend
from loadtest.server import wait_idle

ROOT = Path(__file__).resolve().parent.parent

NUM_USERS, NUM_REQUESTS = 8, 16
PLOTS = ("throughput.png", "latency_percentiles.png", "latency_histograms.png")


def row(batch_size: int, requests_per_s: float, p99_ms: float, num_failures: int = 0) -> dict:
    return {"label": "llm", "batch_size": batch_size, "max_batch_delay_ms": 50, "config": f"llm_b{batch_size}_d50",
            "requests_per_s": requests_per_s, "output_tokens_per_s": 64 * requests_per_s,
            "latency_p99_ms": p99_ms, "num_failures": num_failures}


def test_percentile_uses_locusts_rank_rule():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 51 and percentile(values, 0.99) == 100 and percentile(values, 1.0) == 100
    assert percentile([3.0], 0.95) == 3.0 and percentile([], 0.5) is None


def test_prompt_mix_is_seeded_and_bounded():
    articles = load_articles(WIKITEXT / "valid.txt")
    assert articles and all(len(a.split()) == 200 and "@" not in a for a in articles)

    def bodies(seed: int) -> list[dict]:
        mix = PromptMix(seed, articles, parse_tokens_spec("16-256"))
        return [getattr(mix, template)() for template in TEMPLATES * 10]
    assert bodies(1) == bodies(1) != bodies(2)
    assert all(16 <= b["max_new_tokens"] <= 256 for b in bodies(3))
    with pytest.raises(ValueError, match="1 <= LOW <= HIGH"):
        parse_tokens_spec("256-16")


def test_a_paced_user_keeps_its_own_start_and_does_not_catch_up():
    from loadtest.pacing import Pacing
    early, late = Pacing(period=10.0, start=1.0), Pacing(period=10.0, start=7.0)
    # the first requests at their starts answered in 2 s: the second ones a period after each start
    assert (early.wait(now=3.0), late.wait(now=9.0)) == (8.0, 8.0)
    # an answer later than the period: the next at once, then a period from then, no burst to catch up
    assert late.wait(now=40.0) == 0.0 and late.wait(now=41.0) == 9.0


def gauges_server(pages: list[str]):
    """A metrics endpoint on loopback that answers pages[0], pages[1], ... then the last for ever."""
    served = []

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self):
            body = pages[min(len(served), len(pages) - 1)].encode()
            served.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, served


def test_wait_idle_waits_until_nothing_runs_or_waits():
    """The real counterpart: the planner's and the tiers' runs between Locust runs (a real TorchServe)."""
    def page(running: int, waiting: int) -> str:
        return (f'llm_requests_running{{Level="Model",model_name="llm"}} {running}.0\n'
                f'llm_requests_waiting{{Level="Model",model_name="llm"}} {waiting}.0\n')
    server, served = gauges_server(["", page(3, 0), page(0, 2), page(0, 0)])   # no gauges yet, then busy, then idle
    try:
        start = time.monotonic()
        wait_idle(SimpleNamespace(metrics_url=f"http://127.0.0.1:{server.server_port}"), timeout_s=30)
        assert len(served) == 4 and time.monotonic() - start >= 3
        busy, _ = gauges_server([page(1, 0)])
        with pytest.raises(TimeoutError, match="still in the engine"):
            wait_idle(SimpleNamespace(metrics_url=f"http://127.0.0.1:{busy.server_port}"), timeout_s=1.5)
        busy.shutdown()
    finally:
        server.shutdown()


def test_recommendation_is_fastest_within_target_without_failures():
    rows = [row(1, 0.2, 5_000), row(4, 0.6, 9_000), row(16, 1.0, 30_000), row(64, 2.0, 8_000, num_failures=3)]
    best, text = recommend(rows, p99_target_ms=10_000)
    assert best["batch_size"] == 4 and "batch 4" in text
    best, text = recommend(rows, p99_target_ms=1_000)
    assert best is None and "No configuration meets p99 <= 1 s" in text and "5.00 s" in text
    fastest, baseline, text = baseline_ratio(rows)
    assert (fastest["batch_size"], baseline["batch_size"]) == (16, 1) and "5.00x the requests/s" in text


def locust_rounding_ms(ms: float) -> float:
    """Half the bucket Locust rounds a response time into (exact below 100 ms, then 2 digits)."""
    return 0.5 if ms < 100 else 5 if ms < 1000 else 50 if ms < 10_000 else 500


@pytest.mark.e2e
def test_quick_profile_end_to_end(tmp_path):
    if not (ROOT / "model_store" / "llm.mar").is_file():
        pytest.skip("no model_store/llm.mar: run make mar")
    cmd = [sys.executable, str(ROOT / "loadtest" / "sweep.py"), "--profile", "smoke", "--users", str(NUM_USERS),
           "--requests", str(NUM_REQUESTS), "--max-new-tokens", "16", "--port", "18190", "--run-id", "test",
           "--results-dir", str(tmp_path), "--p99-target-ms", "600000"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    run_dir = tmp_path / "test"
    assert Path(last["run_dir"]) == run_dir and (tmp_path / "latest").resolve() == run_dir.resolve()

    for name in ("results.csv", "summary.md", *PLOTS):
        assert (run_dir / name).stat().st_size > 0, name
    summary = (run_dir / "summary.md").read_text()
    assert "x the requests/s" in summary and "Recommended (p99 <= 600 s" in summary and "torchserve: 0.12" in summary

    with open(run_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["config"] for r in rows] == ["llm_b1_d50", "llm_b4_d50"]
    for r in rows:
        prefix = run_dir / "raw" / r["config"]
        for suffix in ("_stats.csv", "_stats_history.csv", "_failures.csv", "_requests.jsonl", "_locust.log"):
            assert Path(f"{prefix}{suffix}").is_file(), f"{prefix}{suffix}"
        client = json.loads(Path(f"{prefix}_client.json").read_text())   # the load generator's share of the cores
        assert 0 < client["locust_cpu_s"] and 0 < client["wall_s"]
        with open(f"{prefix}_stats.csv", newline="") as f:
            (locust,) = [s for s in csv.DictReader(f) if s["Type"] == "POST" and s["Name"] == "generate"]
        assert int(r["num_requests"]) == int(locust["Request Count"]) == NUM_REQUESTS
        assert int(r["num_failures"]) == int(locust["Failure Count"]) == 0, r["errors"]
        for ours, theirs in (("latency_p50_ms", "50%"), ("latency_p95_ms", "95%"), ("latency_p99_ms", "99%")):
            ours_ms, locust_ms = float(r[ours]), float(locust[theirs])
            assert abs(ours_ms - locust_ms) <= locust_rounding_ms(locust_ms) + 0.1, (r["config"], ours, ours_ms, locust_ms)
        assert float(r["latency_max_ms"]) == pytest.approx(float(locust["Max Response Time"]), abs=0.1)
        assert float(r["mean_output_tokens"]) == pytest.approx(float(locust["Average Content Size"]), abs=0.1)
        assert float(r["requests_per_s"]) == pytest.approx(float(locust["Requests/s"]), rel=0.1)
        assert 1 <= float(r["mean_server_batch_size"]) <= min(int(r["batch_size"]), NUM_USERS)
        assert float(r["peak_worker_rss_mb"]) > 100
        assert float(r["usd_per_1k_requests"]) > 0 and r["meets_p99_target"] in ("True", "False")
    assert float(rows[0]["mean_server_batch_size"]) == 1
    # the ratio is the fastest row's requests/s over batch size 1's, as results.csv has them
    best = max(rows, key=lambda r: float(r["requests_per_s"]))
    ratio = float(best["requests_per_s"]) / float(rows[0]["requests_per_s"])
    assert last["best_config"] == best["config"] and last["best_vs_batch1_requests_ratio"] == pytest.approx(ratio, abs=1e-3)
    assert f"{ratio:.2f}x the requests/s" in summary
    assert all(r["git_sha"] and r["cpu"] and r["torchserve"].startswith("0.12") for r in rows)
