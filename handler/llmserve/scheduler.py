"""Which requests run in the next step. Pure Python policy, no torch: admission by priority tier,
then arrival, up to max_num_seqs running sequences, a per-step prefill token budget and a KV-cache
token budget; when running sequences outgrow the KV budget the lowest tier's newest is preempted
(recomputed later); under continuous batching waiting premium requests displace running ones of
lower tiers whose room they need. Ageing: a request ranks one tier higher for every
priority_ageing_s since it arrived, so batch work waits at most twice that behind newcomers.
Continuous batching admits newcomers at every step; request-level batching admits a batch (the
requests waiting when the engine went idle, in arrival order) and nothing else until that whole
batch is done. Chunked prefill (continuous, below premium): a long prompt in a step that decodes
gets one chunk a step, kept waiting in its place, so no step is long for the requests behind it;
a step that prefills a premium request beside lower tiers' running ones runs premium prefills
alone (at most MAX_ALONE_STEPS such steps in a row)."""

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .request import Request

# Premium prefill steps that may run alone in a row: two, so a premium prompt that arrives during
# another's prefill does not also wait for every row's decode (the slowest premium requests of the
# tiers runs, 8087e74's message), while the lower tiers' running sequences wait two prefills at most.
MAX_ALONE_STEPS = 2
# A chunked prompt goes in about this many chunks at most, each a multiple of prefill_chunk_tokens:
# a 1,400-token one in 64-token chunks took 22 steps, each decoding the running rows beside 64 rows
# and copying its cached chunks back in; in 192-token ones, at 4 users on the engine alone, TTFT p50
# went 4.17 / 2.88 / 4.69 -> 2.24 / 1.82 / 2.33 s (three turns each, cab9bc8's message)
CHUNKS_PER_PROMPT = 8


@dataclass
class SchedulerOutput:
    prefill: list[Request] = field(default_factory=list)    # admitted this step: prefill, then sample
    decode: list[Request] = field(default_factory=list)     # already running: one decode step each
    preempted: list[Request] = field(default_factory=list)  # lost their KV this step, back in waiting
    chunk: Request | None = None    # waiting; the next chunk_tokens(it) of its prompt are computed this step


class Scheduler:
    def __init__(self, max_num_seqs: int, max_prefill_tokens: int, kv_capacity_tokens: int,
                 request_level: bool = False, prefill_cost: Callable[[Request], int] | None = None,
                 priority_ageing_s: float = 0.0, prefill_chunk_tokens: int = 0, max_chunked_tokens: int = 0,
                 shared_prefix_wait: int = 0) -> None:
        self.max_num_seqs = max_num_seqs
        self.priority_ageing_s = priority_ageing_s   # 0: no ageing
        self.request_level = request_level
        self.batch_quota = 0                # request-level: members of the current batch not yet admitted
        self.max_prefill_tokens = max_prefill_tokens
        # chunked prefill: a standard or batch prompt costing more than a chunk (chunk_tokens; of at
        # most max_chunked_tokens tokens), in a step that decodes, is computed a chunk a step while it
        # keeps its place in the queue, so no step a premium newcomer waits behind is long
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.max_chunked_tokens = max_chunked_tokens
        # tokens a request's prefill computes (the engine leaves out a cached prefix); default all
        self.prefill_cost = prefill_cost or (lambda r: r.num_tokens)
        self.kv_capacity_tokens = kv_capacity_tokens
        # a waiting request whose prompt shares at least this many tokens more than it has cached with a
        # prompt prefilled in this step waits for the next one, whose prefill finds them in the prefix
        # cache (OpenAI's n choices, a burst of one prompt); 0 = never
        self.shared_prefix_wait = shared_prefix_wait
        self.waiting: deque[Request] = deque()   # in arrival order, preempted ones first
        self.running: list[Request] = []
        self.alone_steps = 0                     # steps in a row that ran premium prefills alone

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def chunk_tokens(self, request: Request) -> int:
        """A chunk of request's prompt: prefill_chunk_tokens, or a multiple of it for a prompt longer
        than CHUNKS_PER_PROMPT of them (0: no chunking)."""
        base = self.prefill_chunk_tokens
        return base * -(-request.num_tokens // (CHUNKS_PER_PROMPT * base)) if base else 0

    def add(self, request: Request) -> None:
        request.status = "waiting"
        self.waiting.append(request)

    def rank(self, request: Request, now: float) -> tuple[int, float]:
        """Who goes first: the lower rank, by tier (less one per priority_ageing_s waited), then
        arrival; request-level batching knows no tiers."""
        if self.request_level:
            return 0, request.arrival_time
        aged = int((now - request.arrival_time) // self.priority_ageing_s) if self.priority_ageing_s else 0
        return max(request.tier - aged, 0), request.arrival_time

    def schedule(self, now: float | None = None) -> SchedulerOutput:
        """The rule: running sequences first, each needs room for one more token in the KV budget,
        evicting the worst ranked until they fit; then (continuous) each waiting premium request evicts
        running ones of lower tiers while it lacks a slot or KV room; then admit waiting
        requests best rank first while a slot, the prefill budget and the KV budget allow; the first
        that does not fit stops admission; a premium one admitted beside lower tiers' running ones
        goes alone (no decode this step, no lower tier after it, so its first token waits only for
        its own prompt), at most MAX_ALONE_STEPS steps in a row. Request-level batching admits in
        arrival order."""
        now = time.perf_counter() if now is None else now
        out = SchedulerOutput()
        while self.running and self._kv_needed(self.running) > self.kv_capacity_tokens:
            self._preempt(self._worst(now), out)
        if self.request_level:
            self.batch_quota += len(out.preempted)      # an evicted member stays in its batch
            if not self.running and not self.batch_quota:
                self.batch_quota = min(len(self.waiting), self.max_num_seqs)   # the next batch
            order = list(self.waiting)
        else:
            order = sorted(self.waiting, key=lambda r: self.rank(r, now))
            # premium by tier, not by ageing: an aged request goes first but waits for a row, or under
            # sustained overload the preempted ones age into premium and displace each other in turn
            premium = [r for r in order if r.tier == 0]
            for i, request in enumerate(premium):        # room for each, beside those before it
                while self.running and not self._can_fit(request, premium[:i]) \
                        and self.rank(victim := self._worst(now), now)[0] > 0:
                    self._preempt(victim, out)           # only premium displaces, only lower tiers
                if not self._can_fit(request, premium[:i]):
                    break
        out.decode = list(self.running)

        kv_used = self._kv_needed(self.running)
        num_prefill_tokens = 0
        may_go_alone = self.alone_steps < MAX_ALONE_STEPS and not self.request_level \
            and any(r.tier > 0 for r in out.decode)
        is_alone = False
        held = None   # the best tier of those waiting a step for the prefix cache: no lower tier goes first
        for request in order:
            if len(self.running) >= self.max_num_seqs or (self.request_level and not self.batch_quota):
                break
            if request in out.preempted:
                break   # do not re-admit in the step that evicted it
            if request.tier > 0 and is_alone:
                break
            if held is not None and request.tier > held and not self.request_level:
                break
            tokens = request.num_tokens   # a preempted request recomputes its output too
            cost = self.prefill_cost(request)
            # a request scoring its prompt (OpenAI's echo) computes all of it in its prefill, in one go
            if not request.is_scoring_prompt and self._shares_with(request, out.prefill, tokens - cost):
                held = request.tier if held is None else min(held, request.tier)
                continue
            if out.decode and request.tier > 0 and 0 < self.chunk_tokens(request) < cost and \
                    tokens <= self.max_chunked_tokens and not self.request_level and not request.is_scoring_prompt:
                if not out.prefill or num_prefill_tokens + self.chunk_tokens(request) <= self.max_prefill_tokens:
                    out.chunk = request
                break
            if out.prefill and num_prefill_tokens + cost > self.max_prefill_tokens:
                break
            if kv_used + tokens + 1 > self.kv_capacity_tokens:
                break
            self.waiting.remove(request)
            request.status = "running"
            self.running.append(request)
            out.prefill.append(request)
            if self.request_level:
                self.batch_quota -= 1
            num_prefill_tokens += cost
            kv_used += tokens + 1
            is_alone = is_alone or (may_go_alone and request.tier == 0)
        self.alone_steps = self.alone_steps + 1 if is_alone else 0
        if is_alone:
            out.decode = []
        return out

    def finish(self, request: Request, reason: str) -> None:
        """Mark finished and drop it from whichever queue holds it; its KV slot is free at once."""
        request.status = "finished"
        request.finish_reason = reason
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            if self.batch_quota and self.waiting.index(request) < self.batch_quota:   # a member that never ran
                self.batch_quota -= 1
            self.waiting.remove(request)

    def _shares_with(self, request: Request, prefilling: list[Request], cached: int) -> bool:
        """Whether request's prompt starts with at least shared_prefix_wait tokens more than its cached
        ones of a prompt in prefilling."""
        if not self.shared_prefix_wait:
            return False
        want = cached + self.shared_prefix_wait
        head = request.prompt_ids[:want]
        return len(head) == want and any(other.prompt_ids[:want] == head for other in prefilling)

    def _worst(self, now: float) -> Request:
        """The running request to evict first: the worst rank, the last admitted among equals."""
        return max(reversed(self.running), key=lambda r: self.rank(r, now))

    def _preempt(self, victim: Request, out: SchedulerOutput) -> None:
        self.running.remove(victim)
        victim.status = "waiting"
        victim.num_preemptions += 1
        out.preempted.append(victim)
        self.waiting.appendleft(victim)

    def _can_fit(self, request: Request, also: list[Request]) -> bool:
        """A slot and KV room for request beside the running ones and `also`."""
        return len(self.running) + len(also) < self.max_num_seqs and \
            self._kv_needed(self.running + also) + request.num_tokens + 1 <= self.kv_capacity_tokens

    @staticmethod
    def _kv_needed(requests: list[Request]) -> int:
        # each running sequence holds its tokens and needs one more row for the token it decodes next
        return sum(r.num_tokens + 1 for r in requests)
