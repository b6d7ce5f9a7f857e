"""The OpenAI-compatible dialect: turns a /v1/chat/completions or /v1/completions body into the
engine's request (through the same validation as the native API), and the finished or running
request back into OpenAI's response objects, Server-Sent Event chunks and error bodies. Knows no
server: the TorchServe handler picks the route from the url_path header."""

import json
import time
from dataclasses import replace
from itertools import accumulate

from .config import EngineConfig
from .request import Request, RequestError, decode_body, parse_request

CHAT, COMPLETIONS, MODELS = "v1/chat/completions", "v1/completions", "v1/models"
ROUTES = (CHAT, COMPLETIONS, MODELS)
MAX_LOGPROBS = 5
MAX_CHOICES = 16     # n at most (and at most max_num_seqs: the choices are decoded side by side)
# passed to the engine as they are (vLLM's extensions included)
SHARED = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stream", "ignore_eos", "min_tokens", "timeout_s",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "stop_token_ids", "response_format")
# accepted only at the value that changes nothing; anything else is a 400 naming the parameter
NEUTRAL = {"best_of": 1, "suffix": None, "tools": None, "tool_choice": None,
           "functions": None, "function_call": None, "parallel_tool_calls": None}
KNOWN = {CHAT: {"model", "messages", "max_tokens", "max_completion_tokens", "stream_options", "logprobs",
                "top_logprobs", "user", "n", *SHARED, *NEUTRAL} - {"best_of", "echo", "suffix"},
         COMPLETIONS: {"model", "prompt", "max_tokens", "stream_options", "logprobs", "user", "n", "echo", *SHARED,
                       *NEUTRAL}
         - {"tools", "tool_choice", "functions", "function_call", "parallel_tool_calls"}}


def error_body(message: str, param: str | None, status: int) -> dict:
    kind = {400: "invalid_request_error", 404: "not_found_error", 503: "overloaded_error"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def models_body(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "llmserve"}]}


def parse_openai(route: str, request_id: str, body, model: str, config: EngineConfig,
                 tokenizer) -> tuple[list[Request], dict]:
    """Validate an OpenAI body: the engine's requests, one a choice (n; the first's id is request_id,
    choice i's request_id-i), and the Formatter's options: include_usage (a stream ends with a usage
    chunk), echo (completions: the prompt's text, to put before each choice's, else None) and
    hide_output (echo with max_tokens 0: the prompt alone, its one generated token not shown). Raises
    RequestError naming the OpenAI parameter (status 404 for an unknown model)."""
    body = decode_body(body)
    for name, value in body.items():
        if name not in KNOWN[route]:
            raise RequestError(name, f"unknown or unsupported parameter {name!r} for /{route}")
        if name in NEUTRAL and value != NEUTRAL[name] and value is not None:
            raise RequestError(name, f"{name}={json.dumps(value)} is not supported (only {json.dumps(NEUTRAL[name])})")
    if body.get("model") != model:
        raise RequestError("model", f"the model {json.dumps(body.get('model'))} does not exist; this server has {model!r}",
                           status=404)
    native = {k: body[k] for k in SHARED if body.get(k) is not None}
    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if body.get(limit) is not None:
        native["max_new_tokens"] = body[limit]
    echo = body.get("echo") or False
    if not isinstance(echo, bool):
        raise RequestError("echo", f"echo must be true or false, got {json.dumps(echo)}")
    hide_output = echo and body.get(limit) == 0 and not isinstance(body.get(limit), bool)
    if hide_output:                      # the prompt's log-probabilities alone (lm-eval's loglikelihood)
        native["max_new_tokens"] = 1
    if route == CHAT:
        native["messages"] = _messages(body.get("messages"))
        logprobs = _logprobs_flag(body)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if not isinstance(prompt, (str, list)) or isinstance(prompt, list) and not all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise RequestError("prompt", "prompt must be a string or a list of token ids (or a list of one of them)")
        native["prompt"] = prompt
        logprobs = _logprobs_count(body, "logprobs")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}
                                or not isinstance(options.get("include_usage", False), bool)):
        raise RequestError("stream_options", "stream_options must be {\"include_usage\": true|false}")
    try:
        r = parse_request(request_id, native, config, tokenizer)
    except RequestError as e:
        e.field = limit if e.field == "max_new_tokens" else e.field
        raise
    r.params = replace(r.params, logprobs=logprobs, prompt_logprobs=logprobs if echo else None)
    echo_text = None
    if echo:
        echo_text = tokenizer.decode(r.prompt_ids) if isinstance(native["prompt"], list) else native["prompt"]
    return choices(r, _choices_count(body, config)), {"include_usage": bool((options or {}).get("include_usage")),
                                                      "echo": echo_text, "hide_output": hide_output}


def _choices_count(body: dict, config: EngineConfig) -> int:
    value = body.get("n")
    if value is None:
        return 1
    most = min(MAX_CHOICES, config.max_num_seqs)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
        raise RequestError("n", f"n must be an integer between 1 and {most}, got {json.dumps(value)}")
    return value


def choices(r: Request, n: int) -> list[Request]:
    """r and n - 1 more requests for the same prompt (OpenAI's n choices), each its own sequence: a
    seeded request's choice i takes seed + i, so the choices differ and each is reproducible (greedy
    choices are all alike, as OpenAI's are)."""
    out = [r]
    for i in range(1, n):
        seed = None if r.params.seed is None else (r.params.seed + i) % 2 ** 63
        twin = Request(request_id=f"{r.request_id}-{i}", prompt_ids=list(r.prompt_ids),   # the prompt scored once
                       params=replace(r.params, seed=seed, prompt_logprobs=None), stream=r.stream)
        twin.arrival_time, twin.deadline = r.arrival_time, r.deadline
        out.append(twin)
    return out


def _messages(messages) -> list[dict]:
    """OpenAI messages as the chat template wants them: text parts joined, developer as system."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not {"role", "content"} <= set(m) or set(m) - {"role", "content", "name"}:
            raise RequestError("messages", f"messages[{i}] must have role and content (and optionally name) only")
        content = m["content"]
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError("messages", f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def _logprobs_flag(body: dict) -> int | None:
    if body.get("logprobs") is None or body["logprobs"] is False:
        if body.get("top_logprobs"):
            raise RequestError("top_logprobs", "top_logprobs needs logprobs: true")
        return None
    if body["logprobs"] is not True:
        raise RequestError("logprobs", f"logprobs must be true or false, got {json.dumps(body['logprobs'])}")
    return _logprobs_count(body, "top_logprobs") or 0


def _logprobs_count(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_LOGPROBS:
        raise RequestError(name, f"{name} must be an integer between 0 and {MAX_LOGPROBS}, got {json.dumps(value)}")
    return value


class Formatter:
    """OpenAI's objects for one request's choices (its engine requests, index i for requests[i]) on one
    route; keeps what a stream has already sent of each. echo: the prompt's text, put before each
    choice's (completions), with its tokens' log-probabilities (the first's null) where logprobs are
    asked for; hide_output: the choices' generated tokens left out (echo with max_tokens 0)."""

    def __init__(self, route: str, requests: list[Request], model: str, token_text, include_usage: bool = False,
                 echo: str | None = None, hide_output: bool = False) -> None:
        self.route, self.requests, self.model, self.token_text = route, requests, model, token_text
        self.include_usage, self.echo, self.hide_output = include_usage, echo, hide_output
        prefix = "chatcmpl" if route == CHAT else "cmpl"
        self.id = f"{prefix}-{requests[0].request_id}"
        self.created = int(time.time())
        self.num_sent_tokens = [0] * len(requests)        # logprobs already streamed, per choice
        self.num_sent_chars = [0] * len(requests)         # ... and the characters of their tokens (text_offset)
        self.is_started = [False] * len(requests)         # a chunk of the choice went out
        self.is_end_sent = [False] * len(requests)        # the choice's chunk with its finish_reason

    def _entries(self, i: int, start: int, end: int, echo: bool) -> list[tuple]:
        """(text, logprob, [(rival text, logprob), ...]) of choice i's output tokens start..end, after
        the prompt's where echo (the first token's logprob and rivals None)."""
        def entry(token, lp, top):
            return self.token_text(token), lp, [(self.token_text(a), alp) for a, alp in top]
        r, first = self.requests[i], self.requests[0]
        prompt = []
        if echo:
            prompt = [(self.token_text(first.prompt_ids[0]), None, None)]
            prompt += [entry(t, lp, top) for t, (lp, top) in zip(first.prompt_ids[1:], first.prompt_logprobs)]
        if self.hide_output:
            return prompt
        return prompt + [entry(t, lp, top) for t, (lp, top) in zip(r.output_ids[start:end], r.logprobs[start:end])]

    def _logprobs(self, i: int, start: int, end: int, echo: bool = False) -> dict | None:
        if self.requests[i].params.logprobs is None:
            return None
        entries = self._entries(i, start, end, echo)
        if self.route == CHAT:
            def item(text, lp):
                return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
            return {"content": [{**item(t, lp), "top_logprobs": [item(a, alp) for a, alp in top]}
                                for t, lp, top in entries]}
        offsets = list(accumulate((len(t) for t, _, _ in entries), initial=self.num_sent_chars[i]))
        self.num_sent_chars[i] = offsets.pop()
        return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [None if top is None else dict(top) for _, _, top in entries], "text_offset": offsets}

    def _usage(self) -> dict:
        """The prompt's tokens once (the choices share it), all the choices' completion tokens."""
        first = self.requests[0]
        completion = 0 if self.hide_output else sum(len(r.output_ids) for r in self.requests)
        drafted = sum(r.num_draft_tokens for r in self.requests)
        accepted = sum(r.num_accepted_tokens for r in self.requests)
        return {"prompt_tokens": len(first.prompt_ids), "completion_tokens": completion,
                "total_tokens": len(first.prompt_ids) + completion,
                "prompt_tokens_details": {"cached_tokens": first.num_cached_tokens},
                # OpenAI's names for predicted outputs: our drafts kept and dropped
                "completion_tokens_details": {"accepted_prediction_tokens": accepted,
                                              "rejected_prediction_tokens": drafted - accepted}}

    def _object(self, choices: list[dict], chunk: bool) -> dict:
        kind = ("chat.completion" if self.route == CHAT else "text_completion") + (".chunk" if chunk and self.route == CHAT else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def whole(self) -> dict:
        choices = []
        for i, r in enumerate(self.requests):
            choice = {"index": i, "logprobs": self._logprobs(i, 0, len(r.output_ids), echo=self.echo is not None),
                      "finish_reason": r.finish_reason}
            if self.route == CHAT:
                choice["message"] = {"role": "assistant", "content": r.text}
            else:
                choice["text"] = (self.echo or "") + ("" if self.hide_output else r.text)
            choices.append(choice)
        return {**self._object(choices, chunk=False), "usage": self._usage()}

    def events(self, deltas: list[str]) -> str:
        """The Server-Sent Events for each choice's text not yet sent (deltas[i]): a chunk for each
        choice with news (the echoed prompt first, once the prompt is computed), its last with its
        finish_reason; after the last choice's, the usage chunk and [DONE]. "" while there is nothing
        (so no HTTP head goes out yet)."""
        lines = []
        usage = {"usage": None} if self.include_usage else {}
        prompt_done = self.requests[0].first_token_time is not None or self.requests[0].is_finished
        for i, (r, delta) in enumerate(zip(self.requests, deltas)):
            first, delta = not self.is_started[i], "" if self.hide_output else delta
            echo = first and self.echo is not None
            if self.is_end_sent[i] or not (delta or r.is_finished or echo and prompt_done):
                continue
            end = len(r.output_ids)
            choice = {"index": i, "logprobs": self._logprobs(i, self.num_sent_tokens[i], end, echo),
                      "finish_reason": r.finish_reason if r.is_finished else None}
            self.num_sent_tokens[i], self.is_end_sent[i], self.is_started[i] = end, r.is_finished, True
            if self.route == CHAT:
                choice["delta"] = {"role": "assistant", "content": delta} if first else {"content": delta}
            else:
                choice["text"] = (self.echo if echo else "") + delta
            lines.append(self._object([choice], chunk=True) | usage)
        done = bool(lines) and all(self.is_end_sent)
        if done and self.include_usage:
            lines.append({**self._object([], chunk=True), "usage": self._usage()})
        out = "".join(f"data: {json.dumps(line)}\n\n" for line in lines)
        return out + ("data: [DONE]\n\n" if done else "")
