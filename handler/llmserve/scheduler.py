"""Which requests run in the next step. Pure Python policy, no torch: FIFO admission up to
max_num_seqs running sequences, a per-step prefill token budget and a KV-cache token budget;
when running sequences outgrow the KV budget the newest is preempted (recomputed later).
Continuous batching admits newcomers at every step; request-level batching admits a batch (the
requests waiting when the engine went idle) and nothing else until that whole batch is done."""

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .request import Request


@dataclass
class SchedulerOutput:
    prefill: list[Request] = field(default_factory=list)    # admitted this step: prefill, then sample
    decode: list[Request] = field(default_factory=list)     # already running: one decode step each
    preempted: list[Request] = field(default_factory=list)  # lost their KV this step, back in waiting


class Scheduler:
    def __init__(self, max_num_seqs: int, max_prefill_tokens: int, kv_capacity_tokens: int,
                 request_level: bool = False, prefill_cost: Callable[[Request], int] | None = None) -> None:
        self.max_num_seqs = max_num_seqs
        self.request_level = request_level
        self.batch_quota = 0                # request-level: members of the current batch not yet admitted
        self.max_prefill_tokens = max_prefill_tokens
        # tokens a request's prefill computes (the engine leaves out a cached prefix); default all
        self.prefill_cost = prefill_cost or (lambda r: r.num_tokens)
        self.kv_capacity_tokens = kv_capacity_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []    # in admission order: the last is preempted first

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: Request) -> None:
        request.status = "waiting"
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        """The rule: running sequences first, each needs room for one more token in the KV budget,
        evicting the newest until they fit; then admit waiting requests in FIFO order while a slot,
        the prefill budget and the KV budget allow; the first that does not fit stops admission."""
        out = SchedulerOutput()
        while self.running and self._kv_needed(self.running) > self.kv_capacity_tokens:
            victim = self.running.pop()
            victim.status = "waiting"
            victim.num_preemptions += 1
            out.preempted.append(victim)
            self.waiting.appendleft(victim)
        out.decode = list(self.running)
        if self.request_level:
            self.batch_quota += len(out.preempted)      # an evicted member stays in its batch
            if not self.running and not self.batch_quota:
                self.batch_quota = min(len(self.waiting), self.max_num_seqs)   # the next batch

        kv_used = self._kv_needed(self.running)
        num_prefill_tokens = 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            if self.request_level and not self.batch_quota:
                break
            request = self.waiting[0]
            if request in out.preempted:
                break   # do not re-admit in the step that evicted it
            tokens = request.num_tokens   # a preempted request recomputes its output too
            cost = self.prefill_cost(request)
            if out.prefill and num_prefill_tokens + cost > self.max_prefill_tokens:
                break
            if kv_used + tokens + 1 > self.kv_capacity_tokens:
                break
            self.waiting.popleft()
            request.status = "running"
            self.running.append(request)
            out.prefill.append(request)
            if self.request_level:
                self.batch_quota -= 1
            num_prefill_tokens += cost
            kv_used += tokens + 1
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

    @staticmethod
    def _kv_needed(requests: list[Request]) -> int:
        # each running sequence holds its tokens and needs one more row for the token it decodes next
        return sum(r.num_tokens + 1 for r in requests)
