"""Predictors queue prefetches on a real paged model and never change its outputs."""

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from expertpager.errors import ExpertPagerError
from expertpager.runtime.load import load
from expertpager.runtime.moe_layers import moe_layers, speculate
from expertpager.runtime.predictors import Domain, NextLayer, Temporal, make_predictors
from expertpager.runtime.profiles import Profile, closest, load_profiles, save_profile
from test_paged_inference import PROMPT, assert_same, logits_trace, min_cache
from tiny_models import save_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_predict")
    return {"qwen3_moe": save_tiny("qwen3_moe", root / "q", num_hidden_layers=4),
            "gpt_oss": save_tiny("gpt_oss", root / "g", num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)}


def profile_for(folder, name: str, hot: list[int]) -> Profile:
    layers = [l.index for l in moe_layers(AutoModelForCausalLM.from_pretrained(folder))]
    counts = np.ones((len(layers), 8 if folder.name == "q" else 4), dtype=np.int64)
    counts[:, hot] = 50
    return Profile(name, layers, counts, tokens=100)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("spec", ["next-layer", "next-layer-1", "temporal", "domain", "next-layer:2+2,temporal,domain"])
def test_predictors_do_not_change_logits(tiny, tmp_path, arch, spec):
    folder = tiny[arch]
    save_profile(profile_for(folder, "hot01", [0, 1]), tmp_path / "hot01.json")
    save_profile(profile_for(folder, "hot23", [2, 3]), tmp_path / "hot23.json")
    reference = logits_trace(AutoModelForCausalLM.from_pretrained(folder), PROMPT)
    model = load(folder, cache=min_cache(folder) * 2, predictors=spec, profiles=tmp_path)
    assert_same(reference, logits_trace(model, PROMPT), f"{arch} {spec}")
    stats = model.pager.stats_snapshot()
    assert stats.prefetch_issued + stats.prefetch_cancelled + stats.prefetch_dropped > 0
    if "domain" in spec:
        assert model.prefetcher.predictors[-1].chosen[0] in ("hot01", "hot23")
    model.pager.close()


def test_next_layer_lookahead_and_extra(tiny):
    layers = moe_layers(AutoModelForCausalLM.from_pretrained(tiny["qwen3_moe"]))
    hidden = torch.randn(3, 32)
    top = speculate(layers[1], hidden)
    wider = speculate(layers[1], hidden, extra=2)
    assert top.shape == (3, 2) and wider.shape == (3, 4) and torch.equal(wider[:, :2], top)
    logits = layers[1].router.forward(layers[1].norm.forward(hidden))[0].reshape(3, -1)
    best = speculate(layers[1], hidden, extra=-1)
    assert best.shape == (3, 1) and torch.equal(best[:, 0], logits.argmax(-1))
    assert all(len(set(row)) == 4 for row in wider.tolist())
    p = NextLayer(lookahead=2)
    p.start(layers, 8, 16)
    from expertpager.runtime.predictors import Routed

    keys = p.routed(Routed(layers[0].index, [0], hidden[:1]))
    assert {k[0] for k in keys} == {layers[1].index, layers[2].index}
    assert p.routed(Routed(layers[-1].index, [0], hidden[:1])) == []


def test_temporal_predicts_previous_token_and_wraps(tiny):
    layers = moe_layers(AutoModelForCausalLM.from_pretrained(tiny["qwen3_moe"]))
    from expertpager.runtime.predictors import Routed

    p = Temporal()
    p.start(layers, 8, 16)
    h = torch.zeros(1, 32)
    order = [l.index for l in layers]
    assert p.routed(Routed(order[0], [1, 2], h)) == []
    for l in order[1:]:
        p.routed(Routed(l, [3, 4], h))
    assert p.routed(Routed(order[-1], [5, 6], h)) == [(order[0], 1), (order[0], 2)]
    assert p.routed(Routed(order[0], [7, 0], h)) == [(order[1], 3), (order[1], 4)]


def test_domain_picks_closest_profile(tiny, tmp_path):
    a, b = profile_for(tiny["qwen3_moe"], "a", [0, 1]), profile_for(tiny["qwen3_moe"], "b", [5, 6])
    save_profile(a, tmp_path / "a.json")
    save_profile(b, tmp_path / "b.json")
    loaded = load_profiles(tmp_path, a.layers, 8)
    assert [p.name for p in loaded] == ["a", "b"] and np.array_equal(loaded[0].counts, a.counts)
    assert load_profiles(tmp_path, a.layers, 16) == []
    prompt = np.zeros_like(a.counts)
    prompt[:, 6] = 3
    assert closest(loaded, prompt)[0].name == "b"
    d = Domain(tmp_path, share=0.5)
    d.start(moe_layers(AutoModelForCausalLM.from_pretrained(tiny["qwen3_moe"])), 8, 8)
    keys = d.prompt(prompt)
    assert len(keys) == 4 and {e for _, e in keys} <= {5, 6} and keys == sorted(keys)


def test_unknown_predictor():
    with pytest.raises(ExpertPagerError, match="unknown predictor"):
        make_predictors("next-layer,psychic")
    assert make_predictors("none") == [] and make_predictors(None) == []
    wide, plain, narrow = make_predictors("next-layer:2+4,next-layer,next-layer-1")
    assert (wide.lookahead, wide.extra, plain.lookahead, plain.extra, narrow.extra) == (2, 4, 1, 0, -1)
    with pytest.raises(ExpertPagerError, match="look ahead at least 1"):
        make_predictors("next-layer:0")


def test_next_layer_cannot_predict_fewer_than_one_expert(tiny):
    layers = moe_layers(AutoModelForCausalLM.from_pretrained(tiny["qwen3_moe"]))
    with pytest.raises(ExpertPagerError, match=r"routes to 2 of 8 experts, so next-layer predicts 2-2 = 0; use 1 to 8"):
        make_predictors("next-layer-2")[0].start(layers, 8, 16)


def test_next_layer_speculation_on_the_demo_model_beats_chance():
    """Learned routing: one layer ahead, speculation recalls far more than the k/E a guess would."""
    from expertpager.model.demo import demo_model_path
    from expertpager.tools.speculation import recall_precision, speculation
    from expertpager.tools.trace import load_trace

    trace = load_trace(Path(__file__).parent / "data" / "traces" / "demo_code_heldout.npz")
    model = AutoModelForCausalLM.from_pretrained(demo_model_path())
    actual, predicted = speculation(model, trace.tokens[:256], lookahead=2)
    recall, _ = recall_precision(actual, predicted)
    assert np.nanmean(recall[:, 0]) > 3 * model.config.num_experts_per_tok / model.config.num_experts
    assert np.nanmean(recall[:, 0]) > np.nanmean(recall[:, 1])
