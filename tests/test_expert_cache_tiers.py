"""The expert cache's two tiers for slices not stored in the compute dtype: raw blocks (decoded on every use) and
dequantized tensors (decoded once at page-in) give the same logits, bit for bit, at every budget."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from expertpager.errors import ExpertPagerError
from expertpager.runtime import paged_experts
from expertpager.runtime.load import load
from expertpager.tools.export_gguf import export_gguf
from test_paged_inference import PROMPT, assert_same, logits_trace, min_cache
from tiny_gguf import write_tiny_gguf
from tiny_models import save_tiny

STEPS = 6
TIERS = ("raw", "dequantized")


def tier_traces(path, dtype: str = "auto") -> dict[str, list[torch.Tensor]]:
    """Logits per tier and budget: the smallest cache each tier accepts, and every slice cached."""
    out = {}
    for tier in TIERS:
        for cache in (min_cache(path, tier, dtype), None):
            model = load(path, cache=cache, expert_cache=tier, dtype=dtype)
            assert (model.pager._decode is None) == (tier == "raw")
            out[f"{tier}, cache={cache}"] = logits_trace(model, PROMPT, STEPS)
            model.pager.close()
    return out


def test_dequantized_tier_equals_raw_tier_and_resident_hf(tmp_path):
    """bf16 weights exported as BF16 and run in float32: every slice is decoded, and matches HF upcasting them."""
    folder = save_tiny("qwen3_moe", tmp_path / "hf", dtype=torch.bfloat16)
    path = export_gguf(folder, tmp_path / "m.gguf", "bf16", progress=False)
    expected = logits_trace(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), PROMPT, STEPS)
    for what, trace in tier_traces(path, "float32").items():
        assert_same(expected, trace, what)


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_quantized_tiers_agree_at_every_budget(tmp_path, dtype):
    """Layers in Q4_0, F16, BF16 and Q8_0, computed in float32 (auto) or bfloat16."""
    traces = tier_traces(write_tiny_gguf(tmp_path / "mixed.gguf", "llama"), dtype)
    first = next(iter(traces.values()))
    for what, trace in traces.items():
        assert_same(first, trace, what)


def test_dequantized_smallest_cache_pages_and_matches_q8_0(tmp_path):
    path = export_gguf(save_tiny("qwen3_moe", tmp_path / "hf"), tmp_path / "q8.gguf", "q8_0", progress=False)
    traces = tier_traces(path)
    first = next(iter(traces.values()))
    for what, trace in traces.items():
        assert_same(first, trace, what)
    model = load(path, cache=min_cache(path))
    logits_trace(model, PROMPT, 1)
    s = model.pager.stats_snapshot()
    assert s.evictions > 0 and model.pager.pool_bytes <= model.memory_plan.cache_bytes
    assert model.pager.staging_bytes == model.memory_plan.staging_bytes > 0


def test_decode_error_is_reported_and_never_served(tmp_path, monkeypatch):
    path = write_tiny_gguf(tmp_path / "mixed.gguf", "llama")
    expected = logits_trace(load(path, expert_cache="raw"), PROMPT, STEPS)
    model = load(path, expert_cache="dequantized")
    real = paged_experts.dequantize

    def broken(raw, qtype, shape):
        raise RuntimeError(f"bad {qtype} blocks")

    monkeypatch.setattr(paged_experts, "dequantize", broken)
    with pytest.raises(ExpertPagerError, match=r"decoding expert slice \(\d+, \d+\) failed: .*bad Q4_0 blocks"):
        logits_trace(model, PROMPT, STEPS)
    assert model.pager.stats_snapshot().load_errors >= 1
    assert all(k[0] % 4 not in (0, 3) for k in model.pager.resident())  # no Q4_0 or Q8_0 slice was served
    monkeypatch.setattr(paged_experts, "dequantize", real)
    assert_same(expected, logits_trace(model, PROMPT, STEPS), "after the decode error")


def test_unknown_expert_cache_is_named(tmp_path):
    with pytest.raises(ExpertPagerError, match="unknown expert cache 'bf16'"):
        load(write_tiny_gguf(tmp_path / "m.gguf", "llama"), expert_cache="bf16")


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_gpt_oss_gguf_interleaved_once_at_page_in(tmp_path, dtype):
    """A gpt-oss GGUF (llama.cpp's separate [out, in] gate and up, biases) decoded at page-in into transformers'
    interleaved, transposed gate_up: the same logits as rebuilding it on every use (raw tier), and a hit serves the
    slot's bytes as they are."""
    path = export_gguf(save_tiny("gpt_oss", tmp_path / "hf"), tmp_path / "oss.gguf", "q8_0", progress=False)
    traces = tier_traces(path, dtype)
    first = next(iter(traces.values()))
    for what, trace in traces.items():
        assert_same(first, trace, what)
    model = load(path, expert_cache="dequantized", dtype=dtype)
    experts = next(m for m in model.modules() if isinstance(m, paged_experts.PagedExperts))
    assert not experts.transpose
    assert {p.role for p in experts.slices[0].parts} == {"gate_up", "down", "gate_up_bias", "down_bias"}
    with model.pager.pin((experts.layer, 0)) as buf:
        tensors = experts._tensors(0, {(experts.layer, 0): buf})
        for role in ("gate_up", "down", "gate_up_bias"):
            assert tensors[role].data_ptr() == buf.views[role].ctypes.data, role
    model.pager.close()
