"""Picks the next token for each row of a logits batch, each row under its own parameters:
greedy, temperature, top-k, top-p, min-p, a logit bias and penalties, and a per-request seed that
makes a sampled request reproducible whatever it is batched with. Knows nothing about requests
beyond their params (and the token ids a penalty reads)."""

import torch

from .request import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A sampled request's own random stream: from its seed, else from torch's global one (so a
    verify step can take back the draws of the draft tokens it did not keep: engine._verify)."""
    if params.is_greedy:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed if params.seed is not None else int(torch.randint(2 ** 62, ())))
    return g


CHUNK = 1024
CUT_CANDIDATES = 64   # probabilities sorted first for a top-k / top-p cut (x8 until the cut falls within)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1), the first of equal largest as torch's: torch's own took 8 ms over 64 x
    49,152 logits (AMX Xeon, 2 threads), its amax 1 ms; so each chunk's largest first, then the
    first chunk holding the largest of all is searched."""
    *lead, V = logits.shape
    if V % CHUNK:
        return logits.argmax(dim=-1)
    chunks = logits.reshape(-1, V // CHUNK, CHUNK)                           # [N, V / CHUNK, CHUNK]
    best = chunks.amax(dim=-1).argmax(dim=-1)                                 # [N]
    inner = chunks[torch.arange(chunks.shape[0], device=logits.device), best].argmax(dim=-1)
    return (best * CHUNK + inner).reshape(lead)


def adjusted(logits: torch.Tensor, params: list[SamplingParams], prompt_vocabs: list[torch.Tensor | None],
             outputs: list[list[int]]) -> torch.Tensor:
    """logits [B, V], or a copy with each row's bias and penalties applied in vLLM's order:
    logit_bias, then repetition_penalty on the tokens of its prompt (prompt_vocabs: its distinct
    ids, where it has one) and output (a positive logit divided by it, another multiplied), then
    frequency_penalty x count and presence_penalty on its output's. Only those tokens' logits are
    read and written, all adjusting rows at once (a row at a time, through Python sets and
    whole-vocabulary counts, took 42 ms at 64 rows of 2,000-token prompts: commit message)."""
    rows = [i for i, p in enumerate(params) if p.adjusts_logits]
    if not rows:
        return logits
    dev, V = logits.device, logits.shape[-1]
    ps = [params[i] for i in rows]
    batch_row = torch.tensor(rows, device=dev)                                # [R]: adjusting row -> batch row
    scores = logits.clone()
    ids = lambda tokens: torch.tensor(tokens, dtype=torch.long, device=dev)

    def pairs(per_row: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(adjusting row, token) index tensors of each adjusting row's tokens."""
        lens = torch.tensor([len(tokens) for tokens in per_row], device=dev)
        return torch.repeat_interleave(torch.arange(len(per_row), device=dev), lens), torch.cat(per_row)

    def per_row(name: str) -> torch.Tensor:
        return torch.tensor([getattr(p, name) for p in ps], dtype=scores.dtype, device=dev)   # [R]

    if any(p.logit_bias for p in ps):
        a, t = pairs([ids([t for t, _ in p.logit_bias]) for p in ps])
        bias = torch.tensor([b for p in ps for _, b in p.logit_bias], dtype=scores.dtype, device=dev)
        scores.index_put_((batch_row[a], t), bias, accumulate=True)
    if any(p.repetition_penalty != 1 for p in ps):
        a, t = pairs([torch.cat([prompt_vocabs[i], ids(outputs[i])]) if p.repetition_penalty != 1 else ids([])
                      for i, p in zip(rows, ps)])
        rep, r = per_row("repetition_penalty")[a], batch_row[a]
        v = scores[r, t]                          # a token in both is written twice, the same value
        scores[r, t] = torch.where(v > 0, v / rep, v * rep)
    if any(p.presence_penalty or p.frequency_penalty for p in ps):
        a, t = pairs([ids(outputs[i]) for i in rows])
        key, counts = torch.unique(a * V + t, return_counts=True)           # each (row, token) once, counted
        a, t = key // V, key % V
        r = batch_row[a]
        scores[r, t] = scores[r, t] - per_row("frequency_penalty")[a] * counts - per_row("presence_penalty")[a]
    return scores


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits: [B, V] float32 -> token ids [B]. An all-greedy batch costs one argmax."""
    sampled = [i for i, p in enumerate(params) if not p.is_greedy]
    if not sampled:
        return argmax(logits)
    # one uniform draw per row, from the request's own generator
    u = torch.stack([torch.rand((), device=logits.device, generator=generators[i]) for i in sampled])   # [N]
    if len(sampled) == len(params):
        return draw(logits, params, u)
    tokens = argmax(logits)                                                   # [B]
    rows = torch.tensor(sampled, device=logits.device)
    tokens[rows] = draw(logits[rows], [params[i] for i in sampled], u)
    return tokens


def draw(logits: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    """The token each row's uniform u [N] picks from its logits [N, V] under its temperature, top-k,
    top-p and min-p. With a cut (top_k > 0, top_p < 1 or min_p > 0) the kept tokens are the most
    likely ones while the mass before them is under top_p, at most top_k of them, none less likely
    than min_p times the most likely one, and u falls in one kept token's share of
    their mass, the most likely first; without one, in one token's share of the whole vocabulary, in
    its order. Sorting the vocabulary took 3.4 ms a row on two cores, more than a decode step: a cut
    sorts only the most likely tokens (torch.topk), as many as it needs."""
    dev, (N, V) = logits.device, logits.shape
    temps = torch.tensor([p.temperature for p in params], device=dev)
    probs = torch.softmax(logits / temps[:, None], dim=-1)                     # [N, V]
    tokens = torch.empty(N, dtype=torch.long, device=dev)
    cuts = [p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0 for p in params]
    cut, whole = [i for i, c in enumerate(cuts) if c], [i for i, c in enumerate(cuts) if not c]
    if cut:
        rows = probs if len(cut) == N else probs[cut]                           # [M, V]
        top_k = torch.tensor([params[i].top_k or V for i in cut], device=dev)
        top_p = torch.tensor([params[i].top_p for i in cut], device=dev)
        min_p = torch.tensor([params[i].min_p for i in cut], device=dev)
        k = min(V, max([CUT_CANDIDATES] + [params[i].top_k for i in cut]))
        while True:
            best, order = torch.topk(rows, k, dim=-1)                          # [M, k] descending
            rank = torch.arange(k, device=dev)
            keep = ((rank[None, :] < top_k[:, None]) & ((best.cumsum(-1) - best) < top_p[:, None])
                    & (best >= min_p[:, None] * best[:, :1]))
            if k == V or not bool((keep[:, -1] & (top_k > k)).any()):          # every cut falls within the k
                break
            k = min(V, k * 8)
        tokens[cut] = order.gather(-1, pick(best * keep, u[cut]))[:, 0]
    if whole:
        tokens[whole] = pick(probs if not cut else probs[whole], u[whole])[:, 0]
    return tokens


def pick(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[N, 1]: the first position of each row of probs [N, n] whose cumulative mass reaches u's share
    of the row's: one with mass (u * total <= total; at least the smallest positive float, so a u of
    0 cannot pick a dropped token before the first kept)."""
    cdf = probs.cumsum(-1)
    target = (u * cdf[:, -1]).clamp(min=torch.finfo(cdf.dtype).tiny)
    return torch.searchsorted(cdf, target[:, None])
