"""The TorchServe handler through a mock context (no server) driven like TorchServe's
ContinuousBatching: both batching policies, bad requests beside good ones, streaming parts,
disconnects. The real-server counterpart is tests/test_e2e.py."""

import json
import time

import pytest

import llm_handler
from llm_handler import LLMHandler
from llmserve import exchange
from llmserve.exchange import stream_delta
from llmserve.json_mode import Grammar
from llmserve.request import Request, SamplingParams


class Metrics:
    """Records what the handler reports, as TorchServe's metrics cache would export it."""

    def __init__(self) -> None:
        self.values: dict[tuple, list[float]] = {}

    def add_metric(self, name, value, unit, idx, dimensions, metric_type):
        key = (name, *(f"{d.name}={d.value}" for d in dimensions))
        self.values.setdefault(key, []).append(value)


class MockContext:
    def __init__(self, yaml_config: dict) -> None:
        self.model_yaml_config = yaml_config
        self.system_properties = {"model_dir": "/nonexistent"}
        self.model_name = "llm"
        self.metrics = Metrics()
        self.new_batch([])

    def new_batch(self, ids: list[str], paths: dict[int, str] | None = None,
                  request_headers: dict[int, dict] | None = None) -> None:
        self.request_ids = dict(enumerate(ids))
        self.paths = paths or {}                       # idx -> url_path (what follows the version)
        self.request_headers = request_headers or {}   # idx -> the HTTP request's headers
        self.status, self.content_types, self.headers, self.stopping_criteria = {}, {}, {}, None

    def get_request_id(self, idx: int = 0):
        return self.request_ids.get(idx)

    def get_request_header(self, idx: int, key: str):
        return self.get_all_request_header(idx).get(key)

    def get_all_request_header(self, idx: int) -> dict:
        return {**self.request_headers.get(idx, {}), "url_path": self.paths.get(idx)}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0):
        self.status[idx] = code

    def get_response_status(self, idx: int):
        return self.status.get(idx, 200), ""

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.content_types[idx] = value

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        self.headers.setdefault(idx, {})[key] = value


def make_handler(model_dir, entry_point: str | None = None, yaml: dict | None = None,
                 **handler_keys) -> tuple[LLMHandler, MockContext]:
    ctx = MockContext({"batchSize": 4, "continuousBatching": True, **(yaml or {}),
                       "handler": {"model_path": str(model_dir), "quantization": "fp32", "max_model_len": 128,
                                   "max_num_seqs": 4, "max_new_tokens_cap": 64,
                                   "default_max_new_tokens": 16, **handler_keys}})
    h = LLMHandler(entry_point)
    h.initialize(ctx)
    return h, ctx


def body(prompt: str, **kw) -> dict:
    return {"body": json.dumps({"prompt": prompt, **kw}).encode()}


def whole(responses: list) -> dict:
    """A non-streamed request's JSON: one whole response, sent when it is done."""
    assert len(responses) == 1
    return json.loads(responses[0][0])


@pytest.fixture(autouse=True)
def one_step_per_call(monkeypatch):
    """The tests drive handle() a step at a time; the tests of call length lift it."""
    monkeypatch.setattr(llm_handler, "CALL_S", 0)
    monkeypatch.setattr(llm_handler, "PLAIN_CALL_S", 0)


@pytest.fixture(scope="module")
def continuous(tiny_model_dir):
    return make_handler(tiny_model_dir)


@pytest.fixture(scope="module")
def request_level(tiny_model_dir):
    return make_handler(tiny_model_dir, entry_point="request_level")


def test_unknown_handler_key_fails_start_up(tiny_model_dir):
    with pytest.raises(ValueError, match="unknown handler config keys"):
        make_handler(tiny_model_dir, batch=3)


def test_classic_archive_needs_request_level_batching(tiny_model_dir):
    with pytest.raises(ValueError, match="needs continuousBatching: true"):
        make_handler(tiny_model_dir, yaml={"continuousBatching": False})


@pytest.fixture(scope="module")
def classic(tiny_model_dir):
    """continuousBatching: false: TorchServe's classic batching, one whole batch per handle() call."""
    return make_handler(tiny_model_dir, yaml={"continuousBatching": False}, batching="request_level")


def test_classic_bad_request_does_not_harm_its_batch(classic):
    h, ctx = classic
    ctx.new_batch(["solo"])
    alone = json.loads(h.handle([body("Hello there", max_new_tokens=10)], ctx)[0])
    ctx.new_batch(["a", "b", "c"])
    out = h.handle([body("Hello there", max_new_tokens=10), {"body": b"{oops"}, body("Hi", top_k=-1)], ctx)
    good = json.loads(out[0])
    assert good["text"] == alone["text"] and good["usage"] == alone["usage"]
    assert ctx.status == {1: 400, 2: 400}
    assert [json.loads(o)["field"] for o in out[1:]] == ["body", "top_k"]


def test_classic_streaming_sends_parts(classic, monkeypatch):
    h, ctx = classic
    sent = []
    monkeypatch.setattr(llm_handler, "send_intermediate_predict_response",
                        lambda ret, ids, msg, code, context: sent.append((dict(ret), dict(ids))))
    ctx.new_batch(["s", "n"])
    out = h.handle([body("Hello there", max_new_tokens=10, stream=True), body("Hello there", max_new_tokens=10)], ctx)
    assert sent and all(set(ids) == {0} for _, ids in sent)    # only the streaming request gets parts
    parts = [json.loads(ret[0]) for ret, _ in sent] + [json.loads(out[0])]
    whole_body = json.loads(out[1])
    assert "".join(p["text"] for p in parts) == whole_body["text"]
    assert parts[-1]["finish_reason"] == whole_body["finish_reason"] and "usage" in parts[-1]
    assert ctx.content_types[0] == "application/x-ndjson"


def test_policy_comes_from_yaml_unless_the_entry_point_names_one(tiny_model_dir, continuous, request_level):
    assert not continuous[0].engine.scheduler.request_level
    assert request_level[0].engine.scheduler.request_level
    from_yaml, _ = make_handler(tiny_model_dir, batching="request_level")
    assert from_yaml.engine.scheduler.request_level
    overridden, _ = make_handler(tiny_model_dir, entry_point="continuous", batching="request_level")
    assert not overridden.engine.scheduler.request_level
    with pytest.raises(ValueError, match="batching must be one of"):
        make_handler(tiny_model_dir, batching="sometimes")


def run_steps(h, ctx, arrivals: dict[int, dict], paths: dict[str, str] | None = None,
              headers: dict[str, dict] | None = None) -> dict[str, list]:
    """Drive handle() like TorchServe's ContinuousBatching: a request brings its payload until its
    first response (then it is cached and comes back by id alone); one the handler leaves out of
    context.request_ids gets nothing that step; a request leaves once its stopping criterion says
    so (True: last streamed part; None: a whole response)."""
    active: list[str] = []
    payloads = {}
    responses: dict[str, list] = {}
    for step in range(200):
        for rid, payload in arrivals.get(step, {}).items():
            active.append(rid)
            payloads[rid] = payload
        if not active and step > max(arrivals):
            break
        if not active:
            continue
        ctx.new_batch(active, {idx: (paths or {}).get(rid) for idx, rid in enumerate(active)},
                      {idx: (headers or {}).get(rid, {}) for idx, rid in enumerate(active)})
        data = [payloads.get(rid, {}) for rid in active]
        out = h.handle(data, ctx)
        assert len(out) == len(active)
        finished = []
        for idx, rid in enumerate(active):
            if idx not in ctx.request_ids:        # left out: no response, the payload comes again
                continue
            payloads.pop(rid, None)
            responses.setdefault(rid, []).append((out[idx], ctx.status.get(idx, 200), step))
            # None: a whole (error) response, after which TorchServe closes the connection
            if ctx.stopping_criteria[idx](out[idx]) in (True, None):
                finished.append(rid)
        active = [rid for rid in active if rid not in finished]
    return responses


def test_bad_requests_do_not_harm_their_batch(request_level):
    h, ctx = request_level
    alone = whole(run_steps(h, ctx, {0: {"solo": body("Hello there", max_new_tokens=10)}})["solo"])
    responses = run_steps(h, ctx, {0: {"a": body("Hello there", max_new_tokens=10), "b": {"body": b"{oops"},
                                       "c": body("Hi", max_new_tokens=0),
                                       "d": {"body": b'{"prompt": "x", "max_tokens": 3}'}}})
    good = whole(responses["a"])
    assert good["text"] == alone["text"] and good["usage"] == alone["usage"]
    assert set(good) == {"text", "finish_reason", "usage", "timings"}
    assert set(good["timings"]) >= {"prefill_ms", "decode_ms", "batch_size"}
    for rid, field in (("b", "body"), ("c", "max_new_tokens"), ("d", "max_tokens")):
        assert len(responses[rid]) == 1 and responses[rid][0][1] == 400
        assert json.loads(responses[rid][0][0])["field"] == field


def test_request_level_newcomer_waits_for_the_whole_batch(request_level):
    h, ctx = request_level
    responses = run_steps(h, ctx, {0: {"a": body("one", max_new_tokens=12), "b": body("two words", max_new_tokens=12)},
                                   2: {"late": body("three more words", max_new_tokens=4)}})
    first = [whole(responses[rid]) for rid in ("a", "b")]
    late = whole(responses["late"])
    assert [o["timings"]["batch_size"] for o in first] == [2, 2]
    assert late["timings"]["batch_size"] == 1                  # never decoded beside a or b
    assert responses["late"][-1][2] > max(responses["a"][-1][2], responses["b"][-1][2])   # finished after both


def test_continuous_newcomer_joins_the_running_batch(continuous):
    h, ctx = continuous
    responses = run_steps(h, ctx, {0: {"a": body("one", max_new_tokens=12, stop=["zzz"])},
                                   2: {"late": body("three more words", max_new_tokens=4)}})
    assert whole(responses["late"])["timings"]["batch_size"] == 2
    assert responses["late"][-1][2] < responses["a"][-1][2]     # left before a finished


def test_call_runs_steps_until_something_to_send(continuous, monkeypatch):
    """A call goes on stepping while it has time (CALL_S) and nothing to send: a newcomer's call
    ends at its first token, the next one when it is done; a stream's parts then hold several
    tokens' text. One step a call: one call a token."""
    h, ctx = continuous
    slow = run_steps(h, ctx, {0: {"a": body("one", max_new_tokens=12, stop=["zzz"])}})
    monkeypatch.setattr(llm_handler, "CALL_S", 60)
    fast = run_steps(h, ctx, {0: {"a": body("one", max_new_tokens=12, stop=["zzz"]),
                                  "s": body("one", max_new_tokens=12, stop=["zzz"], stream=True)}})
    assert slow["a"][-1][2] >= 11 and fast["a"][-1][2] == 1 == fast["s"][-1][2]   # the step of the last response
    assert whole(fast["a"])["text"] == whole(slow["a"])["text"] == "".join(json.loads(p)["text"] for p, *_ in fast["s"])


def test_calls_without_streams_run_longer(continuous, monkeypatch):
    """PLAIN_CALL_S, not CALL_S, bounds a call while no request in flight streams: a plain request
    alone is answered in its second call; beside a stream, calls stay short."""
    h, ctx = continuous
    monkeypatch.setattr(llm_handler, "PLAIN_CALL_S", 60)
    alone = run_steps(h, ctx, {0: {"a": body("one", max_new_tokens=12, stop=["zzz"])}})
    beside = run_steps(h, ctx, {0: {"a": body("one", max_new_tokens=12, stop=["zzz"]),
                                    "s": body("one", max_new_tokens=12, stop=["zzz"], stream=True)}})
    assert alone["a"][-1][2] == 1 and beside["a"][-1][2] >= 11


def test_both_policies_give_the_same_greedy_text(continuous, request_level):
    h, ctx = request_level
    expected = whole(run_steps(h, ctx, {0: {"x": body("The quick brown fox jumps over", max_new_tokens=16)}})["x"])
    hc, cctx = continuous
    responses = run_steps(hc, cctx, {
        0: {"a": body("Hello there", max_new_tokens=16)},
        3: {"b": body("The quick brown fox jumps over", max_new_tokens=16), "bad": body("x", top_p=2)},
        4: {"s": body("The quick brown fox jumps over", max_new_tokens=16, stream=True)},
    })
    final = whole(responses["b"])
    assert final["text"] == expected["text"] and final["usage"] == expected["usage"]
    assert final["timings"]["batch_size"] >= 2
    lines = [json.loads(line) for r, *_ in responses["s"] for line in r.splitlines() if line]
    assert "".join(p["text"] for p in lines) == expected["text"] and lines[-1]["finish_reason"]
    assert len(lines) > 1
    assert responses["bad"][0][1] == 400 and json.loads(responses["bad"][0][0])["field"] == "top_p"
    assert len(responses["bad"]) == 1
    assert not hc.exchanges and not hc.engine.has_unfinished()


def test_disconnect_frees_the_slot(tiny_model_dir):
    h, ctx = make_handler(tiny_model_dir)
    ctx.new_batch(["a", "b"])
    h.handle([body("Hello there", max_new_tokens=50), body("Hi", max_new_tokens=50)], ctx)
    assert len(h.engine.rows) == 2
    ctx.new_batch(["b"])                      # the frontend dropped a: its client went away
    h.handle([{}], ctx)
    assert "a" not in h.exchanges and len(h.engine.rows) == 1
    assert ctx.metrics.values[("llm_requests_total", "finish_reason=abort", "status=499")] == [1]
    # n = 3 choices of one client: its going frees all three rows
    choices = {"model": "llm", "prompt": "Hello there", "max_tokens": 40, "ignore_eos": True, "n": 3}
    ctx.new_batch(["b", "c"], paths={1: "v1/completions"})
    h.handle([{}, {"body": json.dumps(choices).encode()}], ctx)
    ctx.new_batch(["b", "c"], paths={1: "v1/completions"})
    h.handle([{}, {}], ctx)
    assert len(h.engine.rows) == 4 and len(h.exchanges["c"].requests) == 3
    ctx.new_batch(["b"])
    h.handle([{}], ctx)
    assert "c" not in h.exchanges and len(h.engine.rows) == 1
    assert ctx.metrics.values[("llm_requests_total", "finish_reason=abort", "status=499")] == [1, 1, 1, 1]


def test_entry_points_pick_the_policy(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(llm_handler, "_handler", None)
    _, ctx = make_handler(tiny_model_dir)
    assert llm_handler.request_level(None, ctx) is None          # TorchServe's initialise call
    assert llm_handler._handler.engine.scheduler.request_level
    ctx.new_batch(["a"])
    llm_handler.request_level([body("Hello there", max_new_tokens=3)], ctx)
    assert 0 not in ctx.request_ids                  # nothing to send yet: no HTTP head goes out
    assert llm_handler._handler.exchanges


def partial(text: str, stop=()) -> Request:
    r = Request("r", [1], SamplingParams(max_new_tokens=8, stop=tuple(stop)))
    r.text = text
    return r


def test_stream_delta_holds_back_what_may_start_a_stop_string():
    r = partial("Hello wor", stop=["world!"])
    assert stream_delta(r) == "Hello "            # "wor" may be the start of "world!"
    r.text = "Hello wonder"
    assert stream_delta(r) == "wonder"
    r.text, r.status = "Hello wonder, wo", "finished"
    assert stream_delta(r) == ", wo"              # finished: nothing is held back


class FlakyTokenizer:
    """The real tokenizer, except that it raises on one prompt (a bug of ours, not the client's)."""
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text):
        if text == "boom":
            raise TypeError("tokenizer fell over")
        return self.tokenizer(text)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_an_exception_while_taking_a_request_is_that_requests_500(tiny_model_dir):
    h, ctx = make_handler(tiny_model_dir)
    alone = whole(run_steps(h, ctx, {0: {"a": body("Hello there", max_new_tokens=8)}})["a"])
    h.engine.tokenizer = FlakyTokenizer(h.engine.tokenizer)
    responses = run_steps(h, ctx, {0: {"a": body("Hello there", max_new_tokens=8), "x": body("boom")}})
    assert whole(responses["a"])["text"] == alone["text"]
    assert len(responses["x"]) == 1 and responses["x"][0][1] == 500
    assert "tokenizer fell over" in json.loads(responses["x"][0][0])["error"]
    assert not h.exchanges


def test_a_failed_step_fails_only_the_requests_it_ran(tiny_model_dir, monkeypatch):
    h, ctx = make_handler(tiny_model_dir, yaml={"batchSize": 2}, max_num_seqs=2)
    expected = whole(run_steps(h, ctx, {0: {"c": body("three more words", max_new_tokens=6)}})["c"])
    decode, calls = h.engine.runner.decode, []
    def flaky(num_rows, heads=None):
        calls.append(num_rows)
        if len(calls) == 3:
            raise RuntimeError("device fell over")
        return decode(num_rows, heads)
    monkeypatch.setattr(h.engine.runner, "decode", flaky)
    responses = run_steps(h, ctx, {0: {"a": body("one", max_new_tokens=12),
                                       "b": body("two words", max_new_tokens=12, stream=True),
                                       "c": body("three more words", max_new_tokens=6)}})   # c waits: 2 rows
    last = json.loads(responses["b"][-1][0].splitlines()[-1])   # streaming (200 head sent): an error part ends it
    assert "device fell over" in last["error"] and responses["b"][-1][1] == 200
    assert len(responses["a"]) == 1 and responses["a"][0][1] == 500   # not streamed: nothing went out, a 500
    assert "device fell over" in json.loads(responses["a"][0][0])["error"]
    assert whole(responses["c"])["text"] == expected["text"]   # the queued one carries on
    h.engine.check_invariants()
    assert not h.exchanges and not h.engine.has_unfinished()


def test_a_request_failed_before_its_first_part_gets_a_500(tiny_model_dir, monkeypatch):
    h, ctx = make_handler(tiny_model_dir)
    prefill, calls = h.engine.runner.prefill, []
    def flaky(rows, token_lists, **kw):
        calls.append(rows)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return prefill(rows, token_lists, **kw)
    monkeypatch.setattr(h.engine.runner, "prefill", flaky)
    responses = run_steps(h, ctx, {0: {"a": body("one", max_new_tokens=4)}, 2: {"b": body("two", max_new_tokens=4)}})
    assert len(responses["a"]) == 1 and responses["a"][0][1] == 500
    assert "out of memory" in json.loads(responses["a"][0][0])["error"]
    assert whole(responses["b"])["usage"]["completion_tokens"] == 4
    h.engine.check_invariants()


def test_an_exception_while_answering_is_that_requests_error(tiny_model_dir, monkeypatch):
    h, ctx = make_handler(tiny_model_dir)
    real_chunk = exchange.chunk
    def chunk(r):
        if r.request_id == "s":
            raise KeyError("shaping fell over")
        return real_chunk(r)
    monkeypatch.setattr(exchange, "chunk", chunk)
    responses = run_steps(h, ctx, {0: {"s": body("Hello there", max_new_tokens=8, stream=True),
                                       "a": body("Hello there", max_new_tokens=8)}})
    assert len(responses["s"]) == 1 and responses["s"][0][1] == 500          # failed before its first part
    assert "shaping fell over" in json.loads(responses["s"][0][0])["error"]
    assert whole(responses["a"])["usage"]["completion_tokens"] == 8
    h.engine.check_invariants()
    assert not h.exchanges and not h.engine.has_unfinished()


# -- the OpenAI dialect, overload and timeouts, metrics ----------------------------------------------
def openai_run(h, ctx, arrivals: dict[int, dict]) -> dict[str, list]:
    """run_steps with OpenAI bodies: rid -> (route, body)."""
    bodies = {step: {rid: {"body": json.dumps(b).encode()} for rid, (_, b) in reqs.items()}
              for step, reqs in arrivals.items()}
    paths = {rid: route for reqs in arrivals.values() for rid, (route, _) in reqs.items()}
    return run_steps(h, ctx, bodies, paths)


def sse(responses: list) -> list:
    events = [line[len("data: "):] for r, *_ in responses for line in r.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_openai_chat_and_completions_plain_and_streamed(continuous):
    h, ctx = continuous
    chat = {"model": "llm", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8,
            "ignore_eos": True, "logprobs": True, "top_logprobs": 2}
    responses = openai_run(h, ctx, {0: {
        "chat": ("v1/chat/completions", chat),
        "chat-s": ("v1/chat/completions", {**chat, "stream": True, "stream_options": {"include_usage": True}}),
        "cmpl": ("v1/completions", {"model": "llm", "prompt": "Hello there", "max_tokens": 8, "ignore_eos": True}),
        "cmpl-s": ("v1/completions", {"model": "llm", "prompt": "Hello there", "max_tokens": 8, "ignore_eos": True,
                                      "stream": True}),
        "models": ("v1/models", {})}})
    plain = whole(responses["chat"])
    assert plain["object"] == "chat.completion" and plain["choices"][0]["finish_reason"] == "length"
    assert plain["usage"]["completion_tokens"] == 8
    content = plain["choices"][0]["logprobs"]["content"]
    assert len(content) == 8 and all(len(c["top_logprobs"]) == 2 for c in content)
    # greedy: the chosen token is the most likely one
    assert all(c["logprob"] == pytest.approx(c["top_logprobs"][0]["logprob"]) and c["logprob"] <= 0 for c in content)
    chunks = sse(responses["chat-s"])
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) \
        == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    assert sum(len(c["choices"][0]["logprobs"]["content"]) for c in chunks if c["choices"]) == 8
    text = whole(responses["cmpl"])["choices"][0]["text"]
    assert "".join(c["choices"][0]["text"] for c in sse(responses["cmpl-s"])) == text
    assert whole(responses["models"])["data"][0]["id"] == "llm"


def test_openai_responses_plain_and_streamed_are_the_chat_routes_answer(continuous):
    """/v1/responses: input and instructions as the chat's messages, max_output_tokens as max_tokens;
    the answer as a `response` object (cut short: "incomplete"), streamed as typed events whose
    deltas add up to its text; errors name the Responses' own parameters."""
    h, ctx = continuous
    chat = {"model": "llm", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
            "max_tokens": 8, "ignore_eos": True}
    ask = {"model": "llm", "instructions": "Be brief.", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "Hel"}, {"type": "input_text", "text": "lo"}]}], "max_output_tokens": 8}
    responses = openai_run(h, ctx, {0: {
        "chat": ("v1/chat/completions", chat), "resp": ("v1/responses", ask),
        "resp-s": ("v1/responses", {**ask, "stream": True}),
        "bad-in": ("v1/responses", {**ask, "input": [{"type": "function_call", "name": "f"}]}),
        "bad-max": ("v1/responses", {**ask, "max_output_tokens": 0}),
        "bad-prev": ("v1/responses", {**ask, "previous_response_id": "resp_1"})}})
    text = whole(responses["chat"])["choices"][0]["message"]["content"]
    body = whole(responses["resp"])
    assert body["object"] == "response" and body["status"] == "incomplete" and body["output"][0]["content"][0]["text"] == text
    assert body["usage"]["output_tokens"] == 8 and body["incomplete_details"] == {"reason": "max_output_tokens"}
    events = [json.loads(line[len("data: "):]) for r, *_ in responses["resp-s"] for line in r.split("\n") if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == text
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == text == events[-4]["text"]
    for name, param in (("bad-in", "input"), ("bad-max", "max_output_tokens"), ("bad-prev", "previous_response_id")):
        (out, code, _), = responses[name]
        assert code == 400 and json.loads(out)["error"]["param"] == param


def test_openai_penalties_are_the_native_apis(continuous):
    """presence_penalty, frequency_penalty (OpenAI's) and repetition_penalty (vLLM's) reach the
    engine as the native API's fields do: the same text, not the unpenalized one."""
    h, ctx = continuous
    penalties = {"presence_penalty": 0.5, "frequency_penalty": 0.25, "repetition_penalty": 2.0}
    cmpl = {"model": "llm", "prompt": "x", "max_tokens": 16, "ignore_eos": True}
    responses = openai_run(h, ctx, {0: {"pen": ("v1/completions", {**cmpl, **penalties}),
                                        "plain": ("v1/completions", cmpl),
                                        "native": ("", {"prompt": "x", "max_new_tokens": 16, "ignore_eos": True,
                                                        **penalties})}})
    text = whole(responses["pen"])["choices"][0]["text"]
    assert text == whole(responses["native"])["text"] != whole(responses["plain"])["choices"][0]["text"]


def test_openai_n_choices_plain_and_streamed(continuous):
    """n: that many choices of one prompt, each its own sequence. Seeded and sampled, choice i is the
    native API's answer for seed + i (so they differ); streamed, each chunk carries one choice by its
    index (a chat choice's first with the role), each choice's text adds up to the plain one's and
    ends with its finish_reason; the usage counts the prompt once and every choice's tokens."""
    h, ctx = continuous
    sampled = {"max_tokens": 6, "ignore_eos": True, "temperature": 1.0, "seed": 7, "n": 3}
    cmpl = {"model": "llm", "prompt": "Hello there", **sampled}
    chat = {"model": "llm", "messages": [{"role": "user", "content": "Hello there"}], **sampled}
    responses = openai_run(h, ctx, {0: {
        "cmpl": ("v1/completions", cmpl),
        "cmpl-s": ("v1/completions", {**cmpl, "stream": True, "stream_options": {"include_usage": True}}),
        "chat": ("v1/chat/completions", chat),
        "chat-s": ("v1/chat/completions", {**chat, "stream": True}),
        **{f"native{i}": ("", {"prompt": "Hello there", "max_new_tokens": 6, "ignore_eos": True, "temperature": 1.0,
                               "seed": 7 + i}) for i in range(3)}}})
    plain = whole(responses["cmpl"])
    assert [c["index"] for c in plain["choices"]] == [0, 1, 2]
    texts = [c["text"] for c in plain["choices"]]
    assert texts == [whole(responses[f"native{i}"])["text"] for i in range(3)] and len(set(texts)) == 3
    prompt_tokens = whole(responses["native0"])["usage"]["prompt_tokens"]
    assert plain["usage"]["prompt_tokens"] == prompt_tokens and plain["usage"]["completion_tokens"] == 18
    chunks = sse(responses["cmpl-s"])
    assert all(len(c["choices"]) == 1 for c in chunks[:-1]) and chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == plain["usage"]
    by_choice = [[c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == i] for i in range(3)]
    assert ["".join(c["text"] for c in cs) for cs in by_choice] == texts
    assert all(cs[-1]["finish_reason"] == "length" and all(c["finish_reason"] is None for c in cs[:-1])
               for cs in by_choice)
    answers = [c["message"]["content"] for c in whole(responses["chat"])["choices"]]
    chunks = sse(responses["chat-s"])
    by_choice = [[c["choices"][0] for c in chunks if c["choices"][0]["index"] == i] for i in range(3)]
    assert all(cs[0]["delta"]["role"] == "assistant" and all("role" not in c["delta"] for c in cs[1:])
               for cs in by_choice)
    assert ["".join(c["delta"]["content"] for c in cs) for cs in by_choice] == answers and len(set(answers)) == 3


def test_openai_echo_gives_the_prompts_logprobs_as_the_model_scores_it(continuous, tiny_model_dir, tokenizer):
    """echo (completions): the prompt's text before each choice's and, with logprobs, its tokens with
    their log-probabilities (the first null), as the model itself scores the prompt; max_tokens 0 gives
    the prompt alone (lm-eval's loglikelihood requests); a prompt of token ids scores as its text;
    streamed, the first chunk carries the prompt and the offsets run on."""
    import torch
    from transformers import AutoModelForCausalLM
    h, ctx = continuous
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = tokenizer(prompt)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)   # [T, V]
    cmpl = {"model": "llm", "prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 3, "ignore_eos": True}
    responses = openai_run(h, ctx, {0: {
        "echo": ("v1/completions", cmpl),
        "zero": ("v1/completions", {**cmpl, "max_tokens": 0}),
        "ids": ("v1/completions", {**cmpl, "prompt": ids, "max_tokens": 0}),
        "stream": ("v1/completions", {**cmpl, "stream": True}),
        "two": ("v1/completions", {**cmpl, "n": 2, "temperature": 1.0, "seed": 3, "logprobs": None}),
        "plain": ("v1/completions", {**cmpl, "echo": False})}})
    echo, plain = whole(responses["echo"])["choices"][0], whole(responses["plain"])["choices"][0]
    assert echo["text"] == prompt + plain["text"]
    lp = echo["logprobs"]
    n = len(ids)
    assert lp["tokens"][:n] == [tokenizer.decode([t]) for t in ids] and len(lp["tokens"]) == n + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][n:] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=1e-4)   # other shapes
    got = torch.tensor(lp["token_logprobs"][1:n])
    want = expected[torch.arange(n - 1), torch.tensor(ids[1:])]
    assert torch.allclose(got, want, atol=1e-4), (got, want)
    assert all(len(top) == 2 and max(top.values()) == pytest.approx(expected[i].max().item(), abs=1e-4)
               for i, top in enumerate(lp["top_logprobs"][1:n]))
    assert lp["text_offset"][:3] == [0, len(lp["tokens"][0]), len(lp["tokens"][0]) + len(lp["tokens"][1])]
    zero = whole(responses["zero"])
    assert zero["choices"][0]["text"] == prompt and zero["usage"]["completion_tokens"] == 0
    assert zero["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"][:n]
    assert whole(responses["ids"])["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"][:n]
    chunks = sse(responses["stream"])
    assert chunks[0]["choices"][0]["text"].startswith(prompt)
    assert "".join(c["choices"][0]["text"] for c in chunks) == echo["text"]
    assert [t for c in chunks for t in c["choices"][0]["logprobs"]["token_logprobs"]] == lp["token_logprobs"]
    assert [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]] == lp["text_offset"]
    assert all(c["text"].startswith(prompt) and c["text"] != prompt for c in whole(responses["two"])["choices"])


WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
                           "required": ["city", "unit"]}}}]


def test_openai_a_forced_tool_call_names_the_function_and_holds_its_arguments_to_the_schema(continuous):
    """tool_choice "required" (one tool) or naming it: the answer is a tool call whose arguments
    are an object of the function's parameters (a random model's tokens masked into it), streamed as
    the name then the arguments in pieces; a tool's result in a later turn is read as the user's."""
    h, ctx = continuous
    ask = {"model": "llm", "messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 24,
           "tools": WEATHER}
    named = {"type": "function", "function": {"name": "get_weather"}}
    later = ask["messages"] + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    responses = openai_run(h, ctx, {0: {
        "call": ("v1/chat/completions", {**ask, "tool_choice": "required"}),
        "call-s": ("v1/chat/completions", {**ask, "tool_choice": named, "stream": True}),
        "none": ("v1/chat/completions", {**ask, "messages": later, "tool_choice": "none", "parallel_tool_calls": False})}})
    choice = whole(responses["call"])["choices"][0]
    call, = choice["message"]["tool_calls"]
    assert choice["message"]["content"] is None and call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    if choice["finish_reason"] == "stop":
        arguments = json.loads(call["function"]["arguments"])
        assert list(arguments) == ["city", "unit"] and arguments["unit"] in ("celsius", "fahrenheit")
    else:                                             # cut by max_tokens: a prefix of one
        grammar = Grammar(WEATHER[0]["function"]["parameters"])
        assert grammar.feed(grammar.initial, call["function"]["arguments"].encode()) is not None
        assert choice["finish_reason"] == "length"
    chunks = [c["choices"][0] for c in sse(responses["call-s"]) if c["choices"]]
    first, = chunks[0]["delta"]["tool_calls"]
    assert first["function"]["name"] == "get_weather" and first["id"].startswith("call_")
    assert "".join(c["delta"]["tool_calls"][0]["function"]["arguments"] for c in chunks) == call["function"]["arguments"]
    assert "tool_calls" not in whole(responses["none"])["choices"][0]["message"]


def test_openai_required_with_several_tools_names_one_in_the_answer(tiny_model_dir):
    """tool_choice "required" with several tools: the answer is {"name", "arguments"}, the name one
    of the tools' and the arguments of that tool's schema (a union the name decides), returned as its
    call; streamed in one chunk at the end, since the name is known only then. Cut by max_tokens, it
    comes back as content, a prefix of such an object."""
    h, ctx = make_handler(tiny_model_dir, max_model_len=256, max_num_seqs=8, yaml={"batchSize": 8})
    tools = [{"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {key: {"type": "integer"}}, "required": [key]}}} for name, key in (("a", "x"), ("b", "y"))]
    ask = {"model": "llm", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64, "tools": tools,
           "tool_choice": "required", "temperature": 1.0, "seed": 1}
    responses = openai_run(h, ctx, {0: {f"call{i}": ("v1/chat/completions", {**ask, "seed": i}) for i in range(4)}
                                    | {"call0-s": ("v1/chat/completions", {**ask, "seed": 0, "stream": True})}})
    grammar = Grammar({"anyOf": [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                                   "arguments": t["function"]["parameters"]},
                                  "required": ["name", "arguments"]} for t in tools]})
    for i in range(4):
        choice = whole(responses[f"call{i}"])["choices"][0]
        if choice["finish_reason"] == "stop":
            call, = choice["message"]["tool_calls"]
            key = {"a": "x", "b": "y"}[call["function"]["name"]]
            assert list(json.loads(call["function"]["arguments"])) == [key] and choice["message"]["content"] is None
        else:
            assert grammar.feed(grammar.initial, choice["message"]["content"].encode()) is not None
    chunks = [c["choices"][0] for c in sse(responses["call0-s"]) if c["choices"]]
    assert len(chunks) == 1 and chunks[0]["finish_reason"] is not None
    plain, delta = whole(responses["call0"])["choices"][0]["message"], chunks[0]["delta"]
    if "tool_calls" in plain:
        assert [c["function"] for c in delta["tool_calls"]] == [c["function"] for c in plain["tool_calls"]]
        assert delta["tool_calls"][0]["index"] == 0 and delta["content"] is None
    else:
        assert delta["content"] == plain["content"]


def test_openai_and_native_predictions_are_drafted_from_and_change_no_text(tiny_model_dir):
    """Predicted outputs: the answer asked for again with itself as the prediction (OpenAI's text
    parts, n = 2 choices, and the native API's string) comes back the same, most of it from kept drafts."""
    h, ctx = make_handler(tiny_model_dir, spec_tokens=4, spec_max_rows=16)
    chat = {"model": "llm", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 24,
            "ignore_eos": True}
    text = whole(openai_run(h, ctx, {0: {"first": ("v1/chat/completions", chat)}})["first"])["choices"][0]["message"]["content"]
    prediction = {"type": "content", "content": [{"type": "text", "text": text[:9]}, {"type": "text", "text": text[9:]}]}
    responses = openai_run(h, ctx, {0: {
        "predicted": ("v1/chat/completions", {**chat, "prediction": prediction, "store": False, "n": 2}),
        "native": ("", {"messages": chat["messages"], "max_new_tokens": 24, "ignore_eos": True, "prediction": text})}})
    again = whole(responses["predicted"])
    assert [c["message"]["content"] for c in again["choices"]] == [text] * 2 == [whole(responses["native"])["text"]] * 2
    details = again["usage"]["completion_tokens_details"]   # both choices'
    assert details["accepted_prediction_tokens"] >= 2 * 12 > details["rejected_prediction_tokens"]
    assert whole(responses["native"])["usage"]["accepted_draft_tokens"] >= 12


@pytest.mark.parametrize("route, body, status, param", [
    ("v1/chat/completions", {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "n": 5}, 400, "n"),
    ("v1/completions", {"model": "llm", "prompt": "hi", "n": True}, 400, "n"),
    ("v1/chat/completions", {"model": "llm", "messages": [{"role": "user", "content": "hi"}],
                             "tools": [{"type": "function"}]}, 400, "tools"),
    ("v1/chat/completions", {"model": "llm", "messages": [{"role": "user", "content": "hi"}],
                             "response_format": {"type": "json_schema"}}, 400, "response_format"),
    ("v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("v1/chat/completions", {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "tools": WEATHER},
     400, "tool_choice"),
    ("v1/chat/completions", {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "tools": WEATHER * 2,
     "tool_choice": "required"}, 400, "tools"),
    ("v1/chat/completions", {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "tools": WEATHER,
     "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, 400, "tool_choice"),
    ("v1/chat/completions", {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
     400, "tool_choice"),
    ("v1/chat/completions", {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
     "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, 400, "tools"),
    ("v1/chat/completions", {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
     "tools": WEATHER, "response_format": {"type": "json_object"}}, 400, "tool_choice"),
    ("v1/chat/completions", {"model": "llm", "messages": [{"role": "user", "content": "hi"}],
     "parallel_tool_calls": "yes"}, 400, "parallel_tool_calls"),
    ("v1/chat/completions", {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
     400, "max_tokens"),
    ("v1/completions", {"model": "llm", "prompt": "hi", "logprobs": 9}, 400, "logprobs"),
    ("v1/completions", {"model": "llm", "prompt": "hi", "echo": "yes"}, 400, "echo"),
    ("v1/chat/completions", {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "echo": True}, 400, "echo"),
    ("v1/completions", {"model": "llm", "prompt": [1, "x"]}, 400, "prompt"),
    ("v1/completions", {"model": "llm", "prompt": [10 ** 9]}, 400, "prompt"),
    ("v1/completions", {"model": "llm", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("v1/completions", {"model": "llm", "prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("v1/embeddings", {"model": "llm", "input": "hi"}, 404, "url_path"),
    ("v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("v1/chat/completions", {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "store": True},
     400, "store"),
    ("v1/completions", {"model": "llm", "prompt": "hi", "store": False}, 400, "store"),
    ("v1/chat/completions", {"model": "llm", "messages": [{"role": "user", "content": "hi"}],
                             "prediction": {"type": "content", "content": 7}}, 400, "prediction"),
    ("v1/chat/completions", {"model": "llm", "messages": [{"role": "user", "content": "hi"}],
                             "prediction": {"type": "text", "content": "hi"}}, 400, "prediction"),
    ("v1/chat/completions", {"model": "llm", "messages": [{"role": "user", "content": "hi"}],
                             "prediction": "hi"}, 400, "prediction"),
    ("v1/completions", {"model": "llm", "prompt": "hi", "prediction": {"type": "content", "content": "hi"}},
     400, "prediction"),
])
def test_openai_errors_name_the_parameter(continuous, route, body, status, param):
    h, ctx = continuous
    responses = openai_run(h, ctx, {0: {"bad": (route, body),
                                        "good": ("v1/completions", {"model": "llm", "prompt": "Hi", "max_tokens": 3})}})
    (out, code, _), = responses["bad"]
    error = json.loads(out)["error"]
    assert code == status and error["param"] == param and error["message"] and error["type"]
    assert whole(responses["good"])["usage"]["completion_tokens"] == 3


def test_a_full_queue_refuses_at_once_with_503(tiny_model_dir):
    h, ctx = make_handler(tiny_model_dir, yaml={"batchSize": 8}, max_num_seqs=1, max_waiting_requests=1)
    ctx.new_batch(["a", "b", "c", "d"])
    out = h.handle([body("Hello there", max_new_tokens=20, ignore_eos=True)] * 4, ctx)
    assert ctx.status == {2: 503, 3: 503} and ctx.headers[2]["Retry-After"].isdigit()
    assert "overloaded" in json.loads(out[2])["error"]
    assert not h.did_step and not h.engine.rows              # the refusing call answered without a step
    assert set(ctx.request_ids) == {2, 3}                     # a and b: nothing to send yet
    ctx.new_batch(["a", "b"])
    h.handle([{}, {}], ctx)
    assert h.did_step and len(h.engine.rows) == 1


def test_a_queue_full_of_lower_tiers_still_takes_a_premium_request(tiny_model_dir):
    h, ctx = make_handler(tiny_model_dir, yaml={"batchSize": 8}, max_num_seqs=1, max_waiting_requests=1)
    tiers = ["batch", "batch", "batch", "premium", "premium", "premium"]
    ctx.new_batch(list("abcdef"), request_headers={i: {"X-Priority": t} for i, t in enumerate(tiers)})
    h.handle([body("Hello there", max_new_tokens=20, ignore_eos=True)] * 6, ctx)
    # one row (free until the step) and one waiting place per tier and better: c finds a and b ahead,
    # d and e find no premium one ahead (batch ones do not count against them), f finds d and e
    assert ctx.status == {2: 503, 5: 503}


def slow_decode_steps(h, monkeypatch) -> None:
    """Every decode step 5 ms longer: queue waits and timeouts pass alike on any CPU."""
    decode = h.engine.runner.decode
    def slow_decode(num_rows, heads=None):
        time.sleep(0.005)
        return decode(num_rows, heads)
    monkeypatch.setattr(h.engine.runner, "decode", slow_decode)


def test_queue_wait_limit_and_own_timeout(tiny_model_dir, monkeypatch):
    h, ctx = make_handler(tiny_model_dir, yaml={"batchSize": 4}, max_num_seqs=1, max_queue_wait_s=0.05)
    slow_decode_steps(h, monkeypatch)           # 60 steps take 0.3 s at least, whatever the CPU
    responses = run_steps(h, ctx, {0: {"long": body("Hello there", max_new_tokens=60, ignore_eos=True, timeout_s=0.1),
                                       "queued": body("Hi", max_new_tokens=4)}})
    (out, code, _), = responses["queued"]
    assert code == 503 and "in the queue" in json.loads(out)["error"]
    long = whole(responses["long"])
    assert long["finish_reason"] == "timeout" and 0 < long["usage"]["completion_tokens"] < 60 and long["text"]
    counts = ctx.metrics.values
    assert counts[("llm_requests_total", "finish_reason=timeout", "status=200")] == [1]
    assert counts[("llm_requests_total", "finish_reason=queue_timeout", "status=503")] == [1]
    assert len(counts[("llm_time_to_first_token_seconds",)]) == 1          # only the one that started
    assert sorted(counts[("llm_generation_tokens_total",)]) == [0, long["usage"]["completion_tokens"]]
    assert counts[("llm_requests_running",)][-1] == 0


def test_one_failed_choice_fails_the_request_and_frees_the_others(tiny_model_dir, monkeypatch):
    """n = 2 on 2 rows, one taken: the second choice waits, past max_queue_wait_s, so the request gets
    the 503 and its first choice, which was running, ends with it (its row freed, counted as it);
    the other request runs on, untouched."""
    h, ctx = make_handler(tiny_model_dir, yaml={"batchSize": 4}, max_num_seqs=2, max_queue_wait_s=0.05)
    slow_decode_steps(h, monkeypatch)           # 40 steps take 0.2 s at least, whatever the CPU
    bodies = {0: {"long": body("Hello there", max_new_tokens=40, ignore_eos=True)},
              1: {"two": {"body": json.dumps({"model": "llm", "prompt": "Hi", "max_tokens": 30, "ignore_eos": True,
                                                "n": 2}).encode()}}}
    responses = run_steps(h, ctx, bodies, paths={"two": "v1/completions"})
    (out, code, _), = responses["two"]
    assert code == 503 and "in the queue" in json.loads(out)["error"]["message"]
    assert whole(responses["long"])["usage"]["completion_tokens"] == 40
    counts = ctx.metrics.values
    assert counts[("llm_requests_total", "finish_reason=queue_timeout", "status=503")] == [1, 1]
    assert not h.engine.has_unfinished() and not h.exchanges


def test_bad_timeout_is_a_400(continuous):
    h, ctx = continuous
    (out, code, _), = run_steps(h, ctx, {0: {"x": body("Hi", timeout_s=0)}})["x"]
    assert code == 400 and json.loads(out)["field"] == "timeout_s"


def test_a_queued_chat_stream_sends_nothing_before_its_first_token(tiny_model_dir):
    """Not even the role chunk: its head must not go out while it waits, or a queue timeout or a
    dead worker could no longer answer it with an error status."""
    h, ctx = make_handler(tiny_model_dir, yaml={"batchSize": 4}, max_num_seqs=1)
    chat = {"model": "llm", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    ctx.new_batch(["a", "b"], {0: "v1/chat/completions", 1: "v1/chat/completions"})
    h.handle([{"body": json.dumps(chat).encode()}] * 2, ctx)
    assert h.exchanges["b"].request.status == "waiting" and 1 not in ctx.request_ids


def test_tenants_get_their_tier_rate_limit_and_account(tiny_model_dir):
    h, ctx = make_handler(tiny_model_dir, yaml={"tenants": {"team-a": {"max_requests_per_s": 0.01}}})
    team_a = {"X-Tenant": "team-a"}
    responses = run_steps(h, ctx, {0: {"a": body("Hello there", max_new_tokens=5), "b": body("Hello", max_new_tokens=5),
                                       "c": body("Hi", max_new_tokens=3), "d": body("Hi")}},
                          headers={"a": team_a, "b": team_a, "c": {"X-Tenant": "team-c", "X-Priority": "premium"},
                                   "d": {"X-Priority": "gold"}})
    assert whole(responses["a"])["usage"]["completion_tokens"] == 5
    assert whole(responses["c"])["usage"]["completion_tokens"] == 3
    (refused, status, _), = responses["b"]            # over team-a's one request a second: never queued
    assert status == 429 and json.loads(refused)["field"] == "max_requests_per_s"
    (bad, status, _), = responses["d"]
    assert status == 400 and json.loads(bad)["field"] == "X-Priority"
    ctx.new_batch(["e"], request_headers={0: team_a})
    h.handle([body("Hi")], ctx)
    assert ctx.status[0] == 429 and 1 <= int(ctx.headers[0]["Retry-After"]) <= 100
    counted = ctx.metrics.values
    assert counted[("llm_tenant_requests_total", "tenant=team-a", "tier=standard", "status=200")] == [1]
    assert counted[("llm_tenant_requests_total", "tenant=team-a", "tier=standard", "status=429")] == [1, 1]
    assert counted[("llm_tenant_requests_total", "tenant=anonymous", "tier=standard", "status=400")] == [1]
    assert counted[("llm_tenant_generation_tokens_total", "tenant=team-c", "tier=premium")] == [3]
    assert counted[("llm_tenant_prompt_tokens_total", "tenant=team-a", "tier=standard")][0] > 0
    assert counted[("llm_tenant_engine_seconds_total", "tenant=team-c", "tier=premium")][0] > 0
