"""Picks the next token for each row of a logits batch, each row under its own parameters:
greedy, temperature, top-k, top-p, and a per-request seed that makes a sampled request
reproducible whatever it is batched with. Knows nothing about requests beyond their params."""

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


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits: [B, V] float32 -> token ids [B]. An all-greedy batch costs one argmax."""
    tokens = argmax(logits)                                                   # [B]
    sampled = [i for i, p in enumerate(params) if not p.is_greedy]
    if not sampled:
        return tokens
    # one uniform draw per row, from the request's own generator
    u = torch.stack([torch.rand((), device=logits.device, generator=generators[i]) for i in sampled])   # [N]
    rows = torch.tensor(sampled, device=logits.device)
    tokens[rows] = draw(logits[rows], [params[i] for i in sampled], u)
    return tokens


def draw(logits: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    """The token each row's uniform u [N] picks from its logits [N, V] under its temperature, top-k
    and top-p: the kept tokens are the most likely ones while the mass before them is under top_p
    (and at most top_k of them; ties at the cut all kept), and u falls in one kept token's share of
    their mass, the tokens in vocabulary order. Sorting the vocabulary took 3.4 ms a row on two
    cores, more than a decode step: only the largest probabilities are sorted (torch.topk), as many
    as the cut needs."""
    dev, V = logits.device, logits.shape[-1]
    temps = torch.tensor([p.temperature for p in params], device=dev)
    probs = torch.softmax(logits / temps[:, None], dim=-1)                     # [N, V]
    cut = [i for i, p in enumerate(params) if p.top_k > 0 or p.top_p < 1.0]
    if cut:
        top_k = torch.tensor([params[i].top_k or V for i in cut], device=dev)
        top_p = torch.tensor([params[i].top_p for i in cut], device=dev)
        k = min(V, max([CUT_CANDIDATES] + [params[i].top_k for i in cut]))
        while True:
            best = torch.topk(probs[cut], k, dim=-1).values                    # [M, k] descending
            rank = torch.arange(k, device=dev)
            keep = (rank[None, :] < top_k[:, None]) & ((best.cumsum(-1) - best) < top_p[:, None])
            if k == V or not bool((keep[:, -1] & (top_k > k)).any()):          # every cut falls within the k
                break
            k = min(V, k * 8)
        least = best.gather(-1, (keep.sum(-1, keepdim=True) - 1).clamp(min=0))   # [M, 1] the last kept
        probs[cut] = probs[cut] * (probs[cut] >= least)
    cdf = probs.cumsum(-1)                                                      # [N, V]
    choice = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    last = V - 1 - (probs > 0).flip(-1).int().argmax(-1)                        # the last kept token
    return torch.minimum(choice, last)
