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
from llmserve.exchange import Exchange, chunk
from llmserve.request import RequestError, parse_request

logger = logging.getLogger(__name__)
JSON = "application/json"
NDJSON = "application/x-ndjson"


class LLMHandler(BaseHandler):
    def __init__(self, batching: str | None = None) -> None:
        super().__init__()
        self.batching = batching               # None: handler.batching from model-config.yaml
        self.engine: Engine | None = None
        self.stepwise = True                   # TorchServe's continuous-batching protocol
        self.exchanges: dict[str, Exchange] = {}   # request id -> its protocol state

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

    def handle(self, data: list, context) -> list:
        if not self.stepwise:
            return self.handle_batch(data, context)
        return self.handle_step(data, context)

    # -- per request, isolated: nothing one request does can fail another ---------------------------
    def _admit(self, idx: int, row: dict, context) -> Exchange | str:
        """Parse, tokenize and queue one request: its Exchange, or its whole error response. Any
        exception is that request's own: RequestError is a 400 naming the field, anything else a 500."""
        try:
            request_id = context.get_request_id(idx) or f"req-{idx}"
            body = row.get("body") if row.get("body") is not None else row.get("data")
            if body is None and row:
                raise RequestError("body", "no JSON body found; send a JSON object with Content-Type: application/json")
            r = parse_request(request_id, body, self.engine.config, self.engine.tokenizer)
            self.engine.add_request(r)
        except RequestError as e:
            return self._error(context, idx, 400, e.to_dict())
        except Exception as e:
            logger.exception("could not take request %s", idx)
            return self._error(context, idx, 500, {"error": f"could not take the request: {type(e).__name__}: {e}",
                                                   "field": None})
        context.set_response_content_type(idx, NDJSON if r.stream else JSON)
        return Exchange(r)

    def _step(self) -> None:
        """One engine step; if it raises, only the requests it was running fail, each with the error."""
        try:
            if self.engine.has_unfinished():
                self.engine.step()
        except Exception as e:
            logger.exception("engine step failed")
            self.engine.fail_step(f"generation failed: {type(e).__name__}: {e}")

    def _body(self, idx: int, ex: Exchange, context) -> str:
        """What ex's request sends now: its error (a whole 500 response unless a part already went
        out), its new text when streaming, or its whole result once finished."""
        r = ex.request
        if r.finish_reason == "error":
            error = {"error": r.error, "field": None}
            return json.dumps(error) + "\n" if ex.is_open else self._error(context, idx, 500, error)
        if r.stream:
            return chunk(r)
        return json.dumps(r.result()) if r.is_finished else ""

    # -- TorchServe's classic batching: the batch runs to completion in one call ---------------------
    def handle_batch(self, data: list, context) -> list:
        admitted = {idx: self._admit(idx, row, context) for idx, row in enumerate(data)}
        exchanges = {idx: ex for idx, ex in admitted.items() if isinstance(ex, Exchange)}
        while any(not ex.request.is_finished for ex in exchanges.values()):
            self._step()
            self._send_stream_chunks(exchanges, context)
        return [self._body(idx, admitted[idx], context) if idx in exchanges else admitted[idx]
                for idx in range(len(data))]

    def _send_stream_chunks(self, exchanges: dict[int, Exchange], context) -> None:
        lines = {idx: line for idx, ex in exchanges.items()
                 if ex.request.stream and not ex.request.is_finished and (line := chunk(ex.request))}
        for idx in lines:
            exchanges[idx].is_open = True
        if lines:
            send_intermediate_predict_response(lines, {idx: exchanges[idx].request.request_id for idx in lines},
                                               "Intermediate Prediction success", 200, context)

    # -- TorchServe's continuous-batching protocol: one engine step per call -------------------------
    def handle_step(self, data: list, context) -> list:
        ids = [context.get_request_id(idx) for idx in range(len(data))]
        for gone in set(self.exchanges) - set(ids):      # the frontend dropped it: its client went away
            ex = self.exchanges.pop(gone)
            if ex.request is not None:
                self.engine.abort(ex.request.request_id)
        replies: dict[int, tuple[str, bool | None]] = {}  # idx -> (body, is_last); None: a whole response
        for idx, rid in enumerate(ids):
            if rid not in self.exchanges:
                ex = self._admit(idx, data[idx], context)
                if isinstance(ex, str):
                    replies[idx] = (ex, None)
                    ex = Exchange(None, is_closing=True)   # should the frontend send it back once more
                self.exchanges[rid] = ex
        self._step()
        for idx, rid in enumerate(ids):
            if idx not in replies:
                replies[idx] = self._next_part(idx, rid, context)
        context.stopping_criteria = [lambda _, last=replies[idx][1]: last for idx in range(len(data))]
        return [replies[idx][0] for idx in range(len(data))]

    def _next_part(self, idx: int, rid: str, context) -> tuple[str, bool | None]:
        ex = self.exchanges[rid]
        if ex.is_closing:
            del self.exchanges[rid]
            return "", True
        try:
            body = self._body(idx, ex, context)
        except Exception as e:   # our fault, and this request's alone
            logger.exception("could not answer request %s", rid)
            self.engine.fail(ex.request, f"could not answer: {type(e).__name__}: {e}")
            body = self._body(idx, ex, context)
        r = ex.request
        if r.finish_reason == "error" and not ex.is_open:
            ex.is_closing = True                       # a whole response, already closed
            return body, None
        if not r.is_finished:
            ex.is_open = True
            return body, False
        if ex.is_open:
            del self.exchanges[rid]
            return body, True
        ex.is_closing = True                           # the head goes out now, an empty last part next
        return body, False

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
