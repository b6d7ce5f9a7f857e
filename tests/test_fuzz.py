"""Fuzz: seeded malformed bodies sent 16 at a time beside good requests against a real TorchServe
(an fp32 archive, so a greedy answer does not depend on its batch-mates). Every malformed body
must get a 4xx with a JSON body naming the field, every good request 200 with the text it gives
alone, and the worker must not restart. FUZZ_BODIES sets how many bodies (default 160, for `make
test`); `make fuzz` sends thousands and writes FUZZ_REPORT (metrics/fuzz.json)."""

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from scripts.serve import ROOT, TorchServeProcess

pytestmark = pytest.mark.e2e
MODEL = "llm-fp32"
VALID = {"prompt": "Tell me about the sea.", "max_new_tokens": 4}
GOOD = [
    {"prompt": "The capital of France is", "max_new_tokens": 12},
    {"messages": [{"role": "user", "content": "Name three colours."}], "max_new_tokens": 16},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! ¿Qué tal? 你好"}],
     "max_new_tokens": 10, "stop": ["\n\n"]},
    {"prompt": "1, 2, 3, 4,", "max_new_tokens": 16, "temperature": 0.7, "seed": 7},
    {"prompt": "1, 2, 1, 2, 1, 2,", "max_new_tokens": 12, "repetition_penalty": 1.3, "presence_penalty": 0.5,
     "frequency_penalty": -0.5, "logit_bias": {"28": -5, "30": 2.5}},
    {"prompt": "Colours: red, green,", "max_new_tokens": 12, "temperature": 0.9, "min_p": 0.1, "seed": 3},
    {"prompt": [504, 3458, 282, 4649, 314], "max_new_tokens": 8},   # token ids
]

# (field, values that are wrong for it): types, extremes and odd text; each makes the body invalid
WRONG = {
    "prompt": [42, 1.5, None, True, [], {}, ["a"], "", "\ud800", "ok \udfff", "\udc00\ud800", "word " * 3000,
               [-1], [10**9], [1.5], [True], [[1]], [1] * 3000],
    "messages": ["hi", [], [1], [{"role": "user"}], [{"role": "bot", "content": "x"}],
                 [{"role": "user", "content": 5}], [{"role": "user", "content": "\ud834"}],
                 [{"role": "user", "content": "x", "name": "n"}], [{"role": ["user"], "content": "x"}]],
    "max_new_tokens": [0, -1, 10**6, 10**30, 1.0, 1e400, "8", None, True, [8]],
    "temperature": [-1, -1e-300, 1e400, -1e400, float("nan"), "hot", None, [1]],
    "top_p": [0, -0.5, 1.0000001, 1e400, float("nan"), "1", None],
    "top_k": [-1, 10**30, 2**63, 1.5, "5", None],
    "seed": [-1, 2**64, 10**40, 1.5, "7", [1]],
    "stop": [5, [5], [""], "", ["a"] * 9, ["\ud800"], "\udfff", {"s": 1}],
    "stream": ["yes", 1, None, []],
    "min_p": [-0.1, 1.5, 1e400, float("nan"), "0.1", None],
    "stop_token_ids": [5, "5", [-1], [2**40], [1.0], [True], [None], list(range(65)), {"a": 1}],
    "presence_penalty": [2.5, -3, 1e400, float("nan"), "1", None, [1]],
    "frequency_penalty": [-2.5, 3, -1e400, float("nan"), False],
    "repetition_penalty": [0, -1, 1e400, float("nan"), "1.2", None],
    "logit_bias": [[1], "a", 5, {"x": 1}, {"-5": 1}, {"99999999": 1}, {"5": 101}, {"5": "1"}, {"5": True},
                   {"5": None}, {"\ud800": 1}, {"\u0665": 1}],
    "response_format": ["json", 5, {"type": "xml"}, {"type": "json_schema"}, {"type": "json_object", "x": 1},
                        *({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}} for schema in (
                            {"type": "array"}, {"type": "object", "$defs": [1]}, {"type": "object", "required": [[1]]},
                            {"type": "object", "properties": {"a": {"$ref": {}}}},
                            {"type": "object", "properties": {"a": {"anyOf": []}}}))],
    "prediction": [5, ["a"], {"type": "content", "content": "x"}, "\ud800", "word " * 3000],
}


def dumps(body) -> bytes:
    return json.dumps(body).encode()   # ensure_ascii: a lone surrogate travels as a \\udXXX escape


def bad_body(rng: random.Random) -> tuple[str, bytes]:
    """(kind, body bytes) of a body that is invalid by construction."""
    kind = rng.choice(["wrong_value", "unknown_field", "byte_corruption", "truncated", "deep_nesting",
                       "not_an_object", "empty", "prompt_and_messages"])
    if kind == "wrong_value":
        field = rng.choice(sorted(WRONG))
        base = {"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 4} if field == "messages" else dict(VALID)
        return kind, dumps({**base, field: rng.choice(WRONG[field])})
    if kind == "unknown_field":
        name = rng.choice(["n", "tools", "colour", "max_tokens", "\u202eevil", "emoji\U0001F600", "nul\u0000", "\ud800"])
        return kind, dumps({**VALID, name: rng.choice([1, "x", None, [], {"a": [1]}])})
    if kind == "byte_corruption":
        raw = bytearray(dumps(VALID))
        for _ in range(rng.randint(1, 4)):       # bytes that never occur in UTF-8
            raw.insert(rng.randrange(len(raw) + 1), rng.choice([0xFF, 0xFE, 0xC0, 0xC1, 0xF5]))
        return kind, bytes(raw)
    if kind == "truncated":
        raw = dumps(rng.choice([VALID, GOOD[1]]))
        return kind, raw[:rng.randrange(1, len(raw))]   # a proper prefix of an object is never JSON
    if kind == "deep_nesting":
        depth = rng.choice([100, 5000, 100000])
        inner = "[" * depth + "]" * depth
        return kind, rng.choice([inner, '{"prompt": ' + inner + "}"]).encode()
    if kind == "not_an_object":
        return kind, rng.choice([b"[]", b'"text"', b"42", b"null", b"true", b'"\\ud800"', b"[{}]", b"1e400"])
    if kind == "empty":
        return kind, rng.choice([b"", b" ", b"\n\t", b"{}"])
    return kind, dumps({**VALID, "messages": [{"role": "user", "content": "x"}]})


def post(url: str, data: bytes) -> tuple[int | str, dict | None]:
    """(status, JSON body or None); a reset connection is ("reset: ...", None)."""
    try:
        r = requests.post(url, data=data, headers={"Content-Type": "application/json"}, timeout=120)
    except requests.RequestException as e:
        return f"reset: {type(e).__name__}", None
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (ROOT / "model_store" / "llm.mar").is_file():
        pytest.skip("model_store/llm.mar missing: run make mar")
    subprocess.run([sys.executable, str(ROOT / "scripts/build_mar.py"), "--name", MODEL, "--set", "quantization=fp32",
                    "--set", "max_num_seqs=32", "--batch-size", "32"], check=True, capture_output=True)
    ts = TorchServeProcess(tmp_path_factory.mktemp("ts-fuzz"), port=18180, models=f"{MODEL}={MODEL}.mar")
    try:
        yield ts.start()
    finally:
        ts.stop()


def workers(server) -> list[tuple]:
    described = requests.get(f"{server.management_url}/models/{MODEL}", timeout=10).json()[0]["workers"]
    return [(w["id"], w["pid"], w["startTime"]) for w in described]


def test_malformed_bodies_never_harm_good_requests(server):
    url = f"{server.inference_url}/predictions/{MODEL}"
    num_bodies = int(os.environ.get("FUZZ_BODIES", "160"))
    rng = random.Random(int(os.environ.get("FUZZ_SEED", "0")))
    bodies = [bad_body(rng) for _ in range(num_bodies)]
    alone = [post(url, dumps(g))[1]["text"] for g in GOOD]
    before = workers(server)

    finished = threading.Event()
    good_failures, num_good = [], Counter()
    def keep_good_ones_running(i: int) -> None:   # good requests in flight for the whole run
        while not finished.is_set():
            status, out = post(url, dumps(GOOD[i]))
            num_good[i] += 1
            if status != 200 or out["text"] != alone[i]:
                good_failures.append((GOOD[i], status, out))
    bad_failures, kinds = [], Counter()
    def send_bad(item: tuple[str, bytes]) -> None:
        kind, data = item
        kinds[kind] += 1
        status, out = post(url, data)
        if not (isinstance(status, int) and 400 <= status < 500 and isinstance(out, dict) and {"error", "field"} <= set(out)):
            bad_failures.append((kind, data[:200], status, out))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(GOOD)) as good_pool:
        good = [good_pool.submit(keep_good_ones_running, i) for i in range(len(GOOD))]
        time.sleep(0.5)                           # the good ones are decoding now
        with ThreadPoolExecutor(16) as bad_pool:
            list(bad_pool.map(send_bad, bodies))
        finished.set()
        for f in good:
            f.result()
    after = workers(server)

    report = {"bodies": num_bodies, "kinds": dict(kinds), "bad_failures": len(bad_failures),
              "good_requests": sum(num_good.values()), "good_failures": len(good_failures),
              "workers_restarted": before != after, "seconds": round(time.perf_counter() - t0, 1)}
    if os.environ.get("FUZZ_REPORT"):
        with open(os.environ["FUZZ_REPORT"], "w") as f:
            json.dump({**report, "examples": [repr(b) for b in bad_failures[:20]]}, f, indent=1)
    print(json.dumps(report))
    assert not bad_failures, bad_failures[:10]
    assert not good_failures, good_failures[:5]
    assert before == after, (before, after)
    assert all(num_good[i] >= 1 for i in range(len(GOOD)))
