"""What one request is: its validated parameters, token ids, status and timings. Parses the JSON
body and rejects bad input with a RequestError naming the field. Knows no torch and no server."""

import json
import time
from dataclasses import dataclass, field

from .config import EngineConfig
from .json_schema import SchemaError, response_schema

KNOWN_FIELDS = ("prompt", "messages", "max_new_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                "stop", "stream", "ignore_eos", "min_tokens", "timeout_s", "presence_penalty",
                "frequency_penalty", "repetition_penalty", "logit_bias", "stop_token_ids", "response_format",
                "prediction")
MAX_PENALTY = 2.0   # OpenAI's range for presence_penalty and frequency_penalty: [-2, 2]
MAX_BIAS, MAX_BIASED_TOKENS = 100.0, 1024   # logit_bias: OpenAI's range of a bias; tokens biased at most
MAX_STOP_STRINGS = 8
MAX_STOP_TOKEN_IDS = 64
TIERS = ("premium", "standard", "batch")   # priority tiers, first served first (scheduler.py)
MAX_TOP_K = 2**31 - 1


class RequestError(ValueError):
    """A client error: HTTP 400 (or status) with a body naming the field (exchange.error_json)."""

    def __init__(self, field_name: str | None, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.field = field_name
        self.message = message
        self.status = status


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = no top-k cut
    min_p: float = 0.0                # vLLM's and llama.cpp's: no token less likely than this x the likeliest
    seed: int | None = None           # own random stream: same seed, same sample, whatever the batch
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()   # vLLM's: these tokens end the request too (kept in its text, as EOS is not)
    ignore_eos: bool = False          # vLLM's meaning: EOS does not end the request (fixed-length benchmarks)
    min_tokens: int = 0               # vLLM's meaning: EOS (nor stop_token_ids) cannot be sampled, nor a stop
                                      # string end it, before this
    logprobs: int | None = None       # None: none; k: each output token's log-probability and its k best rivals
    prompt_logprobs: int | None = None   # the same for each prompt token after the first (OpenAI's echo)
    presence_penalty: float = 0.0     # OpenAI's: subtracted from the logit of each token the output holds
    frequency_penalty: float = 0.0    # OpenAI's: ... times the times the output holds it
    repetition_penalty: float = 1.0   # vLLM's (CTRL's): a prompt or output token's logit divided by it if
                                      # positive, multiplied if not; applied before the two above
    logit_bias: tuple[tuple[int, float], ...] = ()   # OpenAI's: (token id, bias) added to its logit first
    response_schema: str | None = None   # OpenAI's response_format: the output is held to a JSON object ("null")
                                         # or to one its schema takes (json_schema.response_schema); None: text

    @property
    def max_stop_len(self) -> int:
        return max(map(len, self.stop), default=0)

    @property
    def adjusts_logits(self) -> bool:
        """A bias or a penalty: sampling reads the logits so adjusted (sampling.adjusted)."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
                or bool(self.logit_bias))

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5   # below this, sampling is argmax (and 1/T would overflow)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool = False
    output_ids: list[int] = field(default_factory=list)
    status: str = "waiting"           # waiting -> running -> finished (running -> waiting on preemption)
    finish_reason: str | None = None  # "stop" | "length" | "timeout" (its own timeout_s) | "abort" (client gone)
                                      # | "queue_timeout" (waited max_queue_wait_s unstarted) | "error"
    error: str | None = None          # why, when finish_reason is "error" (the engine failed its step)
    text: str = ""                    # decoded output, cut before a stop string
    prefix_offset: int = 0            # incremental detokenization: output_ids[prefix_offset:read_offset]
    read_offset: int = 0              # is the context whose text is already in `text`
    num_sent_chars: int = 0           # streaming: how much of text the client already has
    row: int = -1                     # KV cache row while running
    logprobs: list = field(default_factory=list)   # per output token: (logprob, [(rival id, logprob), ...])
    prompt_logprobs: list = field(default_factory=list)   # the same per prompt token after the first
    arrival_time: float = field(default_factory=time.perf_counter)
    deadline: float | None = None     # perf_counter time at which it ends with finish_reason "timeout"
    start_time: float | None = None   # first admitted to a KV row (its queue wait ends)
    first_token_time: float | None = None
    finish_time: float | None = None
    prefill_ms: float = 0.0
    num_cached_tokens: int = 0        # prompt tokens whose keys and values came from the prefix cache
    num_chunked_tokens: int = 0       # prompt tokens computed in chunks before its prefill (engine.py)
    prediction_ids: list[int] = field(default_factory=list)   # the output the client expects (drafts come
                                      # from it first: OpenAI's predicted outputs); it changes no token
    lookup: object = None             # speculative.PromptLookup when this request drafts
    num_draft_tokens: int = 0         # speculative decoding: tokens drafted for it ...
    num_accepted_tokens: int = 0      # ... and kept
    max_batch_size: int = 0           # most sequences this request was decoded together with
    num_preemptions: int = 0
    tenant: str = "anonymous"         # who it is for (tenants.py): its accounting and rate limits
    tier: int = 1                     # index in TIERS (1: standard)
    engine_s: float = 0.0             # its share of the engine steps it was in, by tokens computed
    generator: object = None          # the sampler's own random stream (set by the engine) when sampled
    prompt_vocab: object = None       # its prompt's distinct token ids (set by the engine) for repetition_penalty
    json_grammar: object = None       # JSON mode: its json_mode.Grammar and its output's state there (set by the engine)
    json_state: tuple | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == "finished"

    @property
    def is_scoring_prompt(self) -> bool:
        """Its next prefill computes its prompt's log-probabilities (OpenAI's echo): every position, in
        one go, no cached prefix (engine._prefill_scored). Only the first: a preempted one has them."""
        return self.params.prompt_logprobs is not None and not self.output_ids

    @property
    def reads_argmax_only(self) -> bool:
        """Its next token is its logits' argmax and nothing else reads them (no sampling, no
        logprobs, no min_tokens mask, no bias or penalty): the LM head may be exact at the largest only
        (runner._logits)."""
        p = self.params
        return (p.is_greedy and p.logprobs is None and not p.adjusts_logits and p.response_schema is None
                and len(self.output_ids) >= p.min_tokens)

    @property
    def lm_head(self) -> str:
        """How its logits may be computed (runner._logits): "top" where only their argmax is read,
        "rounded" for a sampled request (the LM head on bf16 activations, PackedLinear.rounded),
        "exact" for a greedy one that reads more (logprobs, the min_tokens mask, a bias or penalty):
        its tokens are then the same as without logprobs."""
        if self.reads_argmax_only:
            return "top"
        return "exact" if self.params.is_greedy else "rounded"

    def timings(self) -> dict:
        end = self.finish_time or time.perf_counter()
        first = self.first_token_time or end
        return {
            "prefill_ms": round(self.prefill_ms, 2),
            "decode_ms": round((end - first) * 1000, 2),
            "ttft_ms": round((first - self.arrival_time) * 1000, 2),
            "total_ms": round((end - self.arrival_time) * 1000, 2),
            "batch_size": self.max_batch_size,
        }

    def result(self) -> dict:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": {"prompt_tokens": len(self.prompt_ids), "completion_tokens": len(self.output_ids),
                      "cached_prompt_tokens": self.num_cached_tokens, "draft_tokens": self.num_draft_tokens,
                      "accepted_draft_tokens": self.num_accepted_tokens},
            "timings": self.timings(),
        }


def decode_body(body) -> dict:
    """The raw HTTP body (bytes, or what TorchServe already decoded from JSON) as a dict."""
    if isinstance(body, str):
        body = _encodable(body, "body").encode("utf-8")
    if isinstance(body, (bytes, bytearray)):
        if not body.strip():
            raise RequestError("body", "request body is empty; send a JSON object with a prompt")
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError("body", f"request body is not valid UTF-8 ({e.reason} at byte {e.start})")
        try:
            body = json.loads(text)
        except json.JSONDecodeError as e:
            raise RequestError("body", f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}")
        except RecursionError:
            raise RequestError("body", "request body is nested too deeply")
    if body is None or body == "":
        raise RequestError("body", "request body is empty; send a JSON object with a prompt")
    if not isinstance(body, dict):
        raise RequestError("body", f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _int(body: dict, name: str, default, lo: int, hi: int | None = None):
    value = body.get(name, default)
    if value is None and default is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(name, f"{name} must be an integer, got {json.dumps(value)}")
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise RequestError(name, f"{name} must be {bound}, got {value}")
    return value


def _float(body: dict, name: str, default: float) -> float:
    value = body.get(name, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise RequestError(name, f"{name} must be a number, got {json.dumps(value)}")
    if value != value or value in (float("inf"), float("-inf")):
        raise RequestError(name, f"{name} must be finite, got {value}")
    return float(value)


def _encodable(value: str, name: str, where: str | None = None) -> str:
    """value, checked to be encodable text (a JSON string may carry lone UTF-16 surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(name, f"{where or name} holds text that cannot be encoded as UTF-8 "
                                 f"(a lone surrogate at character {e.start})")
    return value


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise RequestError(name, f"{name} must be true or false, got {json.dumps(value)}")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop", "stop must be a non-empty string or a list of non-empty strings")
    if len(stop) > MAX_STOP_STRINGS:
        raise RequestError("stop", f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
    return tuple(_encodable(s, "stop") for s in stop)


def _stop_token_ids(body: dict, tokenizer) -> tuple[int, ...]:
    ids = body.get("stop_token_ids", [])
    if not isinstance(ids, list) or len(ids) > MAX_STOP_TOKEN_IDS or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < len(tokenizer) for t in ids):
        raise RequestError("stop_token_ids", f"stop_token_ids must be a list of at most {MAX_STOP_TOKEN_IDS} token ids "
                                             f"in the vocabulary, got {json.dumps(ids)[:100]}")
    return tuple(sorted(set(ids)))


def _logit_bias(body: dict, tokenizer) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: {"<token id>": bias in [-100, 100], ...} as sorted (id, bias) pairs."""
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    vocab_size = len(tokenizer)
    if not isinstance(bias, dict) or len(bias) > MAX_BIASED_TOKENS:
        raise RequestError("logit_bias", f"logit_bias must be an object of at most {MAX_BIASED_TOKENS} "
                                         "\"<token id>\": bias entries")
    pairs = []
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else -1
        if not 0 <= token < vocab_size:
            raise RequestError("logit_bias", f"logit_bias keys must be token ids 0..{vocab_size - 1}, got {key!r}")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not -MAX_BIAS <= value <= MAX_BIAS:
            raise RequestError("logit_bias", f"logit_bias[{key!r}] must be a number from -100 to 100, got {json.dumps(value)}")
        pairs.append((token, float(value)))
    return tuple(sorted(pairs))


def _response_schema(body: dict) -> str | None:
    """response_format: absent or {"type": "text"}, {"type": "json_object"}, or {"type": "json_schema",
    "json_schema": {"name", "schema"}} with a schema json_schema.py takes."""
    try:
        return response_schema(body.get("response_format"))
    except SchemaError as e:
        raise RequestError("response_format", str(e)) from None


def _prediction(body: dict, config: EngineConfig, tokenizer) -> list[int]:
    """prediction: the text the answer is expected to be (or mostly be), as token ids."""
    text = body.get("prediction")
    if text is None:
        return []
    if not isinstance(text, str):
        raise RequestError("prediction", f"prediction must be a string (the expected output), got {json.dumps(text)[:100]}")
    ids = tokenizer(_encodable(text, "prediction"), add_special_tokens=False)["input_ids"]
    if len(ids) > config.max_model_len:
        raise RequestError("prediction", f"prediction is {len(ids)} tokens; at most {config.max_model_len} (the context)")
    return ids


def _messages(body: dict) -> list[dict]:
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", "messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise RequestError("messages", f"messages[{i}] must be an object with exactly role and content")
        if not isinstance(m["role"], str) or m["role"] not in ("system", "user", "assistant"):
            raise RequestError("messages", f"messages[{i}].role must be system, user or assistant, got {json.dumps(m['role'])}")
        if not isinstance(m["content"], str):
            raise RequestError("messages", f"messages[{i}].content must be a string")
        _encodable(m["content"], "messages", f"messages[{i}].content")
    return messages


def parse_request(request_id: str, body, config: EngineConfig, tokenizer) -> Request:
    """Validate a request body and tokenize it. Raises RequestError on any bad input."""
    body = decode_body(body)
    unknown = [k for k in body if k not in KNOWN_FIELDS]
    if unknown:
        name = unknown[0].encode("utf-8", "backslashreplace").decode("utf-8")   # printable even if not encodable
        raise RequestError(name, f"unknown field {name!r}; known fields are {list(KNOWN_FIELDS)}")
    if ("prompt" in body) == ("messages" in body):
        raise RequestError("prompt", "send exactly one of prompt or messages")
    params = SamplingParams(
        max_new_tokens=_int(body, "max_new_tokens", config.default_max_new_tokens, 1, config.max_new_tokens_cap),
        temperature=_float(body, "temperature", 0.0),
        top_p=_float(body, "top_p", 1.0),
        top_k=_int(body, "top_k", 0, 0, MAX_TOP_K),
        min_p=_float(body, "min_p", 0.0),
        seed=_int(body, "seed", None, 0, 2**63 - 1),
        stop=_stop(body),
        stop_token_ids=_stop_token_ids(body, tokenizer),
        ignore_eos=_bool(body, "ignore_eos"),
        min_tokens=_int(body, "min_tokens", 0, 0, config.max_new_tokens_cap),
        presence_penalty=_float(body, "presence_penalty", 0.0),
        frequency_penalty=_float(body, "frequency_penalty", 0.0),
        repetition_penalty=_float(body, "repetition_penalty", 1.0),
        logit_bias=_logit_bias(body, tokenizer),
        response_schema=_response_schema(body),
    )
    timeout_s = body.get("timeout_s")
    if timeout_s is not None and (_float(body, "timeout_s", 0.0) <= 0):
        raise RequestError("timeout_s", f"timeout_s must be a positive number of seconds, got {json.dumps(timeout_s)}")
    if params.min_tokens > params.max_new_tokens:
        raise RequestError("min_tokens", f"min_tokens ({params.min_tokens}) exceeds max_new_tokens ({params.max_new_tokens})")
    if params.temperature < 0:
        raise RequestError("temperature", f"temperature must be >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise RequestError("top_p", f"top_p must be in (0, 1], got {params.top_p}")
    if not 0 <= params.min_p <= 1:
        raise RequestError("min_p", f"min_p must be in [0, 1], got {params.min_p}")
    for name in ("presence_penalty", "frequency_penalty"):
        if abs(getattr(params, name)) > MAX_PENALTY:
            raise RequestError(name, f"{name} must be between -{MAX_PENALTY:g} and {MAX_PENALTY:g}, got {getattr(params, name)}")
    if params.repetition_penalty <= 0:
        raise RequestError("repetition_penalty", f"repetition_penalty must be > 0, got {params.repetition_penalty}")
    stream = _bool(body, "stream")

    if "prompt" in body:
        prompt = body["prompt"]
        if isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < len(tokenizer) for t in prompt):
            prompt_ids = prompt          # token ids, as given
        elif isinstance(prompt, str) and prompt:
            prompt_ids = tokenizer(_encodable(prompt, "prompt"))["input_ids"]
        else:
            raise RequestError("prompt", f"prompt must be a non-empty string or list of token ids 0..{len(tokenizer) - 1}")
        name = "prompt"
    else:
        prompt_ids = tokenizer.apply_chat_template(_messages(body), add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]
        name = "messages"
    if not prompt_ids:
        raise RequestError(name, f"{name} tokenizes to nothing")
    if len(prompt_ids) >= config.max_model_len:
        raise RequestError(name, f"{name} is {len(prompt_ids)} tokens; the context holds {config.max_model_len}")
    if len(prompt_ids) + params.max_new_tokens > config.max_model_len:
        raise RequestError("max_new_tokens", f"prompt ({len(prompt_ids)} tokens) + max_new_tokens "
                           f"({params.max_new_tokens}) exceeds the context of {config.max_model_len} tokens")
    r = Request(request_id=request_id, prompt_ids=list(prompt_ids), params=params, stream=stream,
                prediction_ids=_prediction(body, config, tokenizer))
    if timeout_s is not None:
        r.deadline = r.arrival_time + timeout_s
    return r
