"""The OpenAI-compatible dialect: turns a /v1/chat/completions or /v1/completions body into the
engine's request (through the same validation as the native API), and the finished or running
request back into OpenAI's response objects, Server-Sent Event chunks and error bodies. Knows no
server: the TorchServe handler picks the route from the url_path header."""

import json
import time
from dataclasses import replace

from .config import EngineConfig
from .request import Request, RequestError, decode_body, parse_request

CHAT, COMPLETIONS, MODELS = "v1/chat/completions", "v1/completions", "v1/models"
ROUTES = (CHAT, COMPLETIONS, MODELS)
MAX_LOGPROBS = 5
# passed to the engine as they are (vLLM's extensions included)
SHARED = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stream", "ignore_eos", "min_tokens", "timeout_s",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "stop_token_ids")
# accepted only at the value that changes nothing; anything else is a 400 naming the parameter
NEUTRAL = {"n": 1, "best_of": 1, "echo": False, "suffix": None, "tools": None, "tool_choice": None,
           "functions": None, "function_call": None, "response_format": None, "parallel_tool_calls": None}
KNOWN = {CHAT: {"model", "messages", "max_tokens", "max_completion_tokens", "stream_options", "logprobs",
                "top_logprobs", "user", *SHARED, *NEUTRAL} - {"best_of", "echo", "suffix"},
         COMPLETIONS: {"model", "prompt", "max_tokens", "stream_options", "logprobs", "user", *SHARED, *NEUTRAL}
         - {"tools", "tool_choice", "functions", "function_call", "response_format", "parallel_tool_calls"}}


def error_body(message: str, param: str | None, status: int) -> dict:
    kind = {400: "invalid_request_error", 404: "not_found_error", 503: "overloaded_error"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def models_body(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "llmserve"}]}


def parse_openai(route: str, request_id: str, body, model: str, config: EngineConfig,
                 tokenizer) -> tuple[Request, bool]:
    """Validate an OpenAI body: the engine's request and whether a stream ends with a usage chunk.
    Raises RequestError naming the OpenAI parameter (status 404 for an unknown model)."""
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
    if route == CHAT:
        native["messages"] = _messages(body.get("messages"))
        logprobs = _logprobs_flag(body)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("prompt", "prompt must be a string (or a list of one string)")
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
    r.params = replace(r.params, logprobs=logprobs)
    return r, bool((options or {}).get("include_usage"))


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
    """OpenAI's objects for one request on one route; keeps what a stream has already sent."""

    def __init__(self, route: str, r: Request, model: str, include_usage: bool, token_text) -> None:
        self.route, self.r, self.model, self.token_text = route, r, model, token_text
        self.include_usage = include_usage
        prefix = "chatcmpl" if route == CHAT else "cmpl"
        self.id = f"{prefix}-{r.request_id}"
        self.created = int(time.time())
        self.num_sent_tokens = 0          # logprobs already streamed
        self.is_role_sent = False

    def _logprobs(self, start: int, end: int) -> dict | None:
        r = self.r
        if r.params.logprobs is None:
            return None
        entries = [(self.token_text(t), lp, [(self.token_text(a), alp) for a, alp in top])
                   for t, (lp, top) in zip(r.output_ids[start:end], r.logprobs[start:end])]
        if self.route == CHAT:
            def item(text, lp):
                return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
            return {"content": [{**item(t, lp), "top_logprobs": [item(a, alp) for a, alp in top]}
                                for t, lp, top in entries]}
        return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [dict(top) for _, _, top in entries], "text_offset": []}

    def _usage(self) -> dict:
        r = self.r
        return {"prompt_tokens": len(r.prompt_ids), "completion_tokens": len(r.output_ids),
                "total_tokens": len(r.prompt_ids) + len(r.output_ids),
                "prompt_tokens_details": {"cached_tokens": r.num_cached_tokens},
                # OpenAI's names for predicted outputs: our drafts kept and dropped
                "completion_tokens_details": {"accepted_prediction_tokens": r.num_accepted_tokens,
                                              "rejected_prediction_tokens": r.num_draft_tokens - r.num_accepted_tokens}}

    def _object(self, choice: dict, chunk: bool) -> dict:
        kind = ("chat.completion" if self.route == CHAT else "text_completion") + (".chunk" if chunk and self.route == CHAT else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}

    def whole(self) -> dict:
        r = self.r
        choice = {"index": 0, "logprobs": self._logprobs(0, len(r.output_ids)), "finish_reason": r.finish_reason}
        if self.route == CHAT:
            choice["message"] = {"role": "assistant", "content": r.text}
        else:
            choice["text"] = r.text
        return {**self._object(choice, chunk=False), "usage": self._usage()}

    def events(self, delta: str) -> str:
        """The Server-Sent Events for the text not yet sent (delta), the final chunk and [DONE]."""
        r = self.r
        end = len(r.output_ids)
        if not delta and not r.is_finished:      # nothing yet: no part, so no HTTP head goes out
            return ""
        choice = {"index": 0, "logprobs": self._logprobs(self.num_sent_tokens, end),
                  "finish_reason": r.finish_reason if r.is_finished else None}
        self.num_sent_tokens = end
        if self.route == CHAT:
            choice["delta"] = {"content": delta} if self.is_role_sent else {"role": "assistant", "content": delta}
            self.is_role_sent = True
        else:
            choice["text"] = delta
        usage = {"usage": None} if self.include_usage else {}
        lines = [self._object(choice, chunk=True) | usage]
        if r.is_finished and self.include_usage:
            lines.append({**self._object(choice, chunk=True), "choices": [], "usage": self._usage()})
        out = "".join(f"data: {json.dumps(line)}\n\n" for line in lines)
        return out + ("data: [DONE]\n\n" if r.is_finished else "")
