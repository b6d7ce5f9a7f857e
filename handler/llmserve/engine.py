"""The engine: requests in, tokens out. Each step() is schedule -> run -> postprocess: the
scheduler picks who runs, the runner prefills newcomers and decodes everyone else in one batch,
and postprocess appends tokens, finishes requests and frees their KV rows at once. A server under
TorchServe's continuous-batching protocol calls add_request() and step(); generate() runs given
requests to completion (TorchServe's classic batching, scripts, tests). config.batching picks the
admission policy (see scheduler.py)."""

import math
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from .config import EngineConfig
from .json_vocab import JsonVocab, token_bytes
from .kv_cache import KVCache
from .load import ModelFacts, load_model
from .prefix_cache import BLOCK, PrefixCache
from .request import TIERS, Request
from .runner import ModelRunner
from .sampling import adjusted, argmax, draw, make_generator, sample
from .scheduler import Scheduler
from .speculative import PromptLookup, accepted_length


def cache_dtype(config: EngineConfig, model, facts: ModelFacts) -> torch.dtype:
    """The KV cache's dtype (config.kv_cache_dtype): fp16 where our C++ decoder step runs, which
    converts as it reads and writes (half the bytes a step's attention reads: 206 MB of fp32 keys and
    values at 64 rows of ~70 tokens, its wait on memory), else the activations' dtype."""
    fused = config.compile and facts.device.type == "cpu" and ModelRunner.fusable(model)
    if config.kv_cache_dtype == "fp16" and not fused:
        raise ValueError("kv_cache_dtype fp16 needs our C++ decoder step (w4, compile: true, our kernels built on "
                         f"the CPU); here the cache takes the activations' dtype ({facts.dtype})")
    if config.kv_cache_dtype == "fp32" and facts.dtype != torch.float32:
        raise ValueError(f"kv_cache_dtype fp32 needs fp32 activations (fp32, w8, w4 on the CPU); here they are {facts.dtype}")
    if config.kv_cache_dtype == "fp16" or (config.kv_cache_dtype == "auto" and fused):
        return torch.float16
    return facts.dtype


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Each row's token's log-probability under logits [N, V] (the raw model's) and its k best rivals
    (id, log-probability); tokens [N]."""
    lp = torch.log_softmax(logits.float(), dim=-1)                                       # [N, V]
    chosen = lp.gather(-1, tokens[:, None])[:, 0].tolist()                              # [N]
    top_lp, top_ids = lp.topk(k or 1, dim=-1)
    return [(c, list(zip(ids[:k], lps[:k]))) for c, ids, lps in zip(chosen, top_ids.tolist(), top_lp.tolist())]


class Overloaded(Exception):
    """The waiting queue is full (config.max_waiting_requests): the server's 503."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig, facts: ModelFacts) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.cache = KVCache(facts.num_layers, config.max_num_seqs, facts.num_kv_heads, config.max_model_len,
                             facts.head_dim, cache_dtype(config, model, facts), facts.device, config.kv_prefault)
        compile_rows = max(facts.packed_max_rows, 0) if config.compile else 0   # w8/w4's packed-kernel steps
        self.runner = ModelRunner(model, self.cache, compile_max_rows=compile_rows, fuse=config.compile)
        self.facts = replace(facts, compiled_graphs=self.runner.warm_up(config.spec_tokens))
        # speculate in steps of at most this many rows (sequences x tokens each): w8/w4 within their
        # packed kernels' rows, where more rows cost little more than reading the weights, and each
        # row gets the kernel (so the tokens) it gets in a one-token step
        self.spec_max_rows = config.spec_max_rows
        if facts.packed_max_rows >= 0:
            self.spec_max_rows = min(self.spec_max_rows, facts.packed_max_rows)
        self.prefix = PrefixCache(self.cache, config.prefix_cache_tokens) if config.prefix_cache_tokens else None
        self.scheduler = Scheduler(config.max_num_seqs, config.max_prefill_tokens, config.kv_capacity_tokens,
                                   request_level=config.batching == "request_level", prefill_cost=self._uncached,
                                   priority_ageing_s=config.priority_ageing_s,
                                   prefill_chunk_tokens=config.prefill_chunk_tokens if self.prefix else 0,
                                   max_chunked_tokens=config.prefix_cache_tokens // 2,
                                   # a prompt sharing 32 tokens or more with one being prefilled waits a step
                                   shared_prefix_wait=4 * BLOCK if self.prefix else 0)
        self.rows: list[Request] = []          # rows[i] is the request in KV row i
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self.scheduled: list[Request] = []     # the requests the current (or last) step runs
        self.stop_ids = torch.tensor(sorted(facts.stop_token_ids), device=facts.device)   # [S]
        self.timed: set[Request] = set()       # unfinished requests with their own timeout_s
        self.mean_latency_s = 1.0              # moving mean of finished requests' latency (Retry-After)
        self._json_vocab: JsonVocab | None = None

    @classmethod
    def from_config(cls, config: EngineConfig) -> "Engine":
        model, tokenizer, facts = load_model(config)
        return cls(model, tokenizer, config, facts)

    # -- public API -----------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request; raises Overloaded when max_waiting_requests are already waiting."""
        assert request.request_id not in self.requests, f"duplicate request id {request.request_id}"
        self.check_room(request.tier)
        request.generator = make_generator(request.params, self.facts.device)
        c = self.config
        # a request with a bias or penalty does not draft: its penalties at a draft's positions would
        # count the draft tokens before each (and an answer told not to repeat itself copies little);
        # in JSON mode only a greedy one does (_verify holds each position to the grammar)
        if c.spec_tokens and not request.params.adjusts_logits and (request.params.response_schema is None
                                                                     or request.params.is_greedy):
            request.lookup = PromptLookup(c.spec_tokens, c.spec_lookup_min, c.spec_lookup_max,
                                          request.prediction_ids, len(request.prompt_ids))
        if request.params.repetition_penalty != 1:   # once, not at every step (sampling.adjusted)
            request.prompt_vocab = torch.tensor(sorted(set(request.prompt_ids)), device=self.facts.device)
        if request.params.response_schema is not None:
            request.json_grammar = self.json_vocab.grammar(request.params.response_schema)
            request.json_state = request.json_grammar.initial
        if request.deadline is not None:
            self.timed.add(request)
        self.requests[request.request_id] = request
        self.scheduler.add(request)

    def check_room(self, tier: int = TIERS.index("standard")) -> None:
        """Raise Overloaded if a new request of this tier would find the waiting queue full of
        requests of its tier or better (those that free slots will take at the next step do not
        count as waiting): lower tiers' waiting requests never keep a higher tier out."""
        num_free = self.config.max_num_seqs - len(self.scheduler.running)
        num_ahead = sum(r.tier <= tier for r in self.scheduler.waiting)
        num_waiting, limit = num_ahead - num_free, self.config.max_waiting_requests
        if limit and num_waiting >= limit:
            # a slot frees about every mean_latency / max_num_seqs seconds; the queue ahead must drain
            retry = self.mean_latency_s * (num_waiting + 1) / self.config.max_num_seqs
            raise Overloaded(f"the server is overloaded: {num_waiting} requests are already waiting for "
                             f"{self.config.max_num_seqs} running ones; retry in about {math.ceil(retry)} s",
                             retry_after_s=math.ceil(retry))

    def abort(self, request_id: str) -> None:
        """Drop a request (e.g. its client went away); its KV row is freed at once."""
        request = self.requests.get(request_id)
        if request is not None and not request.is_finished:
            self._finish(request, "abort")

    @property
    def json_vocab(self) -> JsonVocab:
        """The vocabulary as JSON mode reads it, built at the first request in JSON mode (SmolLM2's 49,152
        tokens: 0.13 s on a Zen 4 core)."""
        if self._json_vocab is None:
            size = self.runner.model.get_output_embeddings().out_features
            self._json_vocab = JsonVocab(token_bytes(self.tokenizer, size), set(self.facts.stop_token_ids))
        return self._json_vocab

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def stats(self) -> dict:
        """Gauges for a metrics endpoint."""
        used = sum(r.num_tokens for r in self.scheduler.running)
        return {"num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
                "kv_cache_usage": used / self.config.kv_capacity_tokens}

    def generate(self, requests: list[Request], on_step: Callable[[], None] | None = None) -> list[Request]:
        """Request-level batching: run these to completion; each finishes as soon as it is done.
        on_step runs after every step (the handler streams parts from it)."""
        for r in requests:
            self.add_request(r)
        while any(not r.is_finished for r in requests):
            self.step()
            if on_step is not None:
                on_step()
        return requests

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: decode every running sequence (rows 0..B-1), then prefill newcomers."""
        t0 = time.perf_counter()
        self._expire()
        out = self.scheduler.schedule(t0)
        self.scheduled = out.decode + out.prefill + ([out.chunk] if out.chunk else [])
        for r in out.preempted:
            self._keep(r)
            self._release_row(r)
        if out.decode:
            B = len(out.decode)
            drafts = self._drafts(B) if self.config.spec_tokens else None
            if drafts:
                self._verify(drafts, batch_size=B + len(out.prefill))
            else:
                logits = self.runner.decode(B, [r.lm_head for r in self.rows[:B]])
                self._postprocess(self.rows[:B], logits, batch_size=B + len(out.prefill))
        # each request's share of the step's time, by the tokens computed for it (chargeback)
        tokens = {r: 1 for r in out.decode}
        if out.prefill:
            tokens |= self._prefill(out.prefill)
        if out.chunk:
            tokens[out.chunk] = self._prefill_chunk(out.chunk, t0)
        seconds = (time.perf_counter() - t0) / max(sum(tokens.values()), 1)
        for r, n in tokens.items():
            r.engine_s += n * seconds

    def fail(self, r: Request, error: str) -> None:
        """End r with finish_reason "error" (freeing its row if it still runs)."""
        r.error = error
        if r.is_finished:
            r.finish_reason = "error"
        else:
            self._finish(r, "error")

    def fail_step(self, error: str) -> None:
        """After step() raised: fail the requests it was running and had not finished (a request
        the step finished keeps its answer); waiting ones stay queued."""
        for r in self.scheduled:
            if not r.is_finished:
                self.fail(r, error)
        self.scheduled = []

    def check_invariants(self) -> None:
        """The engine's rows and the scheduler's running list hold the same requests (for tests)."""
        assert sorted(map(id, self.rows)) == sorted(map(id, self.scheduler.running)), "rows != running"
        assert all(r.row == i for i, r in enumerate(self.rows)), "a request's row is stale"
        assert set(self.requests.values()) == set(self.scheduler.running) | set(self.scheduler.waiting)

    # -- internals --------------------------------------------------------------------------------
    def _expire(self) -> None:
        """End requests past their own deadline (with their text so far) and, when
        max_queue_wait_s is set, requests that waited that long without starting. Looks only at
        requests with a deadline and at the oldest waiting ones, not at every request."""
        now = time.perf_counter()
        for r in [r for r in self.timed if now >= r.deadline]:
            self._finish(r, "timeout")
        max_wait = self.config.max_queue_wait_s
        expired = []
        for r in self.scheduler.waiting if max_wait else ():   # unstarted ones wait in arrival order
            if r.start_time is not None:                        # preempted: it started, and it goes first
                continue
            if now - r.arrival_time < max_wait:
                break
            expired.append(r)
        for r in expired:
            r.error = f"waited {now - r.arrival_time:.1f} s in the queue without starting (max_queue_wait_s={max_wait})"
            self._finish(r, "queue_timeout")

    def _uncached(self, r: Request) -> int:
        """Tokens r's prefill must compute: those past its prefix found in the prefix cache (all of
        them where it scores its prompt: _prefill_scored)."""
        tokens = r.prompt_ids + r.output_ids   # a preempted request recomputes its output too
        if r.is_scoring_prompt:
            return len(tokens)
        return len(tokens) - (len(self.prefix.match(tokens)) * BLOCK if self.prefix else 0)

    def _prefill(self, requests: list[Request]) -> dict[Request, int]:
        """Left-pad prompts into groups of similar uncached length so padding costs little compute;
        copy each prompt's cached prefix into its row first, keep its new full blocks after. The
        tokens computed for each (past what the prefix cache held, its chunks among them)."""
        computed = {r: self._prefill_scored(r) for r in requests if r.is_scoring_prompt}
        requests = [r for r in requests if r not in computed]
        budget = self.config.max_prefill_tokens
        cost = {r: self._uncached(r) for r in requests}
        pending = sorted(requests, key=cost.get)
        while pending:
            group = [pending.pop(0)]
            while pending and (len(group) + 1) * cost[pending[0]] <= budget:
                group.append(pending.pop(0))
            start = len(self.rows)
            t0 = time.perf_counter()
            token_lists = [r.prompt_ids + r.output_ids for r in group]
            T = max(map(len, token_lists))
            num_cached = []
            for i, (r, tokens) in enumerate(zip(group, token_lists)):
                r.row = start + i
                r.start_time = r.start_time or t0
                self.rows.append(r)
                keys = self.prefix.match(tokens) if self.prefix else []   # again: an earlier group may have added blocks
                if keys:
                    self.prefix.load(keys, r.row, T - len(tokens))
                num_cached.append(len(keys) * BLOCK)
                computed[r] = len(tokens) - num_cached[-1]
                r.num_cached_tokens = max(min(num_cached[-1], len(r.prompt_ids)) - r.num_chunked_tokens, 0)
            logits = self.runner.prefill(slice(start, start + len(group)), token_lists, num_cached=num_cached)
            for r, tokens in zip(group, token_lists) if self.prefix else ():
                self.prefix.save(tokens, r.row, T - len(tokens))
            self._postprocess(group, logits, batch_size=len(self.rows))
            ms = (time.perf_counter() - t0) * 1000
            for r in group:
                r.prefill_ms += ms
        return computed

    def _prefill_scored(self, r: Request) -> int:
        """r's first prefill where it asks for its prompt's log-probabilities (OpenAI's echo): alone, every
        position computed (no cached prefix) and its logits read, 256 positions at a time, into
        r.prompt_logprobs. The tokens computed."""
        t0 = time.perf_counter()
        r.row, r.start_time = len(self.rows), r.start_time or t0
        self.rows.append(r)
        tokens = r.prompt_ids
        logits = self.runner.prefill(slice(r.row, r.row + 1), [tokens], all_positions=True)[0]   # [T, V]
        following = torch.tensor(tokens[1:], device=logits.device)
        for i in range(0, len(following), 256):
            r.prompt_logprobs += token_logprobs(logits[i:i + 256], following[i:i + 256], r.params.prompt_logprobs)
        if self.prefix:
            self.prefix.save(tokens, r.row, 0)
        self._postprocess([r], logits[-1:], batch_size=len(self.rows))
        r.prefill_ms += (time.perf_counter() - t0) * 1000
        return len(tokens)

    def _prefill_chunk(self, r: Request, t0: float) -> int:
        """The next chunk of waiting r's prompt (scheduler.chunk_tokens), computed in the free row after the
        running ones (after its cached prefix, copied there) and kept in the prefix cache, where its
        next chunk or its prefill finds them; r keeps its place in the queue. The tokens computed."""
        t1 = time.perf_counter()
        tokens = r.prompt_ids + r.output_ids
        keys = self.prefix.match(tokens)
        done = len(keys) * BLOCK
        end = done + self.scheduler.chunk_tokens(r)      # short of the end: the scheduler chunks longer ones only
        row = len(self.rows)
        self.prefix.load(keys, row, 0)
        self.runner.prefill(slice(row, row + 1), [tokens[:end]], num_cached=[done])
        self.prefix.save(tokens[:end], row, 0)
        r.start_time = r.start_time or t0                 # it started: no queue timeout now
        r.num_chunked_tokens += end - done
        r.prefill_ms += (time.perf_counter() - t1) * 1000
        return end - done

    def _drafts(self, B: int) -> list[list[int]] | None:
        """Each of rows 0..B-1's draft (none for a request that does not draft, or has no room
        left in its row or its max_new_tokens); None when no row has one or the step has too many
        rows to verify drafts (spec_max_rows)."""
        room = min(self.cache.max_len - int(self.cache.row_lengths[:B].max()) - 2,   # every row takes W positions
                   self.spec_max_rows // B - 1)
        if room < 1:
            return None
        drafts = [r.lookup.draft(r.prompt_ids + r.output_ids, min(room, r.params.max_new_tokens - len(r.output_ids) - 1))
                  if r.lookup else [] for r in self.rows[:B]]
        for r, d in zip(self.rows[:B], drafts):
            state = r.json_state
            for j, token in enumerate(d if state is not None else []):   # JSON mode: the draft's valid part
                state = self.json_vocab.advance(r.json_grammar, state, token)
                if state is None:
                    del d[j:]
                    break
        return drafts if any(drafts) else None

    def _verify(self, drafts: list[list[int]], batch_size: int) -> None:
        """One forward over each row's last token and its draft; a row keeps its draft's longest
        prefix the model predicts itself, then the model's next token: the tokens it would have
        decoded one by one (greedy, and sampled with the same draws)."""
        B, W = len(drafts), 1 + max(map(len, drafts))
        requests = self.rows[:B]
        tokens = torch.tensor([[0] + d + [0] * (W - 1 - len(d)) for d in drafts], device=self.facts.device)
        tokens[:, 0] = self.cache.last_tokens[:B]
        logits = self.runner.verify(tokens, [r.lm_head for r in requests])          # [B, W, V]
        self._mask_early_eos(requests, logits)
        predicted = argmax(logits).tolist()
        # a sampled row's token at each position is the one its next uniform draws there, as one by
        # one (a draft token d is kept with probability p(d), else the row takes a token drawn from
        # the rest: speculative sampling's rule for a draft that is one token for sure)
        sampled = [i for i, (r, d) in enumerate(zip(requests, drafts)) if d and not r.params.is_greedy]
        for i in sampled:
            g, n = requests[i].generator, 1 + len(drafts[i])
            start = g.get_state()
            u = torch.stack([torch.rand((), device=logits.device, generator=g) for _ in range(n)])   # [n]
            predicted[i] = draw(logits[i, :n], [requests[i].params] * n, u).tolist()
            g.set_state(start)                       # _postprocess draws the first position's again
        for i, (r, d) in enumerate(zip(requests, drafts)):
            if d and r.json_state is not None:   # JSON mode (greedy): each position's token as the grammar has it
                predicted[i] = self._json_positions(r, d, logits[i], predicted[i])
        kept = [accepted_length(d, p) for d, p in zip(drafts, predicted)]
        # rows advance over their kept draft before any request finishes: a finished row's hole is
        # filled by moving the last row, whose keys move only up to its length
        self.cache.lengths[:B] += torch.tensor(kept, device=self.facts.device)
        self.cache.row_lengths[:B] += kept
        self._postprocess(requests, logits[:, 0], batch_size)   # each row's first token, as a decode step's
        for i in sampled:                            # ... and one more draw for each draft token it keeps
            for _ in range(kept[i]):
                torch.rand((), device=logits.device, generator=requests[i].generator)
        now = time.perf_counter()
        for i, (r, d, p, n) in enumerate(zip(requests, drafts, predicted, kept)):
            r.num_draft_tokens += len(d)
            r.num_accepted_tokens += n
            if d:
                r.lookup.kept(len(d), n)
            if n and not r.is_finished:
                self.cache.last_tokens[r.row] = p[n]
                for j, token in enumerate(p[1:n + 1], start=1):
                    if r.params.logprobs is not None:   # from the logits it was drawn from, as one by one
                        self._logprobs([r], logits[i, j:j + 1], torch.tensor([token], device=logits.device))
                    if r.json_state is not None:
                        r.json_state = self.json_vocab.advance(r.json_grammar, r.json_state, token)
                    if self._append(r, token, now, batch_size):
                        break

    def _json_positions(self, r: Request, draft: list[int], logits: torch.Tensor, argmaxes: list[int]) -> list[int]:
        """A greedy JSON row's tokens at a verify step's positions (logits [W, V]) as one by one: each
        the grammar's choice after the draft tokens before it, up to the first that is not the draft's.
        A fault keeps none of the draft (_postprocess then ends the request with it)."""
        state, out = r.json_state, []
        try:
            for j in range(len(draft) + 1):
                out.append(self._json_token(r, state, logits[j], argmaxes[j]))
                if j == len(draft) or out[j] != draft[j]:
                    return out
                state = self.json_vocab.advance(r.json_grammar, state, draft[j])
        except Exception:
            return [-1]
        return out

    def _mask_early_eos(self, requests: list[Request], logits: torch.Tensor) -> None:
        """min_tokens: no stop token (EOS, or one of its stop_token_ids) at the positions of logits
        [B, W, V] whose token would come before the request's min_tokens-th."""
        for i, r in enumerate(requests):
            if (early := r.params.min_tokens - len(r.output_ids)) > 0:
                logits[i, :early, self.stop_ids] = float("-inf")
                logits[i, :early, list(r.params.stop_token_ids)] = float("-inf")

    def _postprocess(self, requests: list[Request], logits: torch.Tensor, batch_size: int) -> None:
        rows = slice(requests[0].row, requests[0].row + len(requests))
        self._mask_early_eos(requests, logits[:, None])
        params = [r.params for r in requests]
        # a bias or penalty is sampled from (logits itself where no row has one); logprobs read the model's
        scores = adjusted(logits, params, [r.prompt_vocab for r in requests], [r.output_ids for r in requests])
        tokens = sample(scores, params, [r.generator for r in requests])
        broken: dict[Request, str] = {}
        for i, r in enumerate(requests):
            if r.json_state is not None:
                try:
                    tokens[i] = token = self._json_token(r, r.json_state, scores[i], int(tokens[i]))
                    r.json_state = self.json_vocab.advance(r.json_grammar, r.json_state, token)
                except Exception as e:   # our fault, and this request's alone: it ends, its batch goes on
                    broken[r] = f"JSON mode failed: {type(e).__name__}: {e}"
        self.cache.last_tokens[rows] = tokens
        if any(r.params.logprobs is not None for r in requests):
            self._logprobs(requests, logits, tokens)
        now = time.perf_counter()
        for r, token in zip(requests, tokens.tolist()):   # the one device-to-host copy of the step
            if r in broken:
                self.fail(r, broken[r])
            else:
                self._append(r, token, now, batch_size)

    def _json_token(self, r: Request, state: tuple, scores: torch.Tensor, token: int) -> int:
        """JSON mode (json_mode.py): r's token, chosen from scores [V], if its output stays valid from state;
        else the likeliest valid one (greedy: the 8 likeliest are tried before a mask is built) or
        a new draw from the valid ones alone, with a new uniform from its generator (llama.cpp's rule)."""
        vocab, stops = self.json_vocab, r.params.stop_token_ids
        if vocab.is_valid(r.json_grammar, state, token, stops):
            return token
        if r.params.is_greedy:
            for t in torch.topk(scores, 8).indices.tolist():
                if vocab.is_valid(r.json_grammar, state, t, stops):
                    return t
        mask = vocab.mask(r.json_grammar, state, stops).to(scores.device)
        masked = scores.masked_fill(~mask, float("-inf"))
        if not torch.isfinite(masked.max()):   # min_tokens masked the end, the only valid token: the object comes first
            return int(mask.nonzero()[0])
        if r.params.is_greedy:
            return int(masked.argmax())
        u = torch.rand((), device=scores.device, generator=r.generator)
        return int(draw(masked[None], [r.params], u[None])[0])

    def _append(self, r: Request, token: int, now: float, batch_size: int) -> bool:
        """r's next token; finish r if it ends there. Says whether it did."""
        r.output_ids.append(token)
        if r.first_token_time is None:
            r.first_token_time = now
        r.max_batch_size = max(r.max_batch_size, batch_size)
        if (token in self.facts.stop_token_ids and not r.params.ignore_eos) or token in r.params.stop_token_ids:
            self._finish(r, "stop")
        elif (r.stream or r.params.stop) and self._detokenize(r):
            self._finish(r, "stop")
        elif len(r.output_ids) >= r.params.max_new_tokens:
            self._finish(r, "length")
        return r.is_finished

    @staticmethod
    def _logprobs(requests: list[Request], logits: torch.Tensor, tokens: torch.Tensor) -> None:
        """Each asking request's sampled token's log-probability and its best rivals (raw model
        distribution, before temperature)."""
        asking = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        rows = torch.tensor(asking, device=logits.device)
        scored = token_logprobs(logits[rows], tokens[rows], max(requests[i].params.logprobs for i in asking))
        for (lp, top), i in zip(scored, asking):
            requests[i].logprobs.append((lp, top[:requests[i].params.logprobs]))

    def _detokenize(self, r: Request, final: bool = False) -> bool:
        """Append the text of r's new tokens to r.text, decoding a short window (not the whole
        output) and holding back an incomplete UTF-8 character until final; cut r.text before a
        stop string (none before min_tokens) and say whether one was found."""
        ids = r.output_ids
        before = self.tokenizer.decode(ids[r.prefix_offset:r.read_offset], skip_special_tokens=True)
        after = self.tokenizer.decode(ids[r.prefix_offset:], skip_special_tokens=True)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return False
        r.prefix_offset, r.read_offset = r.read_offset, len(ids)
        start = max(0, len(r.text) - r.params.max_stop_len + 1)   # a stop string may straddle the old text
        r.text += after[len(before):]
        if len(ids) < r.params.min_tokens:
            return False
        hits = [i for s in r.params.stop if (i := r.text.find(s, start)) >= 0]
        if hits:
            r.text = r.text[:min(hits)]
        return bool(hits)

    def _finish(self, r: Request, reason: str) -> None:
        self._detokenize(r, final=True)
        r.finish_time = time.perf_counter()
        if reason in ("stop", "length"):
            self.mean_latency_s += 0.1 * (r.finish_time - r.arrival_time - self.mean_latency_s)
        self.timed.discard(r)
        self.scheduler.finish(r, reason)
        self._release_row(r)
        self.requests.pop(r.request_id, None)

    def _keep(self, r: Request) -> None:
        """A preempted sequence's keys and values go to the prefix cache, newest there, so its
        recompute copies them back rather than prefilling its prompt and output again (at a 2-core
        CPU's ~1 ms a token, a summary's 300 tokens cost more than a 64-row decode step)."""
        if self.prefix is not None and r.row >= 0:
            start, end = int(self.cache.starts[r.row]), int(self.cache.row_lengths[r.row])
            self.prefix.save((r.prompt_ids + r.output_ids)[:end - start], r.row, start)

    def _release_row(self, r: Request) -> None:
        """Free r's KV row, moving the last row into the hole so running rows stay 0..n-1."""
        if r.row < 0:
            return
        last = len(self.rows) - 1
        if r.row != last:
            moved = self.rows[last]
            self.cache.move_row(last, r.row)
            moved.row = r.row
            self.rows[r.row] = moved
        self.rows.pop()
        r.row = -1
