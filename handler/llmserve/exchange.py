"""What a server owes each client while its request runs: the protocol state of one exchange and
the streamed parts (newline-delimited JSON) cut from the request's text. Knows no server: the
TorchServe handler keeps one Exchange per request id."""

import json
from dataclasses import dataclass

from .request import Request


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


@dataclass
class Exchange:
    """One HTTP request's protocol state. A stepping server (TorchServe's continuous batching)
    sends the HTTP head with a request's first part, so a request that finishes in its first
    response is closed with an empty last part at the next step; an error goes out as one whole
    response, since the server closes the connection after a 4xx/5xx head."""
    request: Request | None           # None: rejected before the engine saw it
    is_open: bool = False             # a first part (with a 200 head) went out
    is_closing: bool = False          # only an empty last part is left to send
