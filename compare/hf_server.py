"""The naive peer: transformers' `generate`, one request at a time, behind an OpenAI-style
`POST /v1/chat/completions` (plain or `stream`ed as server-sent events) and `GET /health`.
What a user gets without a serving engine: no batching, no scheduling, bf16 on the CPU.

    .venv/bin/python compare/hf_server.py --model models/smollm2-135m-instruct --port 8300
"""

import argparse
import json
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, TextIteratorStreamer


class Generator:
    """The model, its tokenizer and the lock that makes requests take turns."""

    def __init__(self, model_dir: str) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
        self.lock = threading.Lock()

    def generate(self, body: dict, sock: socket.socket,
                 streamer: TextIteratorStreamer | None = None) -> tuple[str, int, int]:
        """(text, prompt tokens, completion tokens) of one greedy answer; ignore_eos forbids EOS;
        it stops early when the client on `sock` leaves."""
        input_ids = self.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True,
                                                       return_tensors="pt", return_dict=True)["input_ids"]
        max_tokens = int(body.get("max_tokens", 64))
        min_tokens = max_tokens if body.get("ignore_eos") else 0
        with torch.inference_mode():
            output = self.model.generate(input_ids, max_new_tokens=max_tokens, min_new_tokens=min_tokens,
                                         do_sample=False, streamer=streamer,
                                         stopping_criteria=[ClientGone(sock)])
        new_ids = output[0, input_ids.shape[1]:]
        return self.tokenizer.decode(new_ids, skip_special_tokens=True), input_ids.shape[1], len(new_ids)


def client_is_gone(sock: socket.socket) -> bool:
    """True when the client closed its connection while this request waited for the lock."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""


class ClientGone(StoppingCriteria):
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), client_is_gone(self.sock), dtype=torch.bool)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    generator: Generator

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._send_json(200 if self.path == "/health" else 404, {})

    def do_POST(self) -> None:
        if self.path != "/v1/chat/completions":
            return self._send_json(404, {"error": f"no route {self.path}"})
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.generator.lock:
            if client_is_gone(self.connection):
                return
            if body.get("stream"):
                self._stream(body)
            else:
                text, num_prompt, num_completion = self.generator.generate(body, self.connection)
                self._send_json(200, {"object": "chat.completion", "created": int(time.time()),
                                      "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                   "finish_reason": "length"}],
                                      "usage": usage(num_prompt, num_completion)})

    def _stream(self, body: dict) -> None:
        streamer = TextIteratorStreamer(self.generator.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result = {}
        worker = threading.Thread(
            target=lambda: result.update(out=self.generator.generate(body, self.connection, streamer)))
        worker.start()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")   # each event reaches the client as it is made
        self.end_headers()
        try:
            for text in filter(None, streamer):
                self._event({"choices": [{"index": 0, "delta": {"content": text}}]})
            worker.join()
            _, num_prompt, num_completion = result["out"]
            self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
                         "usage": usage(num_prompt, num_completion)})
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            worker.join()   # the client left: generate stops at its next token

    def _event(self, obj: dict) -> None:
        self._chunk(f"data: {json.dumps(obj)}\n\n".encode())

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def usage(num_prompt: int, num_completion: int) -> dict:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local Hugging Face model directory")
    parser.add_argument("--port", type=int, default=8300)
    args = parser.parse_args()
    Handler.generator = Generator(args.model)
    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
