"""The OpenAI-compatible dialect: turns a /v1/chat/completions or /v1/completions body into the
engine's request (through the same validation as the native API), and the finished or running
request back into OpenAI's response objects, Server-Sent Event chunks and error bodies. Knows no
server: the TorchServe handler picks the route from the url_path header."""

import json
import time
from dataclasses import replace
from itertools import accumulate

from .config import EngineConfig
from .json_schema import SchemaError, response_schema
from .request import Request, RequestError, decode_body, parse_request

CHAT, COMPLETIONS, MODELS = "v1/chat/completions", "v1/completions", "v1/models"
ROUTES = (CHAT, COMPLETIONS, MODELS)
MAX_LOGPROBS = 5
MAX_CHOICES = 16     # n at most (and at most max_num_seqs: the choices are decoded side by side)
# passed to the engine as they are (vLLM's extensions included)
SHARED = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stream", "ignore_eos", "min_tokens", "timeout_s",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "stop_token_ids", "response_format")
# accepted only at the value that changes nothing; anything else is a 400 naming the parameter
NEUTRAL = {"best_of": 1, "suffix": None, "functions": None, "function_call": None, "store": False}
KNOWN = {CHAT: {"model", "messages", "max_tokens", "max_completion_tokens", "stream_options", "logprobs",
                "top_logprobs", "user", "n", "tools", "tool_choice", "parallel_tool_calls", "prediction", *SHARED,
                *NEUTRAL}
         - {"best_of", "echo", "suffix"},
         COMPLETIONS: {"model", "prompt", "max_tokens", "stream_options", "logprobs", "user", "n", "echo", *SHARED,
                       *NEUTRAL}
         - {"functions", "function_call", "store"}}
ANY_TOOL = "*"        # Formatter's tool: one of several, named in the answer's text ({"name", "arguments"})
AUTO_TOOLS = ('tool_choice "auto" needs a model trained to call tools and a parser for its calls (vLLM\'s '
              '--tool-call-parser); send "required" (one tool), {"type": "function", "function": {"name": ...}} or "none"')


def error_body(message: str, param: str | None, status: int) -> dict:
    kind = {400: "invalid_request_error", 404: "not_found_error", 503: "overloaded_error"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def models_body(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "llmserve"}]}


def parse_openai(route: str, request_id: str, body, model: str, config: EngineConfig,
                 tokenizer) -> tuple[list[Request], dict]:
    """Validate an OpenAI body: the engine's requests, one a choice (n; the first's id is request_id,
    choice i's request_id-i), and the Formatter's options: include_usage (a stream ends with a usage
    chunk), echo (completions: the prompt's text, to put before each choice's, else None),
    hide_output (echo with max_tokens 0: the prompt alone, its one generated token not shown) and tool
    (chat: the function a forced tool call names, its arguments held to its parameters' schema).
    Raises RequestError naming the OpenAI parameter (status 404 for an unknown model)."""
    body = decode_body(body)
    for name, value in body.items():
        if name not in KNOWN[route]:
            raise RequestError(name, f"unknown or unsupported parameter {name!r} for /{route}")
        if name in NEUTRAL and value != NEUTRAL[name] and value is not None:
            raise RequestError(name, f"{name}={json.dumps(value)} is not supported (only {json.dumps(NEUTRAL[name])})")
    if body.get("model") is None:
        raise RequestError("model", f"model is required; this server has {model!r}")
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
    tool = _forced_tool(body) if route == CHAT else None
    if route == CHAT:
        native["messages"] = _messages(body.get("messages"))
        if body.get("prediction") is not None:
            native["prediction"] = _prediction(body["prediction"])
        logprobs = _logprobs_flag(body)
        if tool is not None:
            if native.get("response_format") not in (None, {"type": "text"}):
                raise RequestError("tool_choice", "a forced tool call and response_format cannot go together")
            native["response_format"] = {"type": "json_schema", "json_schema": {"name": "call", "schema": _call_schema(tool)}}
            native["messages"] = _with_tool(native["messages"], tool)
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
                                                      "echo": echo_text, "hide_output": hide_output,
                                                      "tool": tool and (tool[0]["name"] if len(tool) == 1 else ANY_TOOL)}


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
                       params=replace(r.params, seed=seed, prompt_logprobs=None), stream=r.stream,
                       prediction_ids=r.prediction_ids)
        twin.arrival_time, twin.deadline = r.arrival_time, r.deadline
        out.append(twin)
    return out


def _forced_tool(body: dict) -> list[dict] | None:
    """The functions tool_choice makes the model call one of ({name, description, parameters} each),
    or None: "required", all the tools; a named one, it alone; "none" or no tools, no call. "auto",
    the default with tools, is refused, as vLLM refuses it without a parser for the model's own calls."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise RequestError("parallel_tool_calls", f"parallel_tool_calls must be true or false, got {json.dumps(parallel)}")
    if tools is None:
        if choice not in (None, "none"):
            raise RequestError("tool_choice", "tool_choice needs tools")
        return None
    if not isinstance(tools, list) or not tools or not all(
            isinstance(t, dict) and t.get("type") == "function" and set(t) == {"type", "function"}
            and isinstance(t["function"], dict) and isinstance(t["function"].get("name"), str)
            and set(t["function"]) <= {"name", "description", "parameters", "strict"} for t in tools):
        raise RequestError("tools", 'tools must be a non-empty list of {"type": "function", "function": '
                                    '{"name", "description", "parameters"}}')
    functions = {t["function"]["name"]: t["function"] for t in tools}
    if len(functions) < len(tools):
        raise RequestError("tools", "tools must have different names")
    for name, f in functions.items():
        try:
            response_schema({"type": "json_schema", "json_schema": {"name": name, "schema": _parameters(f)}})
        except SchemaError as e:
            raise RequestError("tools", f"tools: {name}: {e}") from None
    if choice in (None, "auto"):
        raise RequestError("tool_choice", AUTO_TOOLS)
    if choice == "none":
        return None
    if choice == "required":
        return [{"name": name, "description": f.get("description"), "parameters": _parameters(f)}
                for name, f in functions.items()]
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in functions:
            raise RequestError("tool_choice", f"no tool is named {json.dumps(name)}")
    else:
        raise RequestError("tool_choice", 'tool_choice must be "none", "auto", "required" or {"type": "function", '
                                          f'"function": {{"name": ...}}}}, got {json.dumps(choice)}')
    f = functions[name]
    return [{"name": name, "description": f.get("description"), "parameters": _parameters(f)}]


def _parameters(function: dict) -> dict:
    return function.get("parameters") or {"type": "object", "properties": {}}


def _call_schema(tools: list[dict]) -> dict:
    """What the answer is held to: one function's arguments; for one of several, {"name": <a tool's>,
    "arguments": <that tool's>} (an anyOf whose alternatives the name's constant tells apart)."""
    if len(tools) == 1:
        return tools[0]["parameters"]
    return {"anyOf": [{"type": "object", "properties": {"name": {"const": t["name"]}, "arguments": t["parameters"]},
                       "required": ["name", "arguments"]} for t in tools]}


def _with_tool(messages: list[dict], tools: list[dict]) -> list[dict]:
    """The conversation with the functions to call described in its system message (the chat
    template's default one replaced where there was none): a small model fills arguments it was told of."""
    about = [f"{t['name']}" + (f" ({t['description']})" if t["description"] else "") + f", arguments of this schema: "
             f"{json.dumps(t['parameters'])}" for t in tools]
    text = (f"Call the function {about[0]}. Reply with its arguments as a JSON object." if len(tools) == 1 else
            "Call one of these functions: " + "; ".join(about) + '. Reply with a JSON object {"name": <the function>, '
            '"arguments": <its arguments>}.')
    if messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + text}] + messages[1:]
    return [{"role": "system", "content": text}] + messages


def _messages(messages) -> list[dict]:
    """OpenAI messages as the chat template wants them: text parts joined, developer as system."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") if isinstance(m, dict) and m.get("role") == "assistant" else None
        if calls is not None:   # an earlier forced call: the model said its arguments
            if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                      for c in calls):
                raise RequestError("messages", f"messages[{i}].tool_calls must be a list of {{id, type, function}}")
            m = {"role": "assistant", "content": "\n".join(str(c["function"].get("arguments", "")) for c in calls)}
        if isinstance(m, dict) and m.get("role") == "tool":   # a call's result, told as the user's turn
            m = {"role": "user", "content": m.get("content"), **({"name": m["name"]} if "name" in m else {})}
            m["content"] = ("Tool result: " + m["content"]) if isinstance(m["content"], str) else m["content"]
        if not isinstance(m, dict) or not {"role", "content"} <= set(m) or set(m) - {"role", "content", "name"}:
            raise RequestError("messages", f"messages[{i}] must have role and content (and optionally name) only")
        content = joined_text(m["content"], ("text",), "messages", f"messages[{i}].content")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def joined_text(content, kinds: tuple[str, ...], field: str, where: str):
    """A message's content given as parts of these kinds (text parts), as one text; any other
    content as it is (checked where it is used)."""
    if not isinstance(content, list):
        return content
    if not all(isinstance(p, dict) and p.get("type") in kinds and isinstance(p.get("text"), str) for p in content):
        raise RequestError(field, f"{where}: only {' and '.join(kinds)} parts are supported")
    return "".join(p["text"] for p in content)


def _prediction(prediction) -> str:
    """Predicted outputs: {"type": "content", "content": text or text parts}, the text the answer is
    expected to repeat; drafts come from it first (speculative.py). It changes no token, only how
    many a step may keep."""
    content = prediction.get("content") if isinstance(prediction, dict) and prediction.get("type") == "content" else None
    if isinstance(content, list):
        content = joined_text(content, ("text",), "prediction", "prediction.content")
    if not isinstance(content, str) or set(prediction) != {"type", "content"}:
        raise RequestError("prediction", 'prediction must be {"type": "content", "content": text or a list of '
                                         f'text parts}}, got {json.dumps(prediction)[:100]}')
    return content


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
    asked for; hide_output: the choices' generated tokens left out (echo with max_tokens 0); tool: the
    function a forced call names, each choice's text then its arguments in message.tool_calls."""

    def __init__(self, route: str, requests: list[Request], model: str, token_text, include_usage: bool = False,
                 echo: str | None = None, hide_output: bool = False, tool: str | None = None) -> None:
        self.route, self.requests, self.model, self.token_text = route, requests, model, token_text
        self.include_usage, self.echo, self.hide_output, self.tool = include_usage, echo, hide_output, tool
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

    def _call(self, r: Request) -> dict | None:
        """r's answer as a tool call: its text is the named function's arguments, or (ANY_TOOL) the
        object {"name", "arguments"}; None where that is cut short (max_tokens) and does not parse."""
        if self.tool != ANY_TOOL:
            return {"id": f"call_{r.request_id}", "type": "function", "function": {"name": self.tool, "arguments": r.text}}
        try:
            answer = json.loads(r.text)
            function = {"name": answer["name"], "arguments": json.dumps(answer["arguments"], ensure_ascii=False)}
        except (ValueError, KeyError, TypeError):
            return None
        return {"id": f"call_{r.request_id}", "type": "function", "function": function}

    def whole(self) -> dict:
        choices = []
        for i, r in enumerate(self.requests):
            choice = {"index": i, "logprobs": self._logprobs(i, 0, len(r.output_ids), echo=self.echo is not None),
                      "finish_reason": r.finish_reason}
            if self.route == CHAT and self.tool and (call := self._call(r)):
                choice["message"] = {"role": "assistant", "content": None, "tool_calls": [call]}
            elif self.route == CHAT:
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
            if self.tool == ANY_TOOL and not r.is_finished:
                continue
            if self.is_end_sent[i] or not (delta or r.is_finished or echo and prompt_done):
                continue
            end = len(r.output_ids)
            choice = {"index": i, "logprobs": self._logprobs(i, self.num_sent_tokens[i], end, echo),
                      "finish_reason": r.finish_reason if r.is_finished else None}
            self.num_sent_tokens[i], self.is_end_sent[i], self.is_started[i] = end, r.is_finished, True
            if self.route == CHAT and self.tool == ANY_TOOL:   # whole at the end: the name is in the text
                call = self._call(r)
                choice["delta"] = {"role": "assistant"} | ({"content": None, "tool_calls": [{"index": 0} | call]}
                                                         if call else {"content": r.text})
            elif self.route == CHAT and self.tool:   # the call's name first, then its arguments piece by piece
                call = {"index": 0, "function": {"arguments": delta}}
                if first:
                    call = {"index": 0} | self._call(r) | {"function": {"name": self.tool, "arguments": delta}}
                choice["delta"] = ({"role": "assistant", "content": None} if first else {}) | {"tool_calls": [call]}
            elif self.route == CHAT:
                choice["delta"] = {"role": "assistant", "content": delta} if first else {"content": delta}
            else:
                choice["text"] = (self.echo if echo else "") + delta
            lines.append(self._object([choice], chunk=True) | usage)
        done = bool(lines) and all(self.is_end_sent)
        if done and self.include_usage:
            lines.append({**self._object([], chunk=True), "usage": self._usage()})
        out = "".join(f"data: {json.dumps(line)}\n\n" for line in lines)
        return out + ("data: [DONE]\n\n" if done else "")
