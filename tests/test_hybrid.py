"""Qwen3.5-MoE and Qwen3-Next: hybrid Gated DeltaNet / full-attention models with routed and shared experts.

Real geometry from the released configs (headers only), the released layouts (multimodal wrapper, fused experts,
vision and MTP tensors), the memory plan's fixed-size linear-attention state, llama.cpp's GGUF transforms and their
inverse, and routing traces and fitted speculation through the hybrid layers."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from big_headers import REAL_CONFIGS, write_sparse_real
from expertpager.cli import app
from expertpager.model.architectures import ARCHITECTURES
from expertpager.model.plan import reserve_bytes
from expertpager.model.read_layout import read_layout
from expertpager.runtime.gguf_model import tensor_name_map
from expertpager.runtime.hybrid_gguf import Heads, from_gguf, to_gguf
from expertpager.runtime.load import load
from expertpager.runtime.speculator import SPECULATOR_FILE, save_speculator
from expertpager.tools.calibrate import calibrate
from expertpager.tools.trace import record_trace
from test_paged_inference import PROMPT, assert_same, logits_trace, min_cache
from tiny_models import release_layout, save_tiny

SLICE_BF16 = 3 * 512 * 2048 * 2  # gate, up and down of one 512-wide expert at hidden 2048, bf16


def inspect_json(folder) -> dict:
    result = CliRunner().invoke(app, ["inspect", str(folder), "--json", "--max-memory", "16GB"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_qwen3_5_35b_a3b_as_released(tmp_path):
    """REFERENCE.md: 40 layers (30 Gated DeltaNet), 10,240 slices of 6,291,456 B bf16, experts 64.4 GB, resident
    4.90 GB; the released file's fused experts, vision tower and MTP layer (with its own experts) as stored."""
    info = inspect_json(write_sparse_real(tmp_path / "q35", REAL_CONFIGS / "Qwen3.5-35B-A3B.json", fused=True))
    assert info["architecture"] == "qwen3_5_moe" and info["num_layers"] == info["num_moe_layers"] == 40
    assert info["num_experts"] == 256 and info["experts_per_token"] == 8
    assert info["num_slices"] == 10_240 and info["slice_bytes"] == SLICE_BF16 == 6_291_456
    assert info["expert_bytes"] == 10_240 * SLICE_BF16 and round(info["expert_bytes"] / 1e9, 1) == 64.4
    assert round(info["resident_bytes"] / 1e9, 2) == 4.90
    assert info["resident_breakdown"]["shared_expert"] == 40 * (3 * 512 + 1) * 2048 * 2  # with its sigmoid gate
    assert info["resident_breakdown"]["embeddings"] == info["resident_breakdown"]["lm_head"] == 248_320 * 2048 * 2
    assert len(info["linear_attention_layers"]) == 30 and 3 not in info["linear_attention_layers"]
    # 30 layers x (a float32 state of 32 value heads x 128 x 128, and the conv window over 8,192 channels x 4)
    assert info["linear_state_bytes"] == 30 * (32 * 128 * 128 + 8192 * 4) * 4
    assert info["plan"]["fits"]


def test_qwen3_next_80b_a3b(tmp_path):
    """48 layers, 512 experts of 512, top-10: 24,576 slices; experts 154.6 GB bf16 (about 46.8 GB at Q4_K_M)."""
    info = inspect_json(write_sparse_real(tmp_path / "q3n", REAL_CONFIGS / "Qwen3-Next-80B-A3B.json", fused=False))
    assert info["architecture"] == "qwen3_next" and info["num_moe_layers"] == 48
    assert info["num_slices"] == 24_576 and info["slice_bytes"] == SLICE_BF16 and info["experts_per_token"] == 10
    assert info["expert_bytes"] + info["resident_bytes"] == 79_674_391_296 * 2  # the released parameter count
    assert len(info["linear_attention_layers"]) == 36  # full_attention_interval 4, no layer_types in the config


def test_linear_attention_state_does_not_grow_with_context(tmp_path):
    """Only the 10 full-attention layers keep a KV cache; the 30 linear-attention layers' state is fixed."""
    layout = read_layout(write_sparse_real(tmp_path / "q35", REAL_CONFIGS / "Qwen3.5-35B-A3B.json", fused=True))
    kv_per_token = 10 * 2 * (2 * 256) * 2  # full-attention layers x (k, v) x kv heads x head dim x bf16
    assert reserve_bytes(layout, 8192) - reserve_bytes(layout, 4096) == 4096 * kv_per_token


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid")
    q35 = save_tiny("qwen3_5_moe", root / "q35", num_hidden_layers=4,
                    layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"])
    return release_layout(q35, root / "q35-released")


def test_released_layouts_read_the_text_model_only(released, tmp_path):
    layout = read_layout(released)
    assert layout.architecture == "qwen3_5_moe" and layout.moe_layers == [0, 1, 2, 3]
    assert not [t.name for t in layout.resident if "visual" in t.name or "mtp" in t.name]
    assert {p.role for s in layout.slices.values() for p in s.parts} == {"gate_up", "down"}
    assert all(p.stacked for s in layout.slices.values() for p in s.parts)
    assert "other" not in layout.resident_by_category()  # A_log, dt_bias, conv1d count as attention
    q3n = read_layout(release_layout(save_tiny("qwen3_next", tmp_path / "q3n"), tmp_path / "q3n-released", fused=False))
    assert q3n.moe_layers == [0, 1, 2] and len(q3n.slices) == 3 * 8  # the MTP layer's experts are not layer 0's
    assert not [t.name for t in q3n.resident if "mtp" in t.name]


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_next"])
def test_gguf_transforms_invert_exactly(arch):
    """Every tensor llama.cpp transforms comes back as the model uses it, bit for bit (A_log through exp, the
    norms as 1 + weight: both many-to-one on floats); Qwen3.5's value heads really move."""
    config = AutoConfig.for_model(arch, **{"text_config": {}} if arch == "qwen3_5_moe" else {}).get_text_config()
    config = AutoConfig.for_model(config.model_type, linear_num_key_heads=2, linear_num_value_heads=6,
                                  linear_key_head_dim=4, linear_value_head_dim=3, hidden_size=8, num_hidden_layers=1)
    h, entry = Heads.of(config.to_dict()), ARCHITECTURES[arch]
    names = tensor_name_map(entry.gguf_arch, 1)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(0)
    moved = []
    for name, p in model.named_parameters():
        forward = to_gguf(entry, h, names, name)
        if forward is None:
            continue
        value = torch.randn(p.shape, generator=g) * (0.2 if name.endswith("norm.weight") else 1)
        stored = [fn(value) for _, fn in forward]
        gguf_names, inverse = from_gguf(entry, h, names, name)
        assert gguf_names == [n for n, _ in forward]
        back = inverse(stored, torch.float32).reshape(p.shape)
        if name.endswith("A_log"):  # exp is many-to-one on floats: what the model computes, -exp(A_log), is exact
            back, value = back.exp(), value.exp()
        elif name.endswith("norm.weight") and "linear_attn" not in name:  # the model computes 1 + weight
            back, value = 1 + back, 1 + value
        assert torch.equal(back, value), name
        if stored[0].shape == value.shape and not torch.equal(stored[0], value):
            moved.append(name.rpartition(".")[0].rpartition(".")[2] if "weight" in name else name.rpartition(".")[2])
    reordered = {"in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj", "dt_bias"}
    assert reordered <= set(moved) if arch == "qwen3_5_moe" else not reordered & set(moved)


def test_trace_and_fitted_speculation_through_hybrid_layers(released, tmp_path):
    """Routing traces and the speculator's fit read the residual stream across Gated DeltaNet layers; a paged
    run that prefetches with the fitted maps stays exact."""
    model = AutoModelForCausalLM.from_pretrained(released).eval()
    ids = torch.from_numpy(np.random.default_rng(0).integers(3, 96, 160))
    trace = record_trace(model, ids, chunk=80)
    assert trace.experts.shape == (160, 4, 2) and trace.layers.tolist() == [0, 1, 2, 3]
    spec = calibrate(model, ids.numpy(), ahead=1, chunk=80)
    assert set(spec.maps) == {(1, 1), (2, 1), (3, 1)}
    save_speculator(spec, released / SPECULATOR_FILE)
    try:
        reference = logits_trace(model, PROMPT, 6)
        paged = load(released, cache=min_cache(released) * 2, predictors="next-layer")
        assert paged.speculator is not None
        assert_same(reference, logits_trace(paged, PROMPT, 6), "qwen3_5_moe with a fitted speculator")
        assert paged.pager.stats_snapshot().prefetch_issued > 0
        paged.pager.close()
    finally:
        (released / SPECULATOR_FILE).unlink()
