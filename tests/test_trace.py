"""Routing traces, routing statistics and held-out loss, on tiny random models and hand-made traces."""

import math

import numpy as np
import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from expertpager.tools.evaluate import evaluate_loss
from expertpager.tools.routing_stats import (
    expert_counts,
    hot_set_overlap,
    hot_sets,
    next_token_reuse,
    popularity_entropy,
)
from expertpager.tools.trace import Trace, load_trace, moe_blocks, record_trace, save_trace


@pytest.fixture(scope="module")
def tiny() -> Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, intermediate_size=48,
        mlp_only_layers=[0], norm_topk_prob=True, max_position_embeddings=128,
    )
    return Qwen3MoeForCausalLM(config).eval()


def router_top_k(model: Qwen3MoeForCausalLM, ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Top-k experts and normalised weights from the model's own output_router_logits, as [T, M, k]."""
    with torch.no_grad():
        logits = model(input_ids=ids[None], output_router_logits=True).router_logits
    probs = torch.stack([torch.softmax(l.float(), dim=-1) for l in logits], dim=1)
    weights, experts = torch.topk(probs, model.config.num_experts_per_tok, dim=-1)
    return experts.numpy(), (weights / weights.sum(-1, keepdim=True)).numpy()


def test_moe_blocks_skips_dense_layers(tiny):
    assert [layer for layer, _ in moe_blocks(tiny)] == [1, 2]


def test_trace_matches_router_top_k(tiny):
    ids = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(1))
    trace = record_trace(tiny, ids, chunk=64, domain="code", source="random")
    experts, weights = router_top_k(tiny, ids)
    assert trace.experts.dtype == np.int16 and trace.experts.shape == (40, 2, 3)
    assert trace.weights.dtype == np.float32
    np.testing.assert_array_equal(trace.experts, experts)
    np.testing.assert_allclose(trace.weights, weights, rtol=1e-5, atol=1e-6)
    assert trace.layers.tolist() == [1, 2] and trace.num_experts == 8
    np.testing.assert_array_equal(trace.tokens, ids.numpy())


def test_trace_windows_are_independent(tiny):
    ids = torch.randint(0, 96, (50,), generator=torch.Generator().manual_seed(2))
    trace = record_trace(tiny, ids, chunk=20)
    parts = [router_top_k(tiny, ids[s : s + 20])[0] for s in (0, 20, 40)]
    np.testing.assert_array_equal(trace.experts, np.concatenate(parts))


def test_save_load_round_trip(tiny, tmp_path):
    trace = record_trace(tiny, torch.arange(30), chunk=16, domain="prose", source="arange")
    save_trace(trace, tmp_path / "t.npz")
    back = load_trace(tmp_path / "t.npz")
    for name in ("experts", "weights", "layers", "tokens"):
        np.testing.assert_array_equal(getattr(back, name), getattr(trace, name))
        assert getattr(back, name).dtype == getattr(trace, name).dtype
    assert (back.num_experts, back.domain, back.source, back.top_k) == (8, "prose", "arange", 3)


def hand_trace(rows: list[list[int]], num_experts: int = 4) -> Trace:
    experts = np.array(rows, dtype=np.int16)[:, None, :]
    return Trace(
        experts=experts,
        weights=np.full(experts.shape, 1.0 / experts.shape[2], dtype=np.float32),
        layers=np.array([0], dtype=np.int32),
        tokens=np.arange(len(rows)),
        num_experts=num_experts,
    )


def test_routing_stats_known_numbers():
    a = hand_trace([[0, 1], [1, 2], [2, 1], [3, 0]])
    np.testing.assert_allclose(next_token_reuse(a), [(0.5 + 1.0 + 0.0) / 3])
    assert expert_counts(a).tolist() == [[2, 3, 2, 1]]
    p = np.array([2, 3, 2, 1]) / 8
    np.testing.assert_allclose(popularity_entropy(a), [-(p * np.log(p)).sum() / math.log(4)])
    assert hot_sets(a) == [{1}]
    assert hot_sets(a, share=0.5) == [{1, 0}]  # counts 2, 3, 2, 1: the tie between 0 and 2 goes to 0
    b = hand_trace([[3, 2], [3, 1], [1, 3], [0, 2]])  # counts 1, 2, 2, 3
    assert hot_sets(b, share=0.5) == [{3, 1}]
    np.testing.assert_allclose(hot_set_overlap(a, b), [0.0])
    np.testing.assert_allclose(hot_set_overlap(a, b, share=0.5), [1 / 3])


def test_routing_stats_extremes():
    uniform = hand_trace([[0, 1], [2, 3]])
    np.testing.assert_allclose(popularity_entropy(uniform), [1.0])
    np.testing.assert_allclose(next_token_reuse(uniform), [0.0])
    same = hand_trace([[2, 3], [3, 2], [2, 3]])
    np.testing.assert_allclose(next_token_reuse(same), [1.0])
    np.testing.assert_allclose(popularity_entropy(same), [0.5])


def test_evaluate_loss_matches_model_loss(tiny):
    ids = torch.randint(0, 96, (33,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = tiny(input_ids=ids[None], labels=ids[None]).loss.item()
    loss, ppl, n = evaluate_loss(tiny, ids, window=64)
    assert n == 32
    assert loss == pytest.approx(expected, rel=1e-5)
    assert ppl == pytest.approx(math.exp(expected), rel=1e-5)


def test_evaluate_loss_windows(tiny):
    ids = torch.randint(0, 96, (25,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        parts = [(tiny(input_ids=ids[None, s : s + 10], labels=ids[None, s : s + 10]).loss.item(), n) for s, n in ((0, 9), (10, 9), (20, 4))]
    loss, _, n = evaluate_loss(tiny, ids, window=10)
    assert n == 22
    assert loss == pytest.approx(sum(l * k for l, k in parts) / 22, rel=1e-5)
