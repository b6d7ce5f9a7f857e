"""End to end: a real TorchServe on loopback with the real archive and the real model. One
archive, llm.mar, is served twice: as "llm" (its model-config.yaml: continuous batching) and,
registered through the management API with handler=llm_handler:request_level, as "llm-rl".
Traffic goes to 127.0.0.1 only, in bounded numbers."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from llmserve.json_mode import Grammar
from scripts.serve import ROOT, TorchServeProcess, newer_source, wait_ready

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


def post(server, body, model="llm", headers: dict | None = None, **kw) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(f"{server.inference_url}/predictions/{model}", data=data,
                         headers={"Content-Type": "application/json", **(headers or {})}, timeout=300, **kw)


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


def stream(server, body, model="llm", started: threading.Event | None = None) -> list[tuple[float, dict]]:
    """(arrival time, part) for each streamed JSON line; `started` is set at the first."""
    parts = []
    with post(server, {**body, "stream": True}, model, stream=True) as r:
        assert r.status_code == 200 and r.headers.get("Transfer-Encoding") == "chunked"
        for line in r.iter_lines():
            if line:
                parts.append((time.perf_counter(), json.loads(line)))
                if started is not None:
                    started.set()
    return parts


@pytest.mark.parametrize("model", ["llm", "llm-rl"])
def test_streaming_parts_arrive_incrementally(server, model):
    body = {"messages": [{"role": "user", "content": "Write a long story about a dragon."}], "max_new_tokens": 64}
    # its full blocks into the prefix cache first: then the two below prefill alike (a miss and a
    # hit round differently, and a near tie may then fork their answers)
    post(server, {**body, "max_new_tokens": 1}, model)
    whole = post(server, body, model).json()
    t0 = time.perf_counter()
    parts = stream(server, body, model)
    # one part per handle() call, each with the tokens of its steps (up to 5 a step where the prompt
    # lookup's drafts are kept): how many depends on the machine's speed, so only several are asked
    assert len(parts) > 3
    assert "".join(p["text"] for _, p in parts) == whole["text"]
    last = parts[-1][1]
    assert last["finish_reason"] == whole["finish_reason"] and last["usage"] == whole["usage"]
    assert last["usage"]["cached_prompt_tokens"] == (last["usage"]["prompt_tokens"] - 1) // 16 * 16 > 0
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
    """Three long requests decoding, then a short streamed one as soon as the first long one has
    its first token (a fixed wait let a fast machine finish them first): (its first token's time,
    the long ones' ends, its parts)."""
    long_body = {"prompt": "Count from 1 to 1000: 1, 2, 3, 4,", "max_new_tokens": 200}   # greedy: counts on
    ends, decoding = [], threading.Event()
    def run_long():
        parts = stream(server, long_body, model, started=decoding)
        assert parts[-1][1]["usage"]["completion_tokens"] == 200, parts[-1]
        ends.append(time.perf_counter())
    threads = [threading.Thread(target=run_long) for _ in range(3)]
    for t in threads:
        t.start()
    assert decoding.wait(120)
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
    # compile=false: two workers start in half the time; the compiled step is tested on "llm".
    # 8 rows: two more workers with the default prefaulted 6 GB cache beside the server's two would fill 24 GB
    subprocess.run([sys.executable, str(ROOT / "scripts/build_mar.py"), "--name", "llm-classic",
                    "--no-continuous-batching", "--set", "batching=request_level", "--set", "compile=false",
                    "--set", "max_num_seqs=8"],
                   check=True, capture_output=True)
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


def openai_client(server, model="llm", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.inference_url}/predictions/{model}/1.0/v1", api_key=kw.pop("api_key", "-"),
                         max_retries=0, timeout=300, **kw)


def test_openai_client_plain_and_streamed(server, tokenizer, person_model, meeting_model):
    client = openai_client(server)
    messages = FRANCE["messages"]
    plain = client.chat.completions.create(model="llm", messages=messages, max_tokens=24)
    assert "Paris" in plain.choices[0].message.content and plain.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="llm", messages=messages, max_tokens=24, stream=True,
                                                 stream_options={"include_usage": True}, logprobs=True,
                                                 top_logprobs=3))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert len(tokens) == plain.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in tokens)
    # the Responses API: the chat's answer, whole and as typed events
    answer = client.responses.create(model="llm", input=messages[0]["content"], max_output_tokens=24)
    assert answer.status == "completed" and answer.output_text == plain.choices[0].message.content
    events = list(client.responses.create(model="llm", input=messages[0]["content"], max_output_tokens=24, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == answer.output_text
    assert events[-1].type == "response.completed" and events[-1].response.usage.output_tokens == answer.usage.output_tokens
    # predicted outputs: the answer again, drafted from itself, the same text
    predicted = client.chat.completions.create(model="llm", messages=messages, max_tokens=24, store=False,
                                               prediction={"type": "content", "content": plain.choices[0].message.content})
    assert predicted.choices[0].message.content == plain.choices[0].message.content
    details = predicted.usage.completion_tokens_details
    assert details.accepted_prediction_tokens >= predicted.usage.completion_tokens // 2
    text = client.completions.create(model="llm", prompt="The capital of France is", max_tokens=6).choices[0].text
    streamed = client.completions.create(model="llm", prompt="The capital of France is", max_tokens=6, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text and "Paris" in text
    assert [m.id for m in client.models.list()] == ["llm"]
    # n: the client's choices, seeded samples that differ, streamed by index
    sampled = dict(model="llm", messages=messages, max_tokens=12, n=2, temperature=1.0, seed=5,
                   extra_body={"ignore_eos": True})
    two = client.chat.completions.create(**sampled)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].message.content != two.choices[1].message.content
    assert two.usage.completion_tokens == 24 and all(c.finish_reason == "length" for c in two.choices)
    streamed = list(client.chat.completions.create(**sampled, stream=True))
    assert ["".join(c.choices[0].delta.content or "" for c in streamed if c.choices[0].index == i) for i in (0, 1)] \
        == [c.message.content for c in two.choices]
    # echo with max_tokens 0 (lm-eval's loglikelihood): the prompt scored, its last token as the model
    # predicts it after the rest
    scored = client.completions.create(model="llm", prompt="The capital of France is Paris", echo=True, logprobs=1,
                                       max_tokens=0).choices[0]
    assert scored.text == "The capital of France is Paris" and scored.logprobs.token_logprobs[0] is None
    after = client.completions.create(model="llm", prompt="The capital of France is", max_tokens=1, logprobs=1)
    assert after.choices[0].text == scored.logprobs.tokens[-1] == " Paris"
    assert scored.logprobs.token_logprobs[-1] == pytest.approx(after.choices[0].logprobs.token_logprobs[0], abs=1e-3)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="llm", messages=messages, n=0)
    assert e.value.body["param"] == "n"
    # JSON mode: an object that parses, streamed the same
    ask = dict(model="llm", max_tokens=96, response_format={"type": "json_object"},
               messages=[{"role": "user", "content": "Describe a cat as JSON with the fields name, age and colour."}])
    structured = client.chat.completions.create(**ask)
    assert structured.choices[0].finish_reason == "stop" and isinstance(json.loads(structured.choices[0].message.content), dict)
    assert "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask, stream=True)
                   if c.choices) == structured.choices[0].message.content
    # structured outputs: a schema's fields, in its order, of its types
    cat = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
           "colour": {"enum": ["black", "white", "ginger", "grey"]}, "indoor": {"type": "boolean"}},
           "required": ["name", "age", "colour", "indoor"], "additionalProperties": False}
    ask["response_format"] = {"type": "json_schema", "json_schema": {"name": "cat", "schema": cat, "strict": True}}
    answer = json.loads(client.chat.completions.create(**ask).choices[0].message.content)
    assert list(answer) == list(cat["properties"]) and answer["colour"] in cat["properties"]["colour"]["enum"]
    assert isinstance(answer["age"], int) and isinstance(answer["indoor"], bool) and isinstance(answer["name"], str)
    # the client's .parse() with a pydantic model: $defs, $ref and Optional (anyOf) in the schema it sends
    Person, schema = person_model
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    try:
        person = parse(model="llm", max_tokens=160, response_format=Person,
                       messages=[{"role": "user", "content": "Describe Ann, 31, who has a dog named Rex, as JSON."}])
        person = person.choices[0].message.parsed
        assert isinstance(person.name, str) and all(isinstance(pet.kind, str) for pet in person.pets)
    except openai.LengthFinishReasonError as e:          # a small model may list pets until the cut: a prefix
        grammar = Grammar(schema)
        assert grammar.feed(grammar.initial, e.completion.choices[0].message.content.encode()) is not None
    # ... a datetime, a pattern, float bounds, a dict, a tuple, a discriminated union
    Meeting, schema = meeting_model
    try:
        meeting = parse(model="llm", max_tokens=200, response_format=Meeting, messages=[{"role": "user", "content":
                        "The budget meeting is in room B12 on 2025-06-12 at 14:30 UTC; Ann and Bo voted 3 and 4, it "
                        "spans 2 to 3 hours, and Rex the dog barks there. Give it as JSON."}]).choices[0].message.parsed
        assert meeting.starts.year == 2025 and 0 <= meeting.confidence <= 1 and meeting.pet.kind in ("cat", "dog")
    except openai.LengthFinishReasonError as e:          # the small model fills the dict until the cut
        cut = e.completion.choices[0].message.content
        grammar = Grammar(schema)
        assert grammar.feed(grammar.initial, cut.encode()) is not None and '"room": "B12"' in cut
    # a forced tool call: the function named, its arguments of its parameters' schema
    weather = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                               "unit": {"enum": ["celsius", "fahrenheit"]}},
                              "required": ["city", "unit"]}}}
    called = client.chat.completions.create(model="llm", max_tokens=64, tools=[weather], tool_choice="required",
                                            messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    call = called.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and called.choices[0].message.content is None
    assert list(json.loads(call.function.arguments)) == ["city", "unit"]
    # "required" with two tools: the answer names one, with that one's arguments
    clock = {"type": "function", "function": {"name": "get_time", "description": "the time in a time zone",
             "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}},
                            "required": ["zone"]}}}
    called = client.chat.completions.create(model="llm", max_tokens=64, tools=[weather, clock], tool_choice="required",
                                            messages=[{"role": "user", "content": "What time is it in UTC?"}])
    call = called.choices[0].message.tool_calls[0]
    assert list(json.loads(call.function.arguments)) == {"get_weather": ["city", "unit"], "get_time": ["zone"]}[call.function.name]
    with pytest.raises(openai.BadRequestError) as e:      # "auto", the default with tools, needs a parser we lack
        client.chat.completions.create(model="llm", messages=messages, tools=[weather])
    assert e.value.body["param"] == "tool_choice"
    # penalties: OpenAI's two as the client's own arguments, vLLM's repetition_penalty in the body, as
    # the native API takes them (the same greedy text), and a repetitive answer changed by them
    prompt, penalties = "1, 2, 1, 2, 1, 2,", dict(frequency_penalty=1.0, presence_penalty=1.0)
    penalized = client.completions.create(model="llm", prompt=prompt, max_tokens=12, **penalties,
                                          extra_body={"repetition_penalty": 1.3}).choices[0].text
    native = post(server, {"prompt": prompt, "max_new_tokens": 12, "repetition_penalty": 1.3, **penalties})
    assert penalized == native.json()["text"] != client.completions.create(model="llm", prompt=prompt,
                                                                           max_tokens=12).choices[0].text
    # logit_bias: -100 on " Paris" (its token ids) keeps it out of the answer
    banned = {str(t): -100 for t in tokenizer(" Paris")["input_ids"]}
    other = client.completions.create(model="llm", prompt="The capital of France is", max_tokens=6, logit_bias=banned)
    assert "Paris" not in other.choices[0].text
    # stop_token_ids (vLLM's, in the body): the answer ends at " Paris", which it keeps
    stopped = client.completions.create(model="llm", prompt="The capital of France is", max_tokens=6,
                                        extra_body={"stop_token_ids": tokenizer(" Paris")["input_ids"]}).choices[0]
    assert len(tokenizer(" Paris")["input_ids"]) == 1 and stopped.finish_reason == "stop"
    assert stopped.text.endswith(" Paris") and text.startswith(stopped.text)
    # min_p (vLLM's, in the body): 1.0 keeps only the likeliest token, so sampling at temperature 1 is greedy
    assert client.completions.create(model="llm", prompt="The capital of France is", max_tokens=6, temperature=1.0,
                                     extra_body={"min_p": 1.0}).choices[0].text == text
    with requests.post(f"{server.inference_url}/predictions/llm/1.0/v1/completions", stream=True, timeout=60,
                       json={"model": "llm", "prompt": "Hi", "max_tokens": 30, "ignore_eos": True, "stream": True}) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.text.endswith("data: [DONE]\n\n")


def scrape(server) -> dict[str, float]:
    """Our metrics' samples, summed over their labels."""
    r = requests.get(f"{server.metrics_url}/metrics", timeout=10)
    assert r.status_code == 200 and "ts_inference_requests_total" in r.text
    totals: dict[str, float] = {}
    for line in r.text.splitlines():
        if line.startswith("llm_"):
            name, value = line.split("{")[0], float(line.rsplit(" ", 1)[1])
            totals[name] = totals.get(name, 0) + value
    return totals


def test_llm_metrics_move_under_load(server):
    chat = lambda i: {"messages": [{"role": "user", "content": f"Count to {i}"}], "max_new_tokens": 8}
    post(server, chat(9))            # the chat template's system prompt is in the prefix cache from here on
    before = scrape(server)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: post(server, chat(i)), range(4)))
    post(server, {"prompt": "hi", "top_p": 9})
    after = scrape(server)
    for name in ("llm_requests_total", "llm_time_to_first_token_seconds_count", "llm_e2e_request_latency_seconds_count",
                 "llm_queue_wait_seconds_count", "llm_time_per_output_token_seconds_count"):
        assert after[name] - before.get(name, 0) >= 4, name
    assert after["llm_generation_tokens_total"] - before.get("llm_generation_tokens_total", 0) >= 4
    assert after["llm_prompt_tokens_total"] - before.get("llm_prompt_tokens_total", 0) >= 4 * 3
    assert after["llm_prompt_tokens_cached_total"] - before.get("llm_prompt_tokens_cached_total", 0) >= 4 * 16
    assert {"llm_requests_running", "llm_requests_waiting", "llm_kv_cache_usage_ratio"} <= set(after)
    assert 'finish_reason="refused",status="400"' in requests.get(f"{server.metrics_url}/metrics", timeout=10).text


def test_tenants_rate_limits_and_chargeback_counters(server):
    """The archive's tenants: section through real HTTP headers: `trial` may send one request per
    5 s (its second is a 429 naming the limit), a bad X-Priority is a 400 naming the header, and
    the per-tenant counters carry what make chargeback reads."""
    hi = {"prompt": "Hello", "max_new_tokens": 4, "ignore_eos": True}
    first = post(server, hi, headers={"X-Tenant": "trial"})
    second = post(server, hi, headers={"x-tenant": "trial"})
    assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] == 4
    assert second.status_code == 429 and second.json()["field"] == "max_requests_per_s"
    assert 1 <= int(second.headers["Retry-After"]) <= 5
    bad = post(server, hi, headers={"X-Priority": "gold"})
    assert bad.status_code == 400 and bad.json()["field"] == "X-Priority"
    text = requests.get(f"{server.metrics_url}/metrics", timeout=10).text
    for sample in ('llm_tenant_requests_total{tenant="trial",tier="batch",status="200"',
                   'llm_tenant_requests_total{tenant="trial",tier="batch",status="429"',
                   'llm_tenant_generation_tokens_total{tenant="trial",tier="batch"',
                   'llm_tenant_engine_seconds_total{tenant="trial",tier="batch"'):
        assert sample in text, sample
    table = subprocess.run([sys.executable, "-m", "loadtest.chargeback", "--metrics-url", f"{server.metrics_url}/metrics"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    trial = next(t for t in json.loads(table.splitlines()[-1])["tenants"] if t["tenant"] == "trial")
    assert trial["num_ok"] == 1 and trial["num_limited"] == 1 and trial["output_tokens"] == 4 and trial["usd"] > 0


def test_overload_queue_wait_and_timeout(server):
    """One row, one waiting place, a queue wait of 1 s: the long request ends at its own timeout
    with its text so far; the waiting one gets 503 after 1 s; the rest are refused at once."""
    subprocess.run([sys.executable, str(ROOT / "scripts/build_mar.py"), "--name", "llm-tight", "--batch-size", "8",
                    "--set", "max_num_seqs=1", "--set", "max_waiting_requests=1", "--set", "max_queue_wait_s=1",
                    "--set", "compile=false"], check=True, capture_output=True)
    r = requests.post(f"{server.management_url}/models?url=llm-tight.mar&initial_workers=1&synchronous=true",
                      timeout=300)
    assert r.status_code == 200, r.text
    try:
        def timed(body):
            t0 = time.perf_counter()
            out = post(server, body, "llm-tight")
            return out, time.perf_counter() - t0
        assert post(server, {"prompt": "Hi", "max_new_tokens": 2}, "llm-tight").status_code == 200   # warm
        long = {"prompt": "Once upon a time", "max_new_tokens": 1000, "ignore_eos": True, "timeout_s": 3}
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(timed, long)
            time.sleep(0.5)
            waiting = pool.submit(timed, {"prompt": "Hi", "max_new_tokens": 4})
            time.sleep(0.2)
            refused = [pool.submit(timed, {"prompt": "Hi", "max_new_tokens": 4}) for _ in range(2)]
            (first, first_s), (waiting, waiting_s) = first.result(), waiting.result()
            refused = [f.result() for f in refused]
        out = first.json()
        assert first.status_code == 200 and out["finish_reason"] == "timeout" and out["text"], first.text
        assert 3 <= first_s < 6 and out["usage"]["completion_tokens"] < 1000
        assert waiting.status_code == 503 and "in the queue" in waiting.json()["error"]
        assert 1 <= waiting_s < first_s, (waiting_s, first_s)                 # it did not wait for the long one
        for r, seconds in refused:
            assert r.status_code == 503 and "overloaded" in r.json()["error"], r.text
            assert int(r.headers["Retry-After"]) >= 1 and seconds < 1.0
    finally:
        requests.delete(f"{server.management_url}/models/llm-tight", timeout=60)


def test_a_stale_archive_is_refused_before_a_server_starts(tmp_path):
    """An archive built before a change to the handler would be measured under the new git SHA."""
    mar = tmp_path / "llm.mar"
    mar.write_bytes(b"")
    os.utime(mar, (0, 0))                     # built before every source
    with pytest.raises(ValueError, match="llm.mar is older than (handler/|config/model-config.yaml)"):
        TorchServeProcess(tmp_path / "ts", port=18095, models="llm=llm.mar", model_store=tmp_path).start(timeout=20)
    assert not (tmp_path / "ts").exists()     # refused before anything was set up
    os.utime(mar)                             # built now
    assert newer_source(mar) is None


def test_a_server_given_up_on_is_stopped_not_left_running(tmp_path):
    """start() that times out stops the server it started (compare.run once left one running, which
    took cores from the next system's points)."""
    ts = TorchServeProcess(tmp_path / "ts", port=18097, models="llm=llm.mar")
    try:
        with pytest.raises((RuntimeError, TimeoutError)):
            ts.start(timeout=2)               # the model cannot load in 2 s
        assert ts.proc.poll() is not None     # the whole process group is gone (stop_process_group waits)
    finally:
        ts.stop()


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
        manage = {"Authorization": f"Bearer {keys['management']['key']}"}
        allowed = requests.get(f"{ts.management_url}/models", timeout=10, headers=manage)
        assert allowed.status_code == 200
        # the OpenAI client's api_key is the inference key (bf16: no compile, a quick start)
        subprocess.run([sys.executable, str(ROOT / "scripts/build_mar.py"), "--name", "llm-auth",
                        "--set", "quantization=bf16"], check=True, capture_output=True)
        r = requests.post(f"{ts.management_url}/models?url=llm-auth.mar&model_name=llm&initial_workers=1"
                          "&synchronous=true", headers=manage, timeout=300)
        assert r.status_code == 200, r.text
        answer = openai_client(ts, api_key=keys["inference"]["key"]).completions.create(
            model="llm", prompt="The capital of France is", max_tokens=4)
        assert answer.choices[0].text
        with pytest.raises(openai.APIStatusError) as e:
            openai_client(ts, api_key="not-the-key").completions.create(model="llm", prompt="Hi", max_tokens=4)
        assert e.value.status_code in (400, 401)
    finally:
        ts.stop()


def read_stream(server, body) -> list[bytes]:
    """The lines of a stream until it ends or breaks."""
    lines = []
    try:
        with post(server, {**body, "stream": True}, stream=True) as r:
            for line in r.iter_lines():
                lines.append(line)
    except requests.RequestException:
        pass
    return lines


def test_a_killed_worker_answers_its_clients_and_comes_back(server):
    """kill -9 of the worker mid-generation. Non-streamed requests have sent nothing yet, so
    TorchServe can still answer them: a 5xx with a JSON body. An open stream can only be cut (its
    200 head went out). TorchServe restarts the worker; the recovery time is printed. Last in the
    module: the worker start-up it waits for is the longest step here. (TorchServe 0.12 answers
    507 with {"code": 507, "type": "InternalServerException", "message": "Worker died."}.)"""
    pid = requests.get(f"{server.management_url}/models/llm", timeout=10).json()[0]["workers"][0]["pid"]
    long = {"prompt": "Once upon a time", "max_new_tokens": 1000, "ignore_eos": True}
    with ThreadPoolExecutor(4) as pool:
        plain = [pool.submit(post, server, long) for _ in range(2)]
        streams = [pool.submit(read_stream, server, long) for _ in range(2)]
        time.sleep(3)                                    # all four are decoding
        os.kill(pid, signal.SIGKILL)
        killed = time.perf_counter()
        plain, streams = [f.result() for f in plain], [f.result() for f in streams]
    for r in plain:
        assert r.status_code >= 500 and "Worker died" in r.json()["message"], (r.status_code, r.text)
    for lines in streams:                                # parts came, then the stream was cut short
        assert lines and all(json.loads(line).get("finish_reason") is None for line in lines if line.startswith(b"{"))
    while (r := post(server, FRANCE)).status_code != 200:
        assert time.perf_counter() - killed < 300, r.text
        time.sleep(0.5)
    assert "Paris" in r.json()["text"]
    print(f"\nworker recovery after kill -9: {time.perf_counter() - killed:.1f} s "
          f"(first good answer after the kill)")
