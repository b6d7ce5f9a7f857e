"""Locust load test for the TorchServe LLM endpoint: one user class posting a seeded mix of chat,
code and summarize prompts to /predictions/<model>, each response validated. Output tokens are
each request's response length; time to first token is its own stats row (client-side from the
first streamed part with --stream, else the server's timings.ttft_ms, which excludes queueing).

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8080                  # web UI
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8080 --headless -u 16 -r 16 \
        --max-requests 64 --max-new-tokens 16-256 --stream --csv /tmp/llm
The custom options can also be set as LOCUST_MODEL, LOCUST_MAX_NEW_TOKENS, LOCUST_STREAM, ...
"""

import itertools
import json
import random
import sys
import time
from pathlib import Path

import gevent
from locust import HttpUser, events, task
from locust.exception import StopUser
from locust.runners import WorkerRunner
from locust.stats import CSV_STATS_INTERVAL_SEC

from benchmarks.workload import WIKITEXT, PromptMix, load_articles, parse_tokens_spec
from loadtest.pacing import Pacing

NAME = "generate"          # the one stats row of the generation requests
METRIC = "METRIC"          # request_type of the time-to-first-token rows
BAD = "bad request"        # the stats row of malformed bodies (a 400 naming the field is a success)
BAD_BODIES = [(b"{not json", "body"), ({"max_new_tokens": 5}, "prompt"), ({"prompt": "hi", "top_p": 7}, "top_p"),
              ({"prompt": "hi", "colour": "red"}, "colour"), ({"prompt": "hi", "max_new_tokens": -1}, "max_new_tokens")]


@events.init_command_line_parser.add_listener
def add_arguments(parser) -> None:
    parser.add_argument("--model", default="llm", env_var="LOCUST_MODEL", help="model name in /predictions/<model>")
    parser.add_argument("--max-new-tokens", default="64", env_var="LOCUST_MAX_NEW_TOKENS",
                        help="N for a fixed length, or LOW-HIGH to draw uniformly, e.g. 16-256")
    parser.add_argument("--stream", action="store_true", default=False, env_var="LOCUST_STREAM",
                        help="ask for streamed parts and time the first one")
    parser.add_argument("--stream-share", type=float, default=0.0, env_var="LOCUST_STREAM_SHARE",
                        help="without --stream: the share of requests streamed (the soak's mix)")
    parser.add_argument("--bad-share", type=float, default=0.0, env_var="LOCUST_BAD_SHARE",
                        help="the share of malformed bodies sent, each expecting a 400 naming its field")
    parser.add_argument("--user-rate", type=float, default=0.0, env_var="LOCUST_USER_RATE",
                        help="requests per second per user at most (0: the next as soon as one answers)")
    parser.add_argument("--seed", type=int, default=0, env_var="LOCUST_SEED", help="seed of the prompt mix")
    parser.add_argument("--max-requests", type=int, default=0, env_var="LOCUST_MAX_REQUESTS",
                        help="stop after this many generation requests have answered (0 = no limit)")
    parser.add_argument("--request-timeout", type=float, default=600, env_var="LOCUST_REQUEST_TIMEOUT")
    parser.add_argument("--wikitext", default=str(WIKITEXT / "valid.txt"), env_var="LOCUST_WIKITEXT",
                        include_in_web_ui=False, help="WikiText-2 text for the summarize prompts")
    parser.add_argument("--request-log", default="", env_var="LOCUST_REQUEST_LOG", include_in_web_ui=False,
                        help="write one JSON line per generation request to this file")


class Run:
    """This process's test run: the request budget and the per-request log."""
    max_requests = 0
    num_started = 0
    num_finished = 0
    log = None


@events.init.add_listener
def on_init(environment, **_) -> None:
    try:
        LLMUser.articles = load_articles(Path(environment.parsed_options.wikitext))
    except ValueError as e:
        sys.exit(f"locustfile: {e}")   # SystemExit passes through Locust's event hooks; users would only fail
    if environment.parsed_options.request_log:
        Run.log = open(environment.parsed_options.request_log, "w")


@events.test_start.add_listener
def on_test_start(environment, **_) -> None:
    Run.max_requests = environment.parsed_options.max_requests
    Run.num_started = Run.num_finished = 0
    LLMUser.user_ids = itertools.count()   # the same seed gives the same prompts in every test of the web UI
    if Run.max_requests and not isinstance(environment.runner, WorkerRunner):
        gevent.spawn(stop_when_spent, environment)


@events.quitting.add_listener
def on_quitting(**_) -> None:
    if Run.log:
        Run.log.close()


def stop_when_spent(environment) -> None:
    """Headless: quit once every budgeted request has answered; web UI: stop the test, keep the UI."""
    while Run.num_finished < Run.max_requests:
        gevent.sleep(0.2)
    gevent.sleep(CSV_STATS_INTERVAL_SEC + 1)   # the --csv writer runs once a second, not at exit (locust#2299)
    if environment.parsed_options.headless:
        environment.runner.quit()
    else:
        environment.runner.stop()


@events.request.add_listener
def on_request(request_type, name, response_time, response_length, exception, context, start_time=None, **_):
    if name not in (NAME, BAD):
        return
    Run.num_finished += name == NAME
    if Run.log:
        record = {"name": name, "start": start_time, "latency_ms": response_time, "ok": exception is None,
                  "kind": None if exception is None else context.get("kind", "other"), **context}
        Run.log.write(json.dumps(record) + "\n")


class LLMUser(HttpUser):
    """A chat client that sends its next prompt as soon as the last one is answered (or, with
    --user-rate, on its own schedule)."""
    articles: list[str] = []
    user_ids = itertools.count()
    pacing: Pacing | None = None

    def wait_time(self) -> float:
        return self.pacing.wait(time.monotonic()) if self.pacing else 0

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        seed = opts.seed * 1_000_003 + next(LLMUser.user_ids)
        self.mix = PromptMix(seed, LLMUser.articles, parse_tokens_spec(opts.max_new_tokens))
        self.rng = random.Random(seed)
        self.url = f"/predictions/{opts.model}"
        if opts.user_rate:        # paced users start spread over one period, not in one burst
            offset = self.rng.uniform(0, 1 / opts.user_rate)
            self.pacing = Pacing(1 / opts.user_rate, time.monotonic() + offset)
            gevent.sleep(offset)

    @task(5)
    def chat(self) -> None:
        self.generate("chat", self.mix.chat())

    @task(3)
    def code(self) -> None:
        self.generate("code", self.mix.code())

    @task(2)
    def summarize(self) -> None:
        self.generate("summarize", self.mix.summarize())

    def generate(self, task_name: str, body: dict) -> None:
        if Run.max_requests and Run.num_started >= Run.max_requests:
            raise StopUser()
        opts = self.environment.parsed_options
        if opts.bad_share and self.rng.random() < opts.bad_share:
            return self.send_bad()
        Run.num_started += 1
        stream = opts.stream or self.rng.random() < opts.stream_share
        body["stream"] = stream
        context = {"task": task_name, "max_new_tokens": body["max_new_tokens"], "user_class": type(self).__name__}
        t0 = time.perf_counter()
        with self.client.post(self.url, json=body, name=NAME, stream=stream, context=context, catch_response=True,
                              timeout=self.environment.parsed_options.request_timeout) as resp:
            result, kind, ttft_ms = read_response(resp, stream, t0)
            meta = resp.request_meta
            if stream:   # Locust stops the clock at the response head; a streamed answer ends later
                meta["response_time"] = (time.perf_counter() - t0) * 1000
            meta["context"]["status"] = resp.status_code
            if kind:
                meta["context"]["kind"] = kind
                if resp.status_code not in (0, 200):
                    meta["context"]["detail"] = resp.text[:300]   # the server's {"error", "field"}
                resp.failure(kind)
                return
            meta["response_length"] = result["usage"]["completion_tokens"]
            meta["context"].update(output_tokens=result["usage"]["completion_tokens"],
                                   prompt_tokens=result["usage"]["prompt_tokens"], ttft_ms=ttft_ms,
                                   cached_prompt_tokens=result["usage"].get("cached_prompt_tokens", 0),
                                   server_ttft_ms=result["timings"].get("ttft_ms"),
                                   server_batch_size=result["timings"]["batch_size"])
        events.request.fire(request_type=METRIC, name="ttft (client)" if stream else "ttft (server)",
                            response_time=ttft_ms, response_length=0, exception=None, context={})

    def send_bad(self) -> None:
        body, field = self.rng.choice(BAD_BODIES)
        data = body if isinstance(body, bytes) else json.dumps(body)
        with self.client.post(self.url, data=data, name=BAD, catch_response=True, context={"field": field},
                              headers={"Content-Type": "application/json"}) as resp:
            try:
                named = resp.status_code == 400 and resp.json().get("field") == field
            except ValueError:
                named = False
            if named or resp.status_code == 503:    # a 503: refused as overloaded before it was read
                resp.success()
            else:
                resp.request_meta["context"]["kind"] = f"bad_body_http_{resp.status_code}"
                resp.failure(f"bad_body_http_{resp.status_code}")


def read_response(resp, stream: bool, t0: float) -> tuple[dict | None, str | None, float | None]:
    """(result, failure kind or None, time to first token in ms). A failure kind is a short fixed
    string, so Locust's failure table groups by kind."""
    if resp.status_code == 0:
        return None, "timeout" if "Timeout" in type(resp.error).__name__ else "connection_error", None
    if resp.status_code == 503 and resp.headers.get("Content-Type", "").startswith("application/json"):
        try:
            error = resp.json()["error"]
        except (ValueError, KeyError, TypeError):
            return None, "http_503", None
        # our own refusals: the queue is full (with Retry-After) or the request waited too long
        if "overloaded" in error and resp.headers.get("Retry-After"):
            return None, "refused_overloaded", None
        return None, "refused_queue_timeout" if "in the queue" in error else "http_503", None
    if resp.status_code != 200:
        return None, f"http_{resp.status_code}", None
    ttft_ms = None
    try:
        if stream:
            parts = []
            for line in resp.iter_lines():
                if line:
                    parts.append(json.loads(line))
                    if ttft_ms is None and parts[-1].get("text"):
                        ttft_ms = (time.perf_counter() - t0) * 1000
            result = {**parts[-1], "text": "".join(p.get("text", "") for p in parts)} if parts else {}
        else:
            result = resp.json()
    except OSError:          # the server broke off a streamed answer (an error after the first part)
        return None, "stream_broken", None
    except (ValueError, AttributeError):
        return None, "bad_json", None
    if not isinstance(result, dict) or "error" in result:
        return None, "error_in_body", None
    usage, timings = result.get("usage"), result.get("timings")
    if (result.get("finish_reason") not in ("stop", "length") or not isinstance(usage, dict)
            or not isinstance(timings, dict) or not isinstance(timings.get("batch_size"), int)
            or not all(isinstance(usage.get(k), int) for k in ("prompt_tokens", "completion_tokens"))):
        return None, "bad_shape", None
    if not isinstance(result.get("text"), str) or not result["text"].strip():
        return None, "empty_text", None
    return result, None, ttft_ms if stream else timings.get("ttft_ms")
