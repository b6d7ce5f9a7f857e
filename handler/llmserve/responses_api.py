"""OpenAI's Responses API (/v1/responses, what the openai client's responses.create and the Agents
SDK call): a body is told as the chat route's (input and instructions as messages,
max_output_tokens, text.format as response_format) and validated there, errors named in the
Responses' own words; the finished or running request comes back as a `response` object, or
streamed as its typed events (response.created ... response.output_text.delta ...
response.completed). Nothing is stored: previous_response_id is refused. Knows no server."""

import json
import time

from .config import EngineConfig
from .openai_api import CHAT, joined_text, parse_openai
from .request import Request, RequestError, decode_body

RESPONSES = "v1/responses"
# the chat route's names for the Responses' own, to name a field in an error the way it was sent
CHAT_NAMES = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text"}
PASSED = ("model", "temperature", "top_p", "stream", "user", "parallel_tool_calls", "prediction")
IGNORED = ("metadata", "store")          # about keeping the response: nothing is kept either way
# accepted only at a value that changes nothing here, and why not another
NEUTRAL = {"tools": [], "tool_choice": ("none", "auto"), "reasoning": None, "truncation": ("disabled",),
           "include": [], "previous_response_id": None, "background": (False,)}
WHY = {"previous_response_id": ": nothing is stored", "reasoning": ": the model does not reason",
       "tools": ": a forced call is /v1/chat/completions' tool_choice"}


def parse_responses(request_id: str, body, model: str, config: EngineConfig, tokenizer) -> tuple[Request, "Responses"]:
    """The engine's request for a Responses body, and its formatter. Raises RequestError naming the
    Responses parameter."""
    body = decode_body(body)
    for name, value in body.items():
        if name not in (*PASSED, *IGNORED, *NEUTRAL, "input", "instructions", "max_output_tokens", "text"):
            raise RequestError(name, f"unknown or unsupported parameter {name!r} for /{RESPONSES}")
        allowed = NEUTRAL.get(name, value)                   # PASSED and IGNORED ones: any value here
        if value is not None and value != allowed and not (isinstance(allowed, tuple) and value in allowed):
            raise RequestError(name, f"{name}={json.dumps(value)[:80]} is not supported on /{RESPONSES}"
                                     + WHY.get(name, ""))
    chat = {k: body[k] for k in PASSED if body.get(k) is not None}
    chat["messages"] = _messages(body.get("input"), body.get("instructions"))
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    if body.get("text") is not None:
        chat["response_format"] = _format(body["text"])
    try:
        requests, _ = parse_openai(CHAT, request_id, chat, model, config, tokenizer)
    except RequestError as e:
        e.field = CHAT_NAMES.get(e.field, e.field)
        raise
    return requests[0], Responses(requests, model, body)


def _messages(items, instructions) -> list[dict]:
    """input (text, or message items whose content is text or input_text / output_text parts) after
    instructions (a system message), as chat messages."""
    if instructions is not None and not isinstance(instructions, str):
        raise RequestError("instructions", "instructions must be a string")
    out = [{"role": "system", "content": instructions}] if instructions else []
    if isinstance(items, str):
        return out + [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise RequestError("input", "input must be a string or a non-empty list of message items")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or item.get("type", "message") != "message" or "role" not in item:
            raise RequestError("input", f"input[{i}] must be a message item ({{role, content}}); other item "
                                        "types (function calls, images, reasoning) are not supported")
        content = joined_text(item.get("content"), ("input_text", "output_text"), "input", f"input[{i}].content")
        out.append({"role": item["role"], "content": content})
    return out


def _format(text) -> dict:
    """text: {"format": {"type": "text" | "json_object"} or {"type": "json_schema", "name", "schema",
    "strict"?, "description"?}}, as the chat route's response_format."""
    fmt = text.get("format") if isinstance(text, dict) and set(text) <= {"format", "verbosity"} else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
    if fmt is None or not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object"):
        raise RequestError("text", 'text must be {"format": {"type": "text" | "json_object" | "json_schema", ...}}')
    return fmt


class Responses:
    """The `response` object of one request, and its stream of events."""

    def __init__(self, requests: list[Request], model: str, body: dict) -> None:
        self.requests, self.request, self.model = requests, requests[0], model
        self.id, self.item_id = f"resp_{self.request.request_id}", f"msg_{self.request.request_id}"
        self.created = int(time.time())
        self.settings = {"instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
                         "temperature": self.request.params.temperature, "top_p": self.request.params.top_p,
                         "parallel_tool_calls": body.get("parallel_tool_calls", True),
                         "tool_choice": body.get("tool_choice") or "auto", "tools": [],
                         "text": body.get("text") or {"format": {"type": "text"}},
                         "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {}, "store": False}
        self.sequence = 0                                    # events sent
        self.text = ""                                       # text streamed so far
        self.is_closed = False                               # its closing events went out

    def _item(self, text: str, done: bool) -> dict:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if done else []
        return {"id": self.item_id, "type": "message", "role": "assistant",
                "status": "completed" if done else "in_progress", "content": content}

    def _response(self) -> dict:
        r = self.request
        status = "in_progress" if not r.is_finished else "incomplete" if r.finish_reason == "length" else "completed"
        body = {"id": self.id, "object": "response", "created_at": self.created, "status": status, "model": self.model,
                "output": [self._item(r.text, True)] if r.is_finished else [], "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                **self.settings, "usage": None}
        if r.is_finished:
            body["usage"] = {"input_tokens": len(r.prompt_ids), "output_tokens": len(r.output_ids),
                             "total_tokens": len(r.prompt_ids) + len(r.output_ids),
                             "input_tokens_details": {"cached_tokens": r.num_cached_tokens},
                             "output_tokens_details": {"reasoning_tokens": 0}}
        return body

    def whole(self) -> dict:
        return self._response()

    def events(self, deltas: list[str]) -> str:
        """The Server-Sent Events for the text not yet sent (deltas[0]): the response's opening events
        with the first, its closing ones once it is finished; "" while there is nothing."""
        r, delta = self.request, deltas[0]
        events = []
        if self.sequence == 0 and (delta or r.is_finished):
            events += [("response.created", {"response": self._response()}),
                       ("response.in_progress", {"response": self._response()}),
                       ("response.output_item.added", {"output_index": 0, "item": self._item("", False)}),
                       ("response.content_part.added", {"item_id": self.item_id, "output_index": 0, "content_index": 0,
                                                        "part": {"type": "output_text", "text": "", "annotations": []}})]
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        if delta:
            self.text += delta
            events.append(("response.output_text.delta", {**where, "delta": delta, "logprobs": []}))
        if r.is_finished and not self.is_closed:
            self.is_closed = True
            part = {"type": "output_text", "text": self.text, "annotations": []}
            events += [("response.output_text.done", {**where, "text": self.text, "logprobs": []}),
                       ("response.content_part.done", {**where, "part": part}),
                       ("response.output_item.done", {"output_index": 0, "item": self._item(self.text, True)}),
                       ("response." + ("incomplete" if r.finish_reason == "length" else "completed"),
                        {"response": self._response()})]
        out = []
        for kind, data in events:
            out.append(f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': self.sequence, **data})}\n\n")
            self.sequence += 1
        return "".join(out)
