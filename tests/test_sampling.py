"""Sampling one token: greedy at temperature 0, top-k and top-p restrict the draw to the right set, and plain
temperature sampling draws as before (the same generator gives the same token)."""

import torch

from expertpager.runtime.generate import sample

LOGITS = torch.randn(200, generator=torch.Generator().manual_seed(0))


def draws(n: int = 300, **kw) -> set[int]:
    rng = torch.Generator().manual_seed(1)
    return {sample(LOGITS, 1.0, rng, **kw) for _ in range(n)}


def test_greedy_is_the_argmax():
    assert sample(LOGITS, 0.0, torch.Generator()) == int(LOGITS.argmax())


def test_top_k_draws_only_the_k_likeliest():
    top = set(torch.topk(LOGITS, 5).indices.tolist())
    got = draws(top_k=5)
    assert got <= top and len(got) > 1


def test_top_p_draws_only_the_nucleus():
    probs = torch.softmax(LOGITS, -1)
    ordered = torch.argsort(probs, descending=True).tolist()
    nucleus, mass = set(), 0.0
    for t in ordered:  # the smallest set of likeliest tokens whose mass reaches 0.6
        nucleus.add(t)
        mass += float(probs[t])
        if mass >= 0.6:
            break
    got = draws(top_p=0.6)
    assert got <= nucleus and len(got) > 1


def test_plain_temperature_is_unchanged():
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(20):
        assert sample(LOGITS, 0.7, a) == int(torch.multinomial(torch.softmax(LOGITS / 0.7, -1), 1, generator=b))
