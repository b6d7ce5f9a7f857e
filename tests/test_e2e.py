"""End to end: a real TorchServe on loopback with the real archive and the real model. One
archive, llm.mar, is served twice: as "llm" (its model-config.yaml: continuous batching) and,
registered through the management API with handler=llm_handler:request_level, as "llm-rl".
Traffic goes to 127.0.0.1 only, in bounded numbers."""

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from scripts.serve import ROOT, TorchServeProcess, wait_ready

pytestmark = pytest.mark.e2e
FRANCE = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_new_tokens": 24}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (ROOT / "model_store" / "llm.mar").is_file():
        pytest.skip("model_store/llm.mar missing: run make mar")
    ts = TorchServeProcess(tmp_path_factory.mktemp("ts"), port=18080, models="llm=llm.mar")
    ts.start()
    try:
        r = requests.post(f"{ts.management_url}/models?url=llm.mar&model_name=llm-rl"
                          "&handler=llm_handler:request_level&initial_workers=1&synchronous=true", timeout=300)
        assert r.status_code == 200, r.text
        wait_ready(ts.management_url, "llm-rl", timeout=300)
        yield ts
    finally:
        ts.stop()


def post(server, body, model="llm", **kw) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(f"{server.inference_url}/predictions/{model}", data=data,
                         headers={"Content-Type": "application/json"}, timeout=300, **kw)


@pytest.mark.parametrize("model", ["llm", "llm-rl"])
def test_capital_of_france(server, model):
    r = post(server, FRANCE, model)
    assert r.status_code == 200, r.text
    out = r.json()
    assert "Paris" in out["text"]
    assert out["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] > 0 and out["usage"]["prompt_tokens"] > 10
    assert out["timings"]["batch_size"] >= 1 and out["timings"]["prefill_ms"] > 0


@pytest.mark.parametrize("model", ["llm", "llm-rl"])
def test_concurrent_requests_are_batched(server, model):
    prompts = [{"prompt": f"Count from {i} to {i + 20}:", "max_new_tokens": 32} for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda b: post(server, b, model), prompts))
    assert [r.status_code for r in responses] == [200] * 8
    sizes = [r.json()["timings"]["batch_size"] for r in responses]
    assert max(sizes) > 1, sizes


BAD = [
    (b"{not json", "body"),
    (b"", "body"),
    ({"max_new_tokens": 5}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": 100000}, "max_new_tokens"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "colour": "red"}, "colour"),
    ({"prompt": "word " * 3000}, "prompt"),
    (b'{"prompt": "\xff\xfe"}', "body"),
]


@pytest.mark.parametrize("model", ["llm", "llm-rl"])
def test_bad_inputs_do_not_harm_a_good_request(server, model):
    alone = post(server, FRANCE, model).json()["text"]
    with ThreadPoolExecutor(len(BAD) + 1) as pool:
        good = pool.submit(post, server, FRANCE, model)
        bad = [pool.submit(post, server, body, model) for body, _ in BAD]
        good, bad = good.result(), [f.result() for f in bad]
    assert good.status_code == 200 and good.json()["text"] == alone
    for (body, field), r in zip(BAD, bad):
        assert r.status_code == 400, (body, r.status_code, r.text)
        assert r.json()["field"] == field and r.json()["error"]


def test_a_lone_surrogate_beside_running_requests(server):
    """Issue 18's reproduction: eight chat requests decoding, then a body that JSON can carry but
    UTF-8 cannot. It used to fail the whole step (503) and reset all eight connections."""
    bodies = [{"messages": [{"role": "user", "content": f"Tell me something about the number {i}."}],
               "max_new_tokens": 48} for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        good = [pool.submit(post, server, b) for b in bodies]
        time.sleep(1.0)                              # the eight are decoding now
        bad = post(server, '{"prompt": "\\ud800", "max_new_tokens": 4}')
        good = [f.result() for f in good]
    assert bad.status_code == 400 and bad.json()["field"] == "prompt", bad.text
    assert [r.status_code for r in good] == [200] * 8
    for r in good:
        out = r.json()
        assert out["text"] and (out["finish_reason"] == "stop" or out["usage"]["completion_tokens"] == 48)


def stream(server, body, model="llm") -> list[tuple[float, dict]]:
    """(arrival time, part) for each streamed JSON line."""
    parts = []
    with post(server, {**body, "stream": True}, model, stream=True) as r:
        assert r.status_code == 200 and r.headers.get("Transfer-Encoding") == "chunked"
        for line in r.iter_lines():
            if line:
                parts.append((time.perf_counter(), json.loads(line)))
    return parts


@pytest.mark.parametrize("model", ["llm", "llm-rl"])
def test_streaming_parts_arrive_incrementally(server, model):
    body = {"messages": [{"role": "user", "content": "Write a long story about a dragon."}], "max_new_tokens": 64}
    whole = post(server, body, model).json()
    t0 = time.perf_counter()
    parts = stream(server, body, model)
    assert len(parts) > 10
    assert "".join(p["text"] for _, p in parts) == whole["text"]
    last = parts[-1][1]
    assert last["finish_reason"] == whole["finish_reason"] and last["usage"] == whole["usage"]
    assert "ttft_ms" in last["timings"]
    first_at, last_at = parts[0][0] - t0, parts[-1][0] - t0
    assert first_at < 0.5 * last_at, (first_at, last_at)


def test_many_concurrent_streams(server):
    # bf16 results depend slightly on batch shape, so each stream is checked against itself
    bodies = [{"messages": [{"role": "user", "content": f"List {n + 2} animals."}], "max_new_tokens": 24 + 4 * n}
              for n in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda b: stream(server, b), bodies))
    for body, parts in zip(bodies, results):
        last = parts[-1][1]
        assert len(parts) > 2 and all("finish_reason" not in p for _, p in parts[:-1])
        assert "".join(p["text"] for _, p in parts).strip()
        assert last["finish_reason"] in ("stop", "length")
        assert last["usage"]["completion_tokens"] <= body["max_new_tokens"]
    assert max(parts[-1][1]["timings"]["batch_size"] for parts in results) > 1


def join_busy_batch(server, model) -> tuple[float, list[float], list]:
    """Three long requests decoding, then a short streamed one: (its first token's time, the
    long ones' ends, its parts)."""
    long_body = {"prompt": "Count from 1 to 1000: 1, 2, 3, 4,", "max_new_tokens": 200}   # greedy: counts on
    ends = []
    def run_long():
        r = post(server, long_body, model)
        assert r.json()["usage"]["completion_tokens"] == 200, r.text
        ends.append(time.perf_counter())
    threads = [threading.Thread(target=run_long) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.5)                                  # the long requests are decoding now
    parts = stream(server, {"messages": [{"role": "user", "content": "Say hi."}], "max_new_tokens": 8}, model)
    for t in threads:
        t.join()
    assert len(ends) == 3
    return parts[0][0], sorted(ends), parts


def test_joining_a_busy_batch_gets_its_first_token_early(server):
    first_token_at, ends, parts = join_busy_batch(server, "llm")
    assert first_token_at < ends[0]                  # before any long request is done
    assert parts[-1][1]["timings"]["batch_size"] > 1


def test_request_level_newcomer_waits_for_the_busy_batch(server):
    # the long ones may have formed one batch or two; either way the newcomer starts once one is over
    first_token_at, ends, parts = join_busy_batch(server, "llm-rl")
    assert first_token_at > ends[0]


def test_client_disconnect_frees_its_slot(server):
    # a stream that would run for 1,000 tokens; its own pace tells how long the rest would take,
    # and the slot must be free in well under that (it would not be if abort did nothing)
    body = {"prompt": "Once upon a time", "max_new_tokens": 1000, "ignore_eos": True, "stream": True}
    with post(server, body, "llm", stream=True) as r:
        lines = r.iter_lines()
        next(lines)
        t0 = time.perf_counter()
        num_parts = sum(1 for _, line in zip(range(20), lines) if line)
        rest_s = (1000 - num_parts - 1) / (num_parts / (time.perf_counter() - t0))
    hung_up = time.perf_counter()
    while post(server, FRANCE, "llm").json()["timings"]["batch_size"] > 1:
        assert time.perf_counter() - hung_up < 0.5 * rest_s, "a disconnected stream kept its slot"
    assert time.perf_counter() - hung_up < 0.5 * rest_s


def test_scale_workers_of_a_classic_archive(server):
    # TorchServe 0.12's ContinuousBatching stalls a busy worker while another waits for work (the
    # idle one holds the model's queue lock), so several workers need the classic archive
    subprocess.run([sys.executable, str(ROOT / "scripts/build_mar.py"), "--name", "llm-classic",
                    "--no-continuous-batching", "--set", "batching=request_level"], check=True, capture_output=True)
    url = f"{server.management_url}/models/llm-classic"
    r = requests.post(f"{server.management_url}/models?url=llm-classic.mar&initial_workers=1&synchronous=true",
                      timeout=300)
    assert r.status_code == 200, r.text
    try:
        r = requests.put(f"{url}?min_worker=2&synchronous=true", timeout=300)
        assert r.status_code == 200, r.text
        wait_ready(server.management_url, "llm-classic", timeout=300)
        assert len(requests.get(url, timeout=10).json()[0]["workers"]) == 2
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda _: post(server, FRANCE, "llm-classic"), range(4)))
        assert all(r.status_code == 200 and "Paris" in r.json()["text"] for r in responses)
        parts = stream(server, FRANCE, "llm-classic")
        assert len(parts) > 2 and "Paris" in "".join(p["text"] for _, p in parts)
    finally:
        requests.delete(url, timeout=60)


def test_register_int8_variant(server):
    subprocess.run([sys.executable, str(ROOT / "scripts/build_mar.py"), "--name", "llm-int8",
                    "--set", "quantization=int8", "--set", "max_num_seqs=4", "--batch-size", "4"], check=True, capture_output=True)
    r = requests.post(f"{server.management_url}/models?url=llm-int8.mar&model_name=llm-int8"
                      "&initial_workers=1&synchronous=true", timeout=300)
    assert r.status_code == 200, r.text
    try:
        out = post(server, FRANCE, "llm-int8")
        assert out.status_code == 200 and "Paris" in out.json()["text"], out.text
        names = [m["modelName"] for m in requests.get(f"{server.management_url}/models", timeout=10).json()["models"]]
        assert {"llm", "llm-int8"} <= set(names)
    finally:
        requests.delete(f"{server.management_url}/models/llm-int8", timeout=60)


def test_metrics_are_prometheus(server):
    r = requests.get(f"{server.metrics_url}/metrics", timeout=10)
    assert r.status_code == 200 and "ts_inference_requests_total" in r.text


def test_token_authorization_switch(tmp_path):
    ts = TorchServeProcess(tmp_path, port=18090, models="", env={"TS_DISABLE_TOKEN_AUTHORIZATION": "false"})
    ts.start()
    try:
        keys, deadline = None, time.monotonic() + 60
        while keys is None and time.monotonic() < deadline:
            try:
                keys = json.loads((tmp_path / "key_file.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):   # not written yet
                time.sleep(0.5)
        refused = requests.get(f"{ts.management_url}/models", timeout=10)
        assert refused.status_code in (400, 401), refused.status_code
        allowed = requests.get(f"{ts.management_url}/models", timeout=10,
                               headers={"Authorization": f"Bearer {keys['management']['key']}"})
        assert allowed.status_code == 200
    finally:
        ts.stop()
