"""TorchServe entry point: a thin adapter between TorchServe's batches and the llmserve engine.
With `continuousBatching: true` in the archive (the default) each handle() call runs engine
steps for up to CALL_S (one at least): requests still running come back by id without payload
and finish through context.stopping_criteria. The engine's scheduler then applies `handler.batching`: `continuous`
(newcomers join the running batch at the next step) or `request_level` (newcomers wait until the
whole running batch is done). One archive serves both: register it with
handler=llm_handler:continuous or handler=llm_handler:request_level to choose per registration.
With `continuousBatching: false` (TorchServe's classic batching, the one that scales to several
workers in TorchServe 0.12) each handle() call runs its batch to completion: request-level only.
What follows the version in the URL (TorchServe's url_path header) picks the dialect: nothing for
the native JSON API, v1/... for the OpenAI routes. The only module that imports TorchServe."""

import json
import logging
import math
import os
import time
from dataclasses import replace

from ts.handler_utils.utils import send_intermediate_predict_response
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from llmserve.config import EngineConfig
from llmserve.engine import Engine, Overloaded
from llmserve.exchange import JSON, Exchange, error_json
from llmserve.openai_api import CHAT, COMPLETIONS, MODELS, ROUTES, Formatter, models_body, parse_openai
from llmserve.request import TIERS, Request, RequestError, parse_request
from llmserve.responses_api import RESPONSES, parse_responses
from llmserve.tenants import ANONYMOUS, RateLimited, Tenants

logger = logging.getLogger(__name__)
FAILED = {"error": 500, "queue_timeout": 503}     # finish reasons that are the server's error responses
CLIENT_GONE = 499                               # the metrics' status of a request whose client hung up
GAUGE_INTERVAL_S = 1.0                          # the engine's gauges are reported at most this often
# A handle() call runs engine steps until this much time has passed (one step at least), a
# request has finished or one has its first token: each call is a round trip through TorchServe's
# frontend, paid once per call, not once per step (a one-sequence step takes ~8 ms on a 2-core Xeon).
# A stream's parts come this often: at 25 ms a 16-row step went one per call, each paying a round
# trip (timed in the handler: 6b4f562's message)
CALL_S = 0.05
# ... or this long while no request in flight streams: a plain answer goes out whole, so only a
# newcomer's wait to join (and how often the round trip is paid) depends on it
PLAIN_CALL_S = 0.1
PHRASES = {400: "Bad Request", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error",
           503: "Service Unavailable"}


class LLMHandler(BaseHandler):
    def __init__(self, batching: str | None = None) -> None:
        super().__init__()
        self.batching = batching               # None: handler.batching from model-config.yaml
        self.engine: Engine | None = None
        self.tenants = Tenants()               # model-config.yaml's tenants: section
        self.stepwise = True                   # TorchServe's continuous-batching protocol
        self.exchanges: dict[str, Exchange] = {}   # request id -> its protocol state
        self.model_name = "llm"                # as registered: the OpenAI routes' model
        self.started = int(time.time())
        self.did_step = True                   # the last handle_step() call ran an engine step (or none came)
        self.gauges_time = -GAUGE_INTERVAL_S   # when the engine's gauges were last reported

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
        self.model_name = getattr(context, "model_name", None) or self.model_name
        # A request that has sent nothing yet comes back with its payload at every step (the frontend
        # caches it only after a first part): take bodies as bytes and parse newcomers' alone.
        os.environ["TS_DECODE_INPUT_REQUEST"] = "false"
        self.tenants = Tenants(yaml_config.get("tenants"))
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
        """Route, rate-limit, parse, tokenize and queue one request: its Exchange, or its whole
        response (an error, or the model list). RequestError is a 4xx naming the field, RateLimited
        a 429 and Overloaded a 503, both with Retry-After, anything else a 500: each this request's own."""
        route = (context.get_request_header(idx, "url_path") or "").strip("/")
        is_openai = route.startswith("v1")
        try:
            request_id = context.get_request_id(idx) or f"req-{idx}"
            if route == MODELS:
                return self._reply(context, idx, 200, json.dumps(models_body(self.model_name, self.started)))
            if route not in ("", CHAT, COMPLETIONS, RESPONSES):
                raise RequestError("url_path", f"no route /{route}: the routes are /predictions/{self.model_name} "
                                   f"and, after the version, {['/' + r for r in (*ROUTES, RESPONSES)]}", status=404)
            tenant, tier = self.tenants.identify(context.get_all_request_header(idx))
            self.engine.check_room(tier)
            self.tenants.admit(tenant, time.monotonic())
            body = row.get("body") if row.get("body") is not None else row.get("data")
            if body is None and row:
                raise RequestError("body", "no JSON body found; send a JSON object with Content-Type: application/json")
            if route == RESPONSES:
                r, formatter = parse_responses(request_id, body, self.model_name, self.engine.config, self.engine.tokenizer)
                ex = Exchange([r], formatter)
            elif is_openai:
                requests, options = parse_openai(route, request_id, body, self.model_name, self.engine.config,
                                                 self.engine.tokenizer)
                ex = Exchange(requests, Formatter(route, requests, self.model_name, self._token_text, **options))
            else:
                ex = Exchange([parse_request(request_id, body, self.engine.config, self.engine.tokenizer)])
            added = []
            try:
                for r in ex.requests:
                    r.tenant, r.tier = tenant, tier
                    self.engine.add_request(r)
                    added.append(r)
            except Exception:   # all of its choices or none
                for r in added:
                    self.engine.abort(r.request_id)
                raise
        except RequestError as e:
            return self._reply(context, idx, e.status, error_json(is_openai, e.status, e.message, e.field))
        except (Overloaded, RateLimited) as e:
            status, limit = (429, e.limit) if isinstance(e, RateLimited) else (503, None)
            context.set_response_header(idx, "Retry-After", str(math.ceil(e.retry_after_s)))
            return self._reply(context, idx, status, error_json(is_openai, status, str(e), limit))
        except Exception as e:
            logger.exception("could not take request %s", idx)
            return self._reply(context, idx, 500, error_json(is_openai, 500, f"could not take the request: "
                                                             f"{type(e).__name__}: {e}", None))
        context.set_response_content_type(idx, ex.content_type)
        return ex

    def _token_text(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    def _step(self) -> None:
        """One engine step; if it raises, only the requests it was running fail, each with the error."""
        try:
            if self.engine.has_unfinished():
                self.engine.step()
        except Exception as e:
            logger.exception("engine step failed")
            self.engine.fail_step(f"generation failed: {type(e).__name__}: {e}")

    def _steps(self) -> None:
        """One call's engine steps (CALL_S, PLAIN_CALL_S without streams): newcomers wait at most
        that long to join, streams get their text in parts of a few tokens, and steps longer than
        that go one per call."""
        t0 = time.perf_counter()
        limit = CALL_S if any(ex.request.stream for ex in self.exchanges.values()) else PLAIN_CALL_S
        self._step()
        while time.perf_counter() - t0 < limit and self.engine.has_unfinished() and not any(
                r.is_finished or (r.first_token_time or 0) >= t0
                for ex in self.exchanges.values() for r in ex.requests):
            self._step()

    def _next_part(self, idx: int, ex: Exchange, context) -> tuple[str | None, bool | None]:
        """What ex's client gets now and whether it is the last: (None, False) nothing yet (no HTTP
        head goes out); (part, False) a stream's part; (part, True) a stream's last part; (body,
        None) one whole response, a 200 or, if nothing went out before, the error's 4xx/5xx. One of
        n choices failing fails the others with it: the client gets the error."""
        body = ""
        failed = self._failed(ex)
        if failed is None:
            try:
                body = ex.part() if ex.request.stream else (ex.whole() if ex.is_finished else "")
            except Exception as e:   # our fault, and this request's alone
                logger.exception("could not answer request %s", ex.request.request_id)
                self.engine.fail(ex.request, f"could not answer: {type(e).__name__}: {e}")
                failed = self._failed(ex)
        if failed is not None:
            if ex.is_open:
                return ex.error_part(failed.error), True
            status = FAILED[failed.finish_reason]
            body = error_json(ex.openai is not None, status, failed.error, None)
            return self._reply(context, idx, status, body), None
        if not ex.is_finished:
            if not body:
                return None, False
            ex.is_open = True
            return body, False
        return body, (True if ex.is_open else None)

    def _failed(self, ex: Exchange) -> Request | None:
        """ex's first failed request, or None; its other choices then end as it did (freeing their rows)."""
        failed = next((r for r in ex.requests if r.finish_reason in FAILED), None)
        if failed is not None:
            for r in ex.requests:
                if r.finish_reason not in FAILED:
                    self.engine.fail(r, failed.error)
                    r.finish_reason = failed.finish_reason
        return failed

    # -- TorchServe's classic batching: the batch runs to completion in one call ---------------------
    def handle_batch(self, data: list, context) -> list:
        admitted = [self._admit(idx, row, context) for idx, row in enumerate(data)]
        exchanges = {idx: ex for idx, ex in enumerate(admitted) if isinstance(ex, Exchange)}
        while any(not ex.is_finished for ex in exchanges.values()):
            self._step()
            self._send_stream_parts(exchanges, context)
        self._record(context, [o for idx, ex in enumerate(admitted) for o in self._outcome(context, idx, ex)])
        return [self._next_part(idx, ex, context)[0] if isinstance(ex, Exchange) else ex
                for idx, ex in enumerate(admitted)]

    def _send_stream_parts(self, exchanges: dict[int, Exchange], context) -> None:
        parts = {idx: part for idx, ex in exchanges.items()
                 if ex.request.stream and not ex.is_finished and (part := ex.part())}
        for idx in parts:
            exchanges[idx].is_open = True
        if parts:
            send_intermediate_predict_response(parts, {idx: exchanges[idx].request.request_id for idx in parts},
                                               "Intermediate Prediction success", 200, context)

    # -- TorchServe's continuous-batching protocol: a few engine steps per call (CALL_S) -------------
    def handle_step(self, data: list, context) -> list:
        ids = [context.get_request_id(idx) for idx in range(len(data))]
        answered: list[tuple] = []       # (request or None, HTTP status, its tenant and tier) of those leaving
        for gone in set(self.exchanges) - set(ids):      # the frontend dropped it: its client went away
            for r in self.exchanges.pop(gone).requests:
                self.engine.abort(r.request_id)
                answered.append((r, CLIENT_GONE, (r.tenant, TIERS[r.tier])))
        replies: dict[int, tuple[str | None, bool | None]] = {}
        for idx, rid in enumerate(ids):
            if rid not in self.exchanges:
                ex = self._admit(idx, data[idx], context)
                if isinstance(ex, str):
                    replies[idx] = (ex, None)
                    answered.extend(self._outcome(context, idx, ex))
                else:
                    self.exchanges[rid] = ex
        # a call that refuses someone answers at once; the step waits one call at most
        self.did_step = not (replies and self.did_step)
        if self.did_step:
            self._steps()
        for idx, rid in enumerate(ids):
            if idx not in replies:
                replies[idx] = self._next_part(idx, self.exchanges[rid], context)
                if replies[idx][1] is not False:
                    answered.extend(self._outcome(context, idx, self.exchanges.pop(rid)))
        for idx, (body, _) in replies.items():
            if body is None:          # nothing to send: leave it out, so no HTTP head goes out yet
                del context.request_ids[idx]
        context.stopping_criteria = [lambda _, last=replies[idx][1]: last for idx in range(len(data))]
        self._record(context, answered)
        return [replies[idx][0] or "" for idx in range(len(data))]

    # -- metrics (declared in config/metrics.yaml; TorchServe exports them on its metrics port) ------
    def _outcome(self, context, idx: int, item: Exchange | str) -> list[tuple[Request | None, int, tuple]]:
        """(request, HTTP status, (tenant, tier)) of one answered for good: one for each of its engine
        requests (OpenAI's n choices each count as a request, with their own tokens); none for the
        model list."""
        if isinstance(item, Exchange):
            return [(r, FAILED.get(r.finish_reason, 200), (r.tenant, TIERS[r.tier])) for r in item.requests]
        status = context.get_response_status(idx)[0] or 200
        if status == 200:
            return []
        try:
            tenant, tier = self.tenants.identify(context.get_all_request_header(idx))
        except RequestError:   # refused for its headers
            tenant, tier = ANONYMOUS, TIERS.index(self.tenants.default.tier)
        return [(None, status, (tenant, TIERS[tier]))]

    def _record(self, context, answered: list[tuple]) -> None:
        """Counters and histograms of the requests answered in this call, and by tenant and tier
        (for chargeback); gauges of the engine. Charges each tenant's tokens-per-minute limit."""
        metrics = context.metrics
        for r, status, (tenant, tier) in answered:
            reason = r.finish_reason if r is not None else "refused"   # refused: before the engine saw it
            metrics.add_metric("llm_requests_total", 1, "Count", None,
                               [Dimension("finish_reason", reason), Dimension("status", str(status))],
                               MetricTypes.COUNTER)
            who = [Dimension("tenant", tenant), Dimension("tier", tier)]
            metrics.add_metric("llm_tenant_requests_total", 1, "Count", None, [*who, Dimension("status", str(status))],
                               MetricTypes.COUNTER)
            if r is None:
                continue
            self.tenants.charge(tenant, len(r.output_ids), time.monotonic())
            for name, value in (("llm_tenant_prompt_tokens_total", len(r.prompt_ids)),
                                ("llm_tenant_generation_tokens_total", len(r.output_ids)),
                                ("llm_tenant_engine_seconds_total", r.engine_s)):
                metrics.add_metric(name, value, "Count", None, who, MetricTypes.COUNTER)
            metrics.add_metric("llm_prompt_tokens_total", len(r.prompt_ids), "Count", None, [], MetricTypes.COUNTER)
            for name, value in (("llm_prompt_tokens_cached_total", r.num_cached_tokens),
                                ("llm_spec_draft_tokens_total", r.num_draft_tokens),
                                ("llm_spec_accepted_tokens_total", r.num_accepted_tokens)):
                metrics.add_metric(name, value, "Count", None, [], MetricTypes.COUNTER)
            metrics.add_metric("llm_generation_tokens_total", len(r.output_ids), "Count", None, [],
                               MetricTypes.COUNTER)
            if r.num_preemptions:
                metrics.add_metric("llm_preemptions_total", r.num_preemptions, "Count", None, [], MetricTypes.COUNTER)
            end = r.finish_time or time.perf_counter()
            seconds = {"llm_e2e_request_latency_seconds": end - r.arrival_time,
                       "llm_queue_wait_seconds": (r.start_time or end) - r.arrival_time}
            if r.first_token_time is not None:
                seconds["llm_time_to_first_token_seconds"] = r.first_token_time - r.arrival_time
                if len(r.output_ids) > 1:
                    seconds["llm_time_per_output_token_seconds"] = (end - r.first_token_time) / (len(r.output_ids) - 1)
            for name, value in seconds.items():
                metrics.add_metric(name, value, "Seconds", None, [], MetricTypes.HISTOGRAM)
        # every step would flood TorchServe's logs; the last call before the engine idles must report
        if time.monotonic() - self.gauges_time < GAUGE_INTERVAL_S and self.engine.has_unfinished():
            return
        self.gauges_time = time.monotonic()
        stats = self.engine.stats()
        metrics.add_metric("llm_requests_running", stats["num_running"], "Count", None, [], MetricTypes.GAUGE)
        metrics.add_metric("llm_requests_waiting", stats["num_waiting"], "Count", None, [], MetricTypes.GAUGE)
        metrics.add_metric("llm_kv_cache_usage_ratio", stats["kv_cache_usage"], "Percent", None, [], MetricTypes.GAUGE)

    @staticmethod
    def _reply(context, idx: int, status: int, body: str) -> str:
        """A whole JSON response with this status."""
        if status != 200:
            context.set_response_status(status, PHRASES.get(status, "Error"), idx=idx)
        context.set_response_content_type(idx, JSON)
        return body


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
