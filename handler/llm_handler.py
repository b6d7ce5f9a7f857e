"""TorchServe entry point: a thin adapter between TorchServe's batches and the llmserve engine.
With `continuousBatching: true` in the archive (the default) each handle() call is one engine
step: requests still running come back by id without payload and finish through
context.stopping_criteria. The engine's scheduler then applies `handler.batching`: `continuous`
(newcomers join the running batch at the next step) or `request_level` (newcomers wait until the
whole running batch is done). One archive serves both: register it with
handler=llm_handler:continuous or handler=llm_handler:request_level to choose per registration.
With `continuousBatching: false` (TorchServe's classic batching, the one that scales to several
workers in TorchServe 0.12) each handle() call runs its batch to completion: request-level only.
The only module that imports TorchServe."""

import json
import logging
import os
from dataclasses import replace

from ts.handler_utils.utils import send_intermediate_predict_response
from ts.torch_handler.base_handler import BaseHandler

from llmserve.config import EngineConfig
from llmserve.engine import Engine
from llmserve.request import Request, RequestError, parse_request

logger = logging.getLogger(__name__)
JSON = "application/json"
NDJSON = "application/x-ndjson"


def stream_delta(r: Request) -> str:
    """Text the client has not seen yet, holding back an unfinished UTF-8 character or what may be
    the start of a stop string; everything once the request is finished."""
    text = r.text
    end = len(text)
    if not r.is_finished:
        while end > r.num_sent_chars and text[end - 1] == "\ufffd":
            end -= 1
        for stop in r.params.stop:
            for n in range(min(len(stop) - 1, end - r.num_sent_chars), 0, -1):
                if text[end - n:end] == stop[:n]:
                    end -= n
                    break
    delta = text[r.num_sent_chars:end]
    r.num_sent_chars = end
    return delta


def chunk(r: Request) -> str:
    """One streamed JSON line ("" when there is nothing new); the last carries finish_reason,
    usage and timings."""
    body = {"text": stream_delta(r)}
    if not r.is_finished and not body["text"]:
        return ""
    if r.is_finished:
        body.update({k: v for k, v in r.result().items() if k != "text"})
    return json.dumps(body) + "\n"


class LLMHandler(BaseHandler):
    def __init__(self, batching: str | None = None) -> None:
        super().__init__()
        self.batching = batching               # None: handler.batching from model-config.yaml
        self.engine: Engine | None = None
        self.stepwise = True                   # TorchServe's continuous-batching protocol
        self.live: dict[str, Request] = {}     # request id -> its running request
        self.opened: set[str] = set()          # ids whose first response went out
        self.closing: dict[str, str] = {}      # id -> last body still to send

    def initialize(self, context) -> None:
        yaml_config = context.model_yaml_config or {}
        section = dict(yaml_config.get("handler") or {})
        config = EngineConfig.from_dict(section)
        model_dir = context.system_properties.get("model_dir") or "."
        if not os.path.isabs(config.model_path):
            config = replace(config, model_path=os.path.join(model_dir, config.model_path))
        if self.batching:
            config = replace(config, batching=self.batching)
        self.stepwise = bool(yaml_config.get("continuousBatching", False))
        if not self.stepwise and config.batching == "continuous":
            raise ValueError("handler.batching: continuous needs continuousBatching: true in model-config.yaml; "
                             "with continuousBatching: false set handler.batching: request_level")
        # the management API's batch_size (in system_properties) wins over the archive's batchSize
        batch_size = int(context.system_properties.get("batch_size") or yaml_config.get("batchSize", 1))
        if self.stepwise and batch_size > config.max_num_seqs:
            raise ValueError(f"batchSize {batch_size} exceeds handler.max_num_seqs {config.max_num_seqs}")
        self.engine = Engine.from_config(config)
        # one tiny request at start-up, so the first user does not pay for the kernels' set-up
        warmup = parse_request("warmup", {"prompt": "Hello", "max_new_tokens": 2}, config, self.engine.tokenizer)
        self.engine.generate([warmup])
        self.initialized = True
        logger.info("llm engine ready: %s, %s", config, self.engine.facts)

    def _parse(self, idx: int, row: dict, context) -> Request:
        request_id = context.get_request_id(idx) or f"req-{idx}"
        body = row.get("body") if row.get("body") is not None else row.get("data")
        if body is None and row:
            raise RequestError("body", "no JSON body found; send a JSON object with Content-Type: application/json")
        return parse_request(request_id, body, self.engine.config, self.engine.tokenizer)

    def handle(self, data: list, context) -> list:
        if not self.stepwise:
            return self.handle_batch(data, context)
        return self.handle_step(data, context)

    # -- TorchServe's classic batching: the batch runs to completion in one call ---------------------
    def handle_batch(self, data: list, context) -> list:
        responses: list = [None] * len(data)
        requests: dict[int, Request] = {}
        for idx, row in enumerate(data):
            try:
                requests[idx] = self._parse(idx, row, context)
            except RequestError as e:
                responses[idx] = self._error(context, idx, 400, e.to_dict())
        try:
            self.engine.generate(list(requests.values()), on_step=lambda: self._send_stream_chunks(requests, context))
        except Exception as e:  # one failure must still answer every request of the batch
            logger.exception("generation failed")
            for idx, r in requests.items():
                self.engine.abort(r.request_id)
                responses[idx] = self._error(context, idx, 500, {"error": f"generation failed: {e}", "field": None})
            return responses
        for idx, r in requests.items():
            context.set_response_content_type(idx, NDJSON if r.stream else JSON)
            responses[idx] = chunk(r) if r.stream else json.dumps(r.result())
        return responses

    def _send_stream_chunks(self, requests: dict[int, Request], context) -> None:
        lines = {idx: line for idx, r in requests.items() if r.stream and not r.is_finished and (line := chunk(r))}
        if lines:
            for idx in lines:
                context.set_response_content_type(idx, NDJSON)
            send_intermediate_predict_response(lines, {idx: requests[idx].request_id for idx in lines},
                                               "Intermediate Prediction success", 200, context)

    # -- TorchServe's continuous-batching protocol: one engine step per call -------------------------
    def handle_step(self, data: list, context) -> list:
        ids = [context.get_request_id(idx) for idx in range(len(data))]
        for gone in (set(self.live) | set(self.closing)) - set(ids):   # the client went away
            self.engine.abort(gone)
            self.live.pop(gone, None)
            self.closing.pop(gone, None)
            self.opened.discard(gone)
        # TorchServe's stream protocol: the first part carries the HTTP head, so a 200 request cannot
        # finish in its first response (it is closed with an empty last part in the next step); an
        # error goes out as one whole response (done=None: no stream header), since TorchServe closes
        # the connection after a 4xx/5xx head and would drop any part that follows.
        responses: list = [None] * len(data)
        done: list[bool | None] = [False] * len(data)
        for idx, row in enumerate(data):
            rid = ids[idx]
            if rid in self.live or rid in self.closing:
                continue
            try:
                r = self._parse(idx, row, context)
            except RequestError as e:
                responses[idx], done[idx] = self._error(context, idx, 400, e.to_dict()), None
                self.closing[rid] = ""        # should the frontend send it back once more
                continue
            self.live[rid] = r
            self.engine.add_request(r)
            context.set_response_content_type(idx, NDJSON if r.stream else JSON)
        failed = {}
        try:
            if self.engine.has_unfinished():
                self.engine.step()
        except Exception as e:  # answer every running request, then carry on with an empty engine
            logger.exception("generation step failed")
            for rid in list(self.live):
                self.engine.abort(rid)
                failed[rid] = {"error": f"generation failed: {e}", "field": None}

        for idx, rid in enumerate(ids):
            if responses[idx] is not None:
                continue
            if rid in self.closing:
                responses[idx], done[idx] = self.closing.pop(rid), True
                self.opened.discard(rid)
                continue
            r = self.live[rid]
            if rid in failed and rid not in self.opened:
                responses[idx], done[idx] = self._error(context, idx, 500, failed[rid]), None
                self.closing[rid] = ""
            elif rid in failed:
                responses[idx] = json.dumps(failed[rid]) + "\n"
            elif r.stream:
                responses[idx] = chunk(r)
            else:
                responses[idx] = json.dumps(r.result()) if r.is_finished else ""
            if not r.is_finished:
                self.opened.add(rid)
                continue
            del self.live[rid]
            if rid in self.opened:
                done[idx] = True
                self.opened.discard(rid)
            elif rid not in failed:
                self.closing[rid] = ""
        context.stopping_criteria = [lambda _, d=d: d for d in done]
        return responses

    @staticmethod
    def _error(context, idx: int, status: int, body: dict) -> str:
        context.set_response_status(status, "Bad Request" if status == 400 else "Internal Server Error", idx=idx)
        context.set_response_content_type(idx, JSON)
        return json.dumps(body)


# Entry points for the management API's handler= parameter: the same archive with another policy.
# A worker process serves one model through one entry point, so it holds one handler.
_handler: LLMHandler | None = None


def _serve(batching: str, data, context):
    global _handler
    if data is None:                       # TorchServe initialises a function entry point with data=None
        _handler = LLMHandler(batching)
        _handler.initialize(context)
        return None
    return _handler.handle(data, context)


def continuous(data, context):
    return _serve("continuous", data, context)


def request_level(data, context):
    return _serve("request_level", data, context)
