"""Scheduler policy with hand-built requests and step results; no torch, no model."""

from llmserve.request import TIERS, Request, SamplingParams
from llmserve.scheduler import Scheduler


def req(name: str, prompt_len: int, max_new: int = 10, tier: str = "standard", arrival: float = 0.0) -> Request:
    """Requests made in one test arrive at the same time (by tier, then queue order) unless told."""
    return Request(request_id=name, prompt_ids=[1] * prompt_len, params=SamplingParams(max_new_tokens=max_new),
                   tier=TIERS.index(tier), arrival_time=arrival)


def queued(*requests: Request, max_num_seqs: int = 8, max_prefill_tokens: int = 1000,
           kv_capacity_tokens: int = 1000, request_level: bool = False, ageing_s: float = 0) -> Scheduler:
    """A scheduler with these requests waiting, in this order."""
    s = Scheduler(max_num_seqs, max_prefill_tokens, kv_capacity_tokens, request_level=request_level,
                  priority_ageing_s=ageing_s)
    for r in requests:
        s.add(r)
    return s


def decode_one(sched: Scheduler) -> None:
    """Pretend the runner produced one token for every running request."""
    for r in sched.running:
        r.output_ids.append(7)


def test_fifo_admission_up_to_max_num_seqs():
    a, b, c = req("a", 5), req("b", 5), req("c", 5)
    s = queued(a, b, c, max_num_seqs=2)
    out = s.schedule()
    assert out.prefill == [a, b] and out.decode == [] and list(s.waiting) == [c]
    decode_one(s)
    out = s.schedule()
    assert out.prefill == [] and out.decode == [a, b]
    s.finish(a, "stop")
    out = s.schedule()
    assert out.prefill == [c] and out.decode == [b]
    assert a.status == "finished" and a.finish_reason == "stop"


def test_prefill_budget_admits_at_least_one():
    big, small = req("big", 50), req("small", 3)
    s = queued(big, small, max_prefill_tokens=10)
    assert s.schedule().prefill == [big]        # over budget alone, still admitted
    assert s.schedule().prefill == [small]


def test_prefill_budget_stops_fifo():
    a, b, c = req("a", 6), req("b", 6), req("c", 1)
    s = queued(a, b, c, max_prefill_tokens=10)
    assert s.schedule().prefill == [a]          # b does not fit; c may not jump the queue


def test_prefill_budget_counts_only_what_the_prefill_computes():
    """A prompt whose prefix is cached costs only its uncached tokens (the engine's prefill_cost)."""
    a, b, c = req("a", 6), req("b", 6), req("c", 6)
    s = Scheduler(8, 10, 1000, prefill_cost=lambda r: 1 if r.request_id != "a" else r.num_tokens)
    for r in (a, b, c):
        s.add(r)
    assert s.schedule().prefill == [a, b, c]    # 6 + 1 + 1 fits where 6 + 6 would not


def test_kv_budget_limits_admission():
    a, b, c = req("a", 9), req("b", 9), req("c", 1)
    s = queued(a, b, c, kv_capacity_tokens=21)
    out = s.schedule()
    assert out.prefill == [a, b] and list(s.waiting) == [c]   # 10 + 10 fit; c's 2 more would make 22
    s.finish(a, "stop")
    assert s.schedule().prefill == [c]


def test_preemption_evicts_newest_and_requeues_first():
    a, b = req("a", 9), req("b", 9)
    s = queued(a, b, kv_capacity_tokens=22)
    s.schedule()
    decode_one(s)                              # a, b hold 10 each; next step needs 11 + 11 = 22
    out = s.schedule()
    assert out.preempted == [] and out.decode == [a, b]
    decode_one(s)                              # now 11 + 11: next step needs 24 > 22
    out = s.schedule()
    assert out.preempted == [b] and out.decode == [a] and out.prefill == []
    assert b.status == "waiting" and s.waiting[0] is b and b.num_preemptions == 1
    assert b.output_ids == [7, 7]              # kept: recomputed on re-admission
    s.finish(a, "length")
    out = s.schedule()
    assert out.prefill == [b]                  # re-admitted first, with its output to recompute


def test_finish_while_waiting_and_abort_free_the_queue():
    a, b = req("a", 3), req("b", 3)
    s = queued(a, b, max_num_seqs=1)
    s.schedule()
    s.finish(b, "abort")
    assert s.num_unfinished == 1
    s.finish(a, "stop")
    assert s.num_unfinished == 0 and s.schedule().decode == []


def test_continuous_admits_newcomers_into_the_running_batch():
    a = req("a", 3)
    s = queued(a, max_num_seqs=4)
    s.schedule()
    decode_one(s)
    late = req("late", 3)
    s.add(late)
    out = s.schedule()
    assert out.decode == [a] and out.prefill == [late]


def test_request_level_newcomers_wait_for_the_whole_batch():
    a, b = req("a", 3), req("b", 3)
    s = queued(a, b, max_num_seqs=4, request_level=True)
    assert s.schedule().prefill == [a, b]
    decode_one(s)
    late = req("late", 3)
    s.add(late)
    assert s.schedule().prefill == []          # a free slot, but the batch a+b is still running
    s.finish(a, "stop")
    assert s.schedule().prefill == []          # b still running
    s.finish(b, "length")
    out = s.schedule()
    assert out.prefill == [late] and out.decode == []


def test_request_level_batch_split_by_prefill_budget_stays_one_batch():
    a, b, c = req("a", 5), req("b", 5), req("c", 5)
    s = queued(a, b, c, max_num_seqs=4, max_prefill_tokens=6, request_level=True)
    assert s.schedule().prefill == [a]
    late = req("late", 1)
    s.add(late)                                # arrives after the batch a, b, c was formed
    assert s.schedule().prefill == [b]
    assert s.schedule().prefill == [c]
    assert s.schedule().prefill == []
    for r in (a, b, c):
        s.finish(r, "stop")
    assert s.schedule().prefill == [late]


def test_request_level_member_aborted_before_admission_frees_no_place_for_a_newcomer():
    a, b = req("a", 5), req("b", 5)
    s = queued(a, b, max_num_seqs=4, max_prefill_tokens=5, request_level=True)
    assert s.schedule().prefill == [a]         # b waits for the prefill budget, still in a's batch
    late = req("late", 1)
    s.add(late)
    s.finish(b, "abort")
    assert s.schedule().prefill == []          # late does not take b's place in the running batch
    s.finish(a, "stop")
    assert s.schedule().prefill == [late]


def test_request_level_preempted_member_returns_to_its_batch():
    a, b = req("a", 9), req("b", 9)
    s = queued(a, b, kv_capacity_tokens=22, request_level=True)
    s.schedule()
    decode_one(s)
    s.schedule()
    decode_one(s)
    late = req("late", 1)
    s.add(late)
    out = s.schedule()
    assert out.preempted == [b] and out.prefill == []
    s.finish(a, "length")
    out = s.schedule()
    assert out.prefill == [b]                  # b, not late: late waits until b is done
    s.finish(b, "stop")
    assert s.schedule().prefill == [late]


# -- priority tiers (the handler sets a request's tier from its tenant, tenants.py) ------------------
def test_tiers_admit_premium_first_then_arrival():
    b, s1, p, s2 = req("b", 5, tier="batch"), req("s1", 5), req("p", 5, tier="premium"), req("s2", 5)
    s = queued(b, s1, p, s2, max_num_seqs=3)
    assert s.schedule(now=0).prefill == [p, s1, s2]   # batch b arrived first and still waits


def test_kv_pressure_preempts_the_lowest_tier_first():
    p, b, st = req("p", 9, tier="premium"), req("b", 9, tier="batch"), req("st", 9)
    s = queued(p, b, st, kv_capacity_tokens=33)
    s.schedule(now=0)
    decode_one(s)
    s.schedule(now=0)                                  # 3 x (10 + 1) = 33: fits
    decode_one(s)
    out = s.schedule(now=0)                            # 3 x (11 + 1) = 36: one must go
    assert out.preempted == [b] and out.decode == [p, st]


def test_premium_displaces_running_batch_work_but_not_its_own_tier():
    b1, b2 = req("b1", 5, tier="batch"), req("b2", 5, tier="batch")
    s = queued(b1, b2, max_num_seqs=2)
    s.schedule(now=0)
    p = req("p", 5, tier="premium")
    s.add(p)
    out = s.schedule(now=0)
    assert out.preempted == [b2] and out.prefill == [p]   # the newest batch one goes
    p2 = req("p2", 5, tier="premium")
    s.add(p2)
    out = s.schedule(now=0)
    assert out.preempted == [b1] and out.prefill == [p2]
    s.add(req("p3", 5, tier="premium"))
    out = s.schedule(now=0)
    assert out.preempted == [] and out.prefill == [] and out.decode == [p, p2]   # it waits for its peers


def test_standard_requests_wait_for_a_row_rather_than_displace_batch_work():
    """Displacing costs the victim's recomputation: only premium requests do it."""
    b = req("b", 5, tier="batch")
    s = queued(b, max_num_seqs=1)
    s.schedule(now=0)
    s.add(req("s1", 5))
    out = s.schedule(now=0)
    assert out.preempted == [] and out.decode == [b] and out.prefill == []


def test_ageing_lifts_batch_work_one_tier_per_period():
    b = req("b", 5, tier="batch", arrival=0)
    s = queued(b, max_num_seqs=1, ageing_s=10)
    assert s.rank(b, now=9.9)[0] == 2 and s.rank(b, now=10)[0] == 1 and s.rank(b, now=25)[0] == 0
    p = req("p", 5, tier="premium", arrival=19)
    s.add(p)
    assert s.schedule(now=19).prefill == [p]           # b ranks standard at 19 s: premium goes first
    s.finish(p, "stop")
    p2 = req("p2", 5, tier="premium", arrival=20)
    s.add(p2)
    assert s.schedule(now=20).prefill == [b]           # b ranks premium at 20 s and arrived first
    p3 = req("p3", 5, tier="premium", arrival=21)
    s.add(p3)
    out = s.schedule(now=21)
    assert out.preempted == [] and out.decode == [b]   # and is no longer displaced


def test_a_request_aged_to_premium_goes_first_but_does_not_displace():
    b = req("b", 5, tier="batch", arrival=0)
    s = queued(b, max_num_seqs=1, ageing_s=10)
    s.schedule(now=0)
    old = req("s", 5, arrival=0)                       # standard, premium's rank from 10 s on
    s.add(old)
    out = s.schedule(now=15)
    assert s.rank(old, now=15)[0] == 0 and out.preempted == [] and out.decode == [b]
    s.add(p := req("p", 5, tier="premium", arrival=15))
    out = s.schedule(now=15)
    assert out.preempted == [b] and out.prefill == [old]   # a real premium displaces; the aged one, first in rank, takes the row


def test_request_level_ignores_tiers():
    b, p = req("b", 5, tier="batch"), req("p", 5, tier="premium")
    s = queued(b, p, max_num_seqs=1, request_level=True)
    assert s.schedule(now=0).prefill == [b]
    assert s.schedule(now=0).preempted == []


def test_a_prompt_longer_than_eight_chunks_goes_in_larger_ones():
    """A chunk is prefill_chunk_tokens, or the multiple of it that takes a longer prompt in about
    CHUNKS_PER_PROMPT steps; a prompt that fits in its chunk goes whole."""
    s = Scheduler(8, 1000, 10_000, prefill_cost=lambda r: r.num_tokens - r.num_chunked_tokens,
                  prefill_chunk_tokens=64, max_chunked_tokens=2000)
    assert [s.chunk_tokens(req("x", n)) for n in (100, 512, 513, 1100, 1411)] == [64, 64, 128, 192, 192]
    assert Scheduler(8, 1000, 10_000).chunk_tokens(req("x", 1100)) == 0
    first, long = req("first", 5), req("long", 1100)
    s.add(first)
    s.schedule(now=0)
    s.add(long)
    steps = 0
    while s.schedule(now=0).chunk is long:
        long.num_chunked_tokens += s.chunk_tokens(long)
        steps += 1
    assert steps == 5 and long.status == "running" and long.num_tokens - long.num_chunked_tokens <= 192


def test_a_long_prompt_beside_decoding_ones_is_prefilled_a_chunk_a_step_below_premium():
    """Chunked prefill: in a step that decodes, a standard prompt costing more than a chunk gets one
    chunk and keeps its place (those behind it wait), until the rest fits in a chunk; a premium
    prompt is prefilled whole; with nobody decoding a long prompt goes whole."""
    s = Scheduler(8, 1000, 10000, prefill_cost=lambda r: r.num_tokens - r.num_chunked_tokens,
                  prefill_chunk_tokens=64, max_chunked_tokens=1000)
    first, alone = req("first", 5), req("alone", 150)
    s.add(first)
    s.add(alone)
    assert s.schedule(now=0).prefill == [first, alone]          # nobody decoding: whole
    long, short = req("long", 150), req("short", 5)
    s.add(long)
    s.add(short)
    for _ in range(2):                                         # 150 - 64 - 64 = 22 left: then whole
        out = s.schedule(now=0)
        assert out.chunk is long and out.prefill == [] and list(s.waiting) == [long, short]
        long.num_chunked_tokens += 64
    out = s.schedule(now=0)
    assert out.chunk is None and out.prefill == [long, short] and out.decode == [first, alone]
    p, later = req("p", 150, tier="premium"), req("later", 150, tier="batch")
    s.add(later)
    s.add(p)
    out = s.schedule(now=0)
    assert out.prefill == [p] and out.chunk is None            # premium whole, and alone
    out = s.schedule(now=0)
    assert out.chunk is later and p in out.decode              # then the batch prompt's first chunk


def test_a_premium_prefill_runs_alone_at_most_two_steps_in_a_row():
    """The step that prefills a premium newcomer beside lower tiers' running ones decodes nobody and
    admits no lower tier beside it, so its first token waits only for its own prompt; a premium
    newcomer that arrived meanwhile goes alone too, but the third step decodes everyone, even with
    another premium newcomer waiting (it is admitted there, beside the decode); with only premium
    requests running nothing changes."""
    b, st = req("b", 5, tier="batch"), req("st", 5)
    s = queued(b, st)
    s.schedule(now=0)
    decode_one(s)
    p, st2, p2, p3 = req("p", 5, tier="premium"), req("st2", 5), req("p2", 5, tier="premium"), req("p3", 5, tier="premium")
    s.add(st2)
    s.add(p)
    out = s.schedule(now=0)
    assert out.prefill == [p] and out.decode == [] and list(s.waiting) == [st2]
    s.add(p2)
    out = s.schedule(now=0)
    assert out.prefill == [p2] and out.decode == [] and list(s.waiting) == [st2]
    s.add(p3)
    out = s.schedule(now=0)
    assert out.decode == [st, b, p, p2] and out.prefill == [p3, st2]
    out = s.schedule(now=0)
    assert out.decode == [st, b, p, p2, p3, st2]
    alone = queued(req("q1", 5, tier="premium"))                  # premium beside premium: as before
    alone.schedule(now=0)
    alone.add(q2 := req("q2", 5, tier="premium"))
    out = alone.schedule(now=0)
    assert [r.request_id for r in out.decode] == ["q1"] and out.prefill == [q2]


def test_a_prompt_sharing_a_prefix_with_one_being_prefilled_waits_a_step_for_the_cache():
    """shared_prefix_wait: b starts with the same 40 tokens as a, which this step prefills, so b waits
    a step (its prefill then finds them in the prefix cache) while c, another prompt, goes; once b has
    them cached (prefill_cost), it goes. Sharing fewer tokens than the threshold waits for nothing."""
    cached: dict[str, int] = {}
    s = Scheduler(8, 1000, 10_000, prefill_cost=lambda r: r.num_tokens - cached.get(r.request_id, 0),
                  shared_prefix_wait=32)
    a = Request("a", [5] * 40 + [1], SamplingParams(max_new_tokens=4))
    b = Request("b", [5] * 40 + [2], SamplingParams(max_new_tokens=4))
    c = Request("c", [6] * 40, SamplingParams(max_new_tokens=4))
    d = Request("d", [5] * 20 + [3] * 20, SamplingParams(max_new_tokens=4))   # 20 shared: under 32
    for r in (a, b, c, d):
        s.add(r)
    assert s.schedule().prefill == [a, c, d] and list(s.waiting) == [b]
    cached["b"] = 40                          # a's prefill stored its blocks
    assert s.schedule().prefill == [b]
    assert not Scheduler(8, 1000, 10_000).shared_prefix_wait            # off unless asked
    # a lower tier does not go before the one waiting for the cache: it could take its row
    s = Scheduler(2, 1000, 10_000, shared_prefix_wait=32)
    a2, b2 = (Request(n, [5] * 40 + [i], SamplingParams(max_new_tokens=4)) for i, n in enumerate(("a2", "b2")))
    batch = Request("batch", [6] * 40, SamplingParams(max_new_tokens=4), tier=TIERS.index("batch"))
    for r in (a2, b2, batch):
        s.add(r)
    assert s.schedule().prefill == [a2] and list(s.waiting) == [b2, batch]


def test_a_request_scoring_its_prompt_is_neither_chunked_nor_kept_waiting_for_the_cache():
    """One asking for its prompt's logprobs (OpenAI's echo) computes all of it in its prefill: a
    long one beside decoding rows goes whole, not a chunk a step, and one sharing a prompt being
    prefilled goes at once."""
    s = Scheduler(8, 1000, 10_000, prefill_chunk_tokens=64, max_chunked_tokens=500, shared_prefix_wait=32)
    running = req("running", 5)
    s.add(running)
    s.schedule()
    decode_one(s)
    long = Request("long", [3] * 200, SamplingParams(max_new_tokens=4, prompt_logprobs=1))
    s.add(long)
    out = s.schedule()
    assert out.chunk is None and out.prefill == [long]
    a = Request("a", [5] * 40, SamplingParams(max_new_tokens=4))
    b = Request("b", [5] * 40, SamplingParams(max_new_tokens=4, prompt_logprobs=0))
    s.add(a)
    s.add(b)
    assert s.schedule().prefill == [a, b]
