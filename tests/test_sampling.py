import pytest
import torch

from llmserve.request import SamplingParams
from llmserve.sampling import CHUNK, adjusted, argmax, draw, make_generator, sample

LOGITS = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.9]])


@pytest.mark.parametrize("V", [3 * CHUNK, 3 * CHUNK + 5])
def test_argmax_gives_torchs_first_largest(V):
    """By chunk (V a multiple of the chunk) or torch's own: the first of equal largest, also when they
    sit in different chunks, and in a chunk after one holding a lesser maximum."""
    logits = torch.randn(4, 2, V, generator=torch.Generator().manual_seed(0))
    logits[0, 0, [CHUNK + 7, 2 * CHUNK + 1]] = 9.0          # a tie across chunks: the first
    logits[1, 1, [5, CHUNK - 1]] = 9.0                        # a tie within one
    logits[2, 0, 2 * CHUNK + 3] = 9.0
    logits[2, 0, 4] = 8.0
    assert torch.equal(argmax(logits), logits.argmax(dim=-1))
    assert argmax(logits)[0, 0] == CHUNK + 7 and argmax(logits)[1, 1] == 5 and argmax(logits)[2, 0] == 2 * CHUNK + 3


def test_greedy_is_argmax():
    params = [SamplingParams(max_new_tokens=1)] * 2
    assert sample(LOGITS.clone(), params, [None, None]).tolist() == [1, 0]


def test_top_k_one_is_greedy_even_when_hot():
    params = [SamplingParams(max_new_tokens=1, temperature=5.0, top_k=1)] * 2
    for _ in range(20):
        assert sample(LOGITS.clone(), params, [None, None]).tolist() == [1, 0]


def test_small_top_p_keeps_only_the_best():
    params = [SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.01)] * 2
    for _ in range(20):
        assert sample(LOGITS.clone(), params, [None, None]).tolist() == [1, 0]


def test_top_k_restricts_support():
    p = SamplingParams(max_new_tokens=1, temperature=100.0, top_k=2)
    seen = {tuple(sample(LOGITS.clone(), [p, p], [None, None]).tolist()) for _ in range(200)}
    assert {t[0] for t in seen} <= {1, 3} and {t[1] for t in seen} <= {0, 3}
    assert len({t[0] for t in seen}) == 2   # both kept tokens do get drawn


def test_mixed_rows_keep_their_own_params():
    greedy, hot = SamplingParams(max_new_tokens=1), SamplingParams(max_new_tokens=1, temperature=50.0)
    for params, greedy_row, hot_row in (([greedy, hot], 0, 1), ([hot, greedy], 1, 0)):
        draws = [sample(LOGITS.clone(), params, [None, None]).tolist() for _ in range(50)]
        assert {d[greedy_row] for d in draws} == {LOGITS[greedy_row].argmax().item()}   # greedy stays greedy
        assert len({d[hot_row] for d in draws}) > 1      # near-uniform at this heat: all four tokens likely


def test_seed_reproduces_whatever_the_batch():
    p = SamplingParams(max_new_tokens=1, temperature=1.0, seed=7)
    other = SamplingParams(max_new_tokens=1, temperature=1.0)
    logits = torch.randn(3, 1000)
    g1 = make_generator(p, torch.device("cpu"))
    alone = [sample(logits[1:2].clone(), [p], [g1]).item() for _ in range(10)]
    g2 = make_generator(p, torch.device("cpu"))
    batched = [sample(logits.clone(), [other, p, other], [None, g2, None])[1].item() for _ in range(10)]
    assert alone == batched
    assert make_generator(SamplingParams(max_new_tokens=1), torch.device("cpu")) is None


def kept_by_sorting(probs: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> set[int]:
    """The kept tokens by the definition: the most likely first, while the mass before is under top_p,
    none less likely than min_p x the most likely."""
    ranked, order = torch.sort(probs, descending=True)
    keep = ((ranked.cumsum(-1) - ranked) < top_p) & (ranked >= min_p * ranked[0])
    if top_k:
        keep[top_k:] = False
    return set(order[keep].tolist())


@pytest.mark.parametrize("top_k, top_p, min_p", [(0, 1.0, 0), (0, 0.9, 0), (0, 0.5, 0), (3, 1.0, 0), (700, 0.95, 0),
                                                 (5, 0.3, 0), (0, 1.0, 0.3), (0, 0.9, 0.5), (4, 1.0, 0.9)])
def test_each_kept_token_gets_its_share_of_uniforms(top_k, top_p, min_p):
    """Uniforms spread evenly over [0, 1) land on each kept token in proportion to its probability,
    on no other; flat enough logits that top_p's cut lies past the first candidates sorted."""
    V = 1000
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(1)) * 0.5
    p = SamplingParams(max_new_tokens=1, temperature=0.8, top_k=top_k, top_p=top_p, min_p=min_p)
    probs = torch.softmax(logits[0] / 0.8, -1)
    kept = kept_by_sorting(probs, top_k, top_p, min_p)
    assert min_p == 0 or len(kept) < len(kept_by_sorting(probs, top_k, top_p))   # min_p does cut
    n = 20_000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    tokens = draw(logits.expand(n, V).contiguous(), [p] * n, u.float())
    counts = torch.bincount(tokens, minlength=V).double() / n
    assert set(torch.nonzero(counts).flatten().tolist()) == kept
    expected = torch.zeros(V, dtype=torch.float64)
    expected[list(kept)] = probs[list(kept)].double()
    assert torch.allclose(counts, expected / expected.sum(), atol=2 / n)


def test_the_extreme_uniforms_pick_kept_tokens_only():
    """u = 0 and the largest u below 1 land on tokens with mass, never on a dropped one at either end
    of the vocabulary (token 0 and token 3 underflow to probability 0)."""
    logits = torch.tensor([[-1000.0, 0.0, 1.0, -1000.0]] * 2)
    params = [SamplingParams(max_new_tokens=1, temperature=1.0), SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.5)]
    for u in (0.0, 1.0 - 2.0 ** -24):
        assert draw(logits, params, torch.tensor([u, u])).tolist() == [1 if u == 0 else 2, 2]


def test_adjusted_applies_bias_and_penalties_to_the_listed_tokens_of_each_row_only():
    """sampling.adjusted, all rows at once, against the definition a row at a time: the bias, then
    repetition_penalty on prompt and output tokens (a token in both, or repeated, once), then
    frequency x count and presence on the output's; a row that adjusts nothing is left alone."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    params = [SamplingParams(max_new_tokens=8, repetition_penalty=1.5, logit_bias=((3, 2.0), (9, -100.0))),
              SamplingParams(max_new_tokens=8),
              SamplingParams(max_new_tokens=8, frequency_penalty=0.5, presence_penalty=-0.25),
              SamplingParams(max_new_tokens=8, repetition_penalty=0.5, frequency_penalty=1.0, presence_penalty=1.0)]
    prompts = [[1, 2, 3, 3], [4], [5, 6], [7, 8, 8]]
    outputs = [[3, 10, 10], [11], [12, 12, 12, 13], [8, 14, 14]]
    expected = logits.clone()
    for row, p, prompt, out in zip(expected, params, prompts, outputs):
        for t, b in p.logit_bias:
            row[t] += b
        if p.repetition_penalty != 1:
            for t in set(prompt + out):
                row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
        for t in set(out):
            row[t] = row[t] - p.frequency_penalty * out.count(t) - p.presence_penalty
    vocabs = [torch.tensor(sorted(set(prompt))) for prompt in prompts]
    got = adjusted(logits, params, vocabs, outputs)
    assert torch.allclose(got, expected, rtol=0, atol=1e-6) and torch.equal(got[1], logits[1])
    assert not torch.equal(got, logits) and adjusted(logits, [params[1]] * 4, vocabs, outputs) is logits
