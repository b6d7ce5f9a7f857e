"""The TorchServe handler through a mock context (no server): both batching modes, bad requests
beside good ones, streaming parts. The real-server counterpart is tests/test_e2e.py."""

import json

import pytest

import llm_handler
from llm_handler import LLMHandler


class MockContext:
    def __init__(self, yaml_config: dict) -> None:
        self.model_yaml_config = yaml_config
        self.system_properties = {"model_dir": "/nonexistent"}
        self.request_ids = {}
        self.status = {}
        self.content_types = {}
        self.stopping_criteria = None

    def new_batch(self, ids: list[str]) -> None:
        self.request_ids = dict(enumerate(ids))
        self.status, self.content_types, self.stopping_criteria = {}, {}, None

    def get_request_id(self, idx: int = 0):
        return self.request_ids.get(idx)

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0):
        self.status[idx] = code

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.content_types[idx] = value


def make_handler(model_dir, continuous: bool) -> tuple[LLMHandler, MockContext]:
    ctx = MockContext({"batchSize": 4, "continuousBatching": continuous,
                       "handler": {"model_path": str(model_dir), "quantization": "fp32", "max_model_len": 128,
                                   "max_num_seqs": 4, "max_new_tokens_cap": 64,
                                   "default_max_new_tokens": 16}})
    h = LLMHandler()
    h.initialize(ctx)
    return h, ctx


def body(prompt: str, **kw) -> dict:
    return {"body": json.dumps({"prompt": prompt, **kw}).encode()}


@pytest.fixture(scope="module")
def batch_handler(tiny_model_dir):
    return make_handler(tiny_model_dir, continuous=False)


def test_unknown_handler_key_fails_start_up(tiny_model_dir):
    ctx = MockContext({"handler": {"model_path": str(tiny_model_dir), "batch": 3}})
    with pytest.raises(ValueError, match="unknown handler config keys"):
        LLMHandler().initialize(ctx)


def test_bad_request_does_not_harm_its_batch(batch_handler):
    h, ctx = batch_handler
    ctx.new_batch(["solo"])
    alone = json.loads(h.handle([body("Hello there", max_new_tokens=10)], ctx)[0])
    ctx.new_batch(["a", "b", "c", "d"])
    out = h.handle([body("Hello there", max_new_tokens=10), {"body": b"{oops"},
                    body("Hi", max_new_tokens=0), {"body": b'{"prompt": "x", "max_tokens": 3}'}], ctx)
    good = json.loads(out[0])
    assert good["text"] == alone["text"] and good["usage"] == alone["usage"]
    assert set(good) == {"text", "finish_reason", "usage", "timings"}
    assert set(good["timings"]) >= {"prefill_ms", "decode_ms", "batch_size"}
    assert ctx.status == {1: 400, 2: 400, 3: 400}
    assert [json.loads(o)["field"] for o in out[1:]] == ["body", "max_new_tokens", "max_tokens"]


def test_request_level_batch_reports_its_size(batch_handler):
    h, ctx = batch_handler
    ctx.new_batch(["a", "b", "c"])
    out = [json.loads(o) for o in h.handle([body("one"), body("two words"), body("three more words")], ctx)]
    assert [o["timings"]["batch_size"] for o in out] == [3, 3, 3]
    assert all(o["finish_reason"] in ("stop", "length") for o in out)


def test_request_level_streaming_sends_parts(batch_handler, monkeypatch):
    h, ctx = batch_handler
    sent = []
    monkeypatch.setattr(llm_handler, "send_intermediate_predict_response",
                        lambda ret, ids, msg, code, context: sent.append((dict(ret), dict(ids))))
    ctx.new_batch(["s", "n"])
    out = h.handle([body("Hello there", max_new_tokens=10, stream=True), body("Hello there", max_new_tokens=10)], ctx)
    assert sent and all(set(ids) == {0} for _, ids in sent)    # only the streaming request gets parts
    parts = [json.loads(ret[0]) for ret, _ in sent] + [json.loads(out[0])]
    whole = json.loads(out[1])
    assert "".join(p["text"] for p in parts) == whole["text"]
    assert parts[-1]["finish_reason"] == whole["finish_reason"] and "usage" in parts[-1]
    assert ctx.content_types[0] == "application/x-ndjson"


def run_continuous(h, ctx, arrivals: dict[int, dict]) -> dict[str, list]:
    """Drive handle_step like TorchServe's ContinuousBatching: new requests bring a payload, running
    ones come back by id with none, and a request leaves once its stopping criterion says so
    (True: last streamed part; None: a whole response, which closes an error's connection)."""
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
        ctx.new_batch(active)
        data = [payloads.pop(rid, {}) for rid in active]
        out = h.handle(data, ctx)
        assert len(out) == len(active)
        finished = []
        for idx, rid in enumerate(active):
            responses.setdefault(rid, []).append((out[idx], ctx.status.get(idx, 200)))
            # None: a whole (error) response, after which TorchServe closes the connection
            if ctx.stopping_criteria[idx](out[idx]) in (True, None):
                finished.append(rid)
        active = [rid for rid in active if rid not in finished]
    return responses


def test_continuous_mode_matches_request_level(tiny_model_dir, batch_handler):
    h, ctx = batch_handler
    ctx.new_batch(["x"])
    expected = json.loads(h.handle([body("The quick brown fox jumps over", max_new_tokens=16)], ctx)[0])
    hc, cctx = make_handler(tiny_model_dir, continuous=True)
    responses = run_continuous(hc, cctx, {
        0: {"a": body("Hello there", max_new_tokens=16)},
        3: {"b": body("The quick brown fox jumps over", max_new_tokens=16), "bad": body("x", top_p=2)},
        4: {"s": body("The quick brown fox jumps over", max_new_tokens=16, stream=True)},
    })
    final = json.loads("".join(r for r, _ in responses["b"]))
    assert final["text"] == expected["text"] and final["usage"] == expected["usage"]
    assert final["timings"]["batch_size"] >= 2
    assert all(r == "" for r, _ in responses["b"][:-1])          # non-streaming: one body at the end
    lines = [json.loads(line) for r, _ in responses["s"] for line in r.splitlines() if line]
    assert "".join(p["text"] for p in lines) == expected["text"] and lines[-1]["finish_reason"]
    assert len(lines) > 1
    assert responses["bad"][0][1] == 400 and json.loads(responses["bad"][0][0])["field"] == "top_p"
    assert len(responses["bad"]) == 1
    assert not hc.live and not hc.closing and not hc.opened and not hc.engine.has_unfinished()


def test_continuous_disconnect_frees_the_slot(tiny_model_dir):
    h, ctx = make_handler(tiny_model_dir, continuous=True)
    ctx.new_batch(["a", "b"])
    h.handle([body("Hello there", max_new_tokens=50), body("Hi", max_new_tokens=50)], ctx)
    assert len(h.engine.rows) == 2
    ctx.new_batch(["b"])                      # the frontend dropped a: its client went away
    h.handle([{}], ctx)
    assert "a" not in h.live and len(h.engine.rows) == 1
