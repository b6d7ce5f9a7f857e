"""What a server owes each client while its request runs: the protocol state of one exchange and
its bodies in the client's dialect: the native JSON (streamed as newline-delimited JSON) or
OpenAI's objects (streamed as Server-Sent Events, see openai_api.py). Knows no server: the
TorchServe handler keeps one Exchange per request id."""

import json
from dataclasses import dataclass

from .openai_api import Formatter, error_body
from .request import Request

JSON, NDJSON, SSE = "application/json", "application/x-ndjson", "text/event-stream"


def stream_delta(r: Request) -> str:
    """Text the client has not seen yet, holding back what may be the start of a stop string;
    everything once the request is finished. (The engine holds back an unfinished UTF-8
    character itself.)"""
    text = r.text
    end = len(text)
    if not r.is_finished:
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


def error_json(openai: bool, status: int, message: str, field: str | None) -> str:
    """A whole error response's body in the client's dialect."""
    return json.dumps(error_body(message, field, status) if openai else {"error": message, "field": field})


@dataclass
class Exchange:
    """One HTTP request's protocol state. Under TorchServe's continuous batching the HTTP head goes
    out with a request's first part, after which only 200 parts can follow: so a request sends
    nothing until it has text to stream, or (not streamed) until it is finished; until then an
    error, a timeout in the queue or a dead worker can still reach its client as a whole 4xx/5xx.
    requests: the engine's request, or one for each of OpenAI's n choices (the first one's stream
    flag, tenant and tier are theirs all)."""
    requests: list[Request]
    openai: Formatter | None = None   # None: the native dialect
    is_open: bool = False             # a first part (with a 200 head) went out

    @property
    def request(self) -> Request:
        return self.requests[0]

    @property
    def is_finished(self) -> bool:
        return all(r.is_finished for r in self.requests)

    @property
    def content_type(self) -> str:
        if not self.request.stream:
            return JSON
        return SSE if self.openai else NDJSON

    def part(self) -> str:
        """A stream's next part: its new text (everything left once finished), or ""."""
        if self.openai:
            return self.openai.events([stream_delta(r) for r in self.requests])
        return chunk(self.request)

    def whole(self) -> str:
        """A finished request's one body (not streamed)."""
        return json.dumps(self.openai.whole() if self.openai else self.request.result())

    def error_part(self, message: str) -> str:
        """An error after the head went out: the stream's last part says so."""
        body = error_json(self.openai is not None, 500, message, None)
        return f"data: {body}\n\ndata: [DONE]\n\n" if self.openai else body + "\n"
