"""The compact tier: int4 codes equal the GGUF blocks' own, paged equals fully cached bit for bit, slots cost about
the stored bytes, and its difference from the float32 tier stays small."""

import gguf
import numpy as np
import pytest
import torch

from expertpager.errors import ExpertPagerError
from expertpager.runtime.compact import int4_fields, int8_matmul
from expertpager.runtime.compact_modules import CompactLinear
from expertpager.runtime.load import load, resolve_tier
from expertpager.model.read_layout import read_layout
from test_dequant import random_blocks
from test_paged_inference import PROMPT, assert_same, logits_trace, min_cache
from tiny_gguf import write_tiny_gguf
from tiny_models import save_tiny


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
def test_int4_fields_rebuild_the_blocks(qtype):
    rows, cols = 16, 512
    blocks = random_blocks(qtype, rows, cols // gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0], seed=1)
    expected = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype])).reshape(rows, cols)
    codes, scale, zero = int4_fields(torch.from_numpy(blocks.reshape(-1)), qtype, rows)
    assert codes.min() >= 0 and codes.max() <= 15
    rebuilt = (codes.float() - 8).reshape(rows, -1, 32) * scale[..., None] + zero[..., None]
    assert torch.allclose(rebuilt.reshape(rows, cols), expected, rtol=0, atol=1e-5)


def test_compact_paged_equals_fully_cached(tmp_path):
    # layers in Q4_0 (int4), F16, BF16, Q8_0 (int8); embedding and output Q8_0, attention Q4_0
    path = write_tiny_gguf(tmp_path / "mixed.gguf", "llama", resident=("Q8_0", "Q4_0"))
    assert resolve_tier(read_layout(path), "auto") == "compact"
    everything = load(path)
    served = {p.dtype for m in everything.modules() if hasattr(m, "slices") for s in m.slices.values() for p in s.parts}
    assert {"U8", "I8"} <= served  # both kernels in use
    reference = logits_trace(everything, PROMPT, 6)
    smallest = load(path, cache=min_cache(path, "compact"), policy="lru")
    assert_same(reference, logits_trace(smallest, PROMPT, 6), "compact tier, smallest cache")
    assert smallest.pager.stats_snapshot().evictions > 0 and smallest.dtype == torch.bfloat16
    kinds = {type(m).__name__ for m in everything.modules()}
    assert {"CompactLinear", "BlockEmbedding"} <= kinds  # resident linears and the embedding stay compact


@pytest.mark.parametrize("rows,out,inp", [(1, 2048, 768), (5, 100, 96), (1, 33, 40), (150, 64, 96)])
def test_int8_matmul_error_is_bounded_by_the_activation_step(rows, out, inp):
    """int8 activations: each output is off from the float64 product by at most half an activation step times the
    row's absolute weights (quantizing x), plus bfloat16 rounding of the result."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, inp, generator=g).to(torch.bfloat16)
    codes = torch.randint(-127, 128, (out, inp), dtype=torch.int8, generator=g)
    scale = (torch.rand(out, generator=g) / 100).to(torch.bfloat16)
    w = codes.double() * scale.double()[:, None]
    exact = x.double() @ w.T
    y = int8_matmul(x, codes.T, scale)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, out)
    step = x.double().abs().amax(-1, keepdim=True) / 127
    bound = step / 2 * w.abs().sum(-1) + exact.abs() * 2 ** -8 + 1e-12
    assert ((y.double() - exact).abs() <= bound * 1.001).all()
    assert not torch.equal(y, (x.double() @ w.T).to(torch.bfloat16))  # x really is quantized: not a float product
    for r in {0, rows // 2, rows - 1}:  # a row's result does not depend on the rows beside it (150 go in groups)
        assert torch.equal(y[r:r + 1], int8_matmul(x[r:r + 1], codes.T, scale))


def test_lm_head_multiplies_int8_activations(tmp_path):
    path = write_tiny_gguf(tmp_path / "mixed.gguf", "llama", resident=("Q8_0", "Q4_0"))
    model = load(path)
    head = model.get_output_embeddings()
    assert isinstance(head, CompactLinear) and head.int8_activations and head.weight.dtype == torch.int8
    others = [m for m in model.modules() if isinstance(m, CompactLinear) and m is not head]
    assert others and not any(m.int8_activations for m in others)


def test_compact_slots_cost_about_the_stored_bytes(tmp_path):
    path = write_tiny_gguf(tmp_path / "q4.gguf", "llama", quants=("Q4_0",))
    model = load(path)
    for m in model.modules():
        for e, s in getattr(m, "slices", {}).items():
            stored = model.layout.slices[(m.layer, e)].nbytes
            assert sum(p.length for p in s.parts) <= 1.15 * stored + 3 * 64  # int4 + bf16 scale/zero per 32


def test_compact_close_to_float32(tmp_path):
    path = write_tiny_gguf(tmp_path / "mixed.gguf", "llama")
    compact = logits_trace(load(path), PROMPT, 0)[0].float()
    full = logits_trace(load(path, expert_cache="dequantized", dtype="float32"), PROMPT, 0)[0]
    assert (compact - full).abs().max() < 0.1 * full.abs().max()
    assert (compact.argmax(-1) == full.argmax(-1)).float().mean() >= 0.75


def test_compact_refuses_what_it_cannot_hold(tmp_path):
    folder = save_tiny("qwen3_moe", tmp_path / "hf")
    with pytest.raises(ExpertPagerError, match="compact expert cache needs quantized experts"):
        load(folder, expert_cache="compact")
    path = write_tiny_gguf(tmp_path / "q4.gguf", "llama", quants=("Q4_0",))
    with pytest.raises(ExpertPagerError, match="computes in bfloat16"):
        load(path, dtype="float32", expert_cache="compact")


def test_repack_compact_is_one_read_and_the_same_tier(tmp_path):
    from expertpager.tools.repack import repack

    path = write_tiny_gguf(tmp_path / "mixed.gguf", "llama", resident=("Q8_0", "Q4_0"))
    out = repack(path, tmp_path / "compact", compact=True, progress=False)
    reference = logits_trace(load(path), PROMPT, 4)
    model = load(out, cache=min_cache(out, "auto"))
    assert model.pager._decode is None  # stored transcoded: page-in is the read alone
    assert_same(reference, logits_trace(model, PROMPT, 4), "repack --compact, smallest cache")
    with pytest.raises(ExpertPagerError, match="stored in the compact layout"):
        load(out, expert_cache="dequantized")


@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_quantize_float_checkpoint(tmp_path, quantize):
    folder = save_tiny("qwen3_moe", tmp_path / "hf", hidden_size=64, moe_intermediate_size=32)
    everything = load(folder, quantize=quantize)
    served = {p.dtype for m in everything.modules() if hasattr(m, "slices") for s in m.slices.values() for p in s.parts}
    assert ("U8" if quantize == "int4" else "I8") in served and everything.dtype == torch.bfloat16
    packed = [n for n, m in everything.named_modules() if isinstance(m, CompactLinear)]
    assert "lm_head" in packed and any(n.endswith("self_attn.q_proj") for n in packed)
    assert not any(n.endswith(("gate", "router")) for n in packed)
    reference = logits_trace(everything, PROMPT, 4)
    small = load(folder, quantize=quantize, cache=200_000)  # 143,360 of staging, then 7-13 of 24 slices
    assert_same(reference, logits_trace(small, PROMPT, 4), f"--quantize {quantize}, small cache")
    assert small.pager.stats_snapshot().evictions > 0
    full = logits_trace(load(folder, dtype="bfloat16"), PROMPT, 0)[0].float()
    assert (reference[0].float().argmax(-1) == full.argmax(-1)).float().mean() >= 0.75
    with pytest.raises(ExpertPagerError, match="use int4 or int8"):
        load(folder, quantize="int3")
    from expertpager.tools.repack import repack

    stored = load(repack(folder, tmp_path / "q", quantize=quantize, progress=False), cache=200_000)
    assert stored.pager._decode is None  # stored quantized: page-in is the read alone
    assert isinstance(stored.lm_head, CompactLinear)
    assert_same(reference, logits_trace(stored, PROMPT, 4), f"repack --quantize {quantize}")


def test_quantize_int4_requantizes_a_gguf(tmp_path):
    """--quantize int4 on a quantized GGUF: its 8- and 16-bit matrices (Q8_0 output and embedding, F16/BF16/Q8_0
    expert layers) go to int4 too, paged equals fully cached, the plan counts the smaller resident bytes, and a
    store repacked that way loads the same tier by itself."""
    from expertpager.runtime.load import resident_held
    from expertpager.tools.repack import repack

    path = write_tiny_gguf(tmp_path / "mixed.gguf", "llama", resident=("Q8_0", "Q4_0"))
    everything = load(path, quantize="int4")
    served = {p.dtype for m in everything.modules() if hasattr(m, "slices") for s in m.slices.values() for p in s.parts}
    assert "U8" in served and "I8" not in served
    assert everything.lm_head.weight.dtype == torch.uint8  # the Q8_0 output as int4 groups
    layout = read_layout(path)
    assert resident_held(layout, True) < resident_held(layout)
    reference = logits_trace(everything, PROMPT, 4)
    smallest = load(path, quantize="int4", cache=min_cache(path, "compact"), policy="lru")
    assert_same(reference, logits_trace(smallest, PROMPT, 4), "--quantize int4 GGUF, smallest cache")
    assert smallest.pager.stats_snapshot().evictions > 0
    full = logits_trace(load(path, expert_cache="dequantized", dtype="float32"), PROMPT, 0)[0]
    assert (reference[0].float().argmax(-1) == full.argmax(-1)).float().mean() >= 0.75
    stored = repack(path, tmp_path / "q4", quantize="int4", progress=False)
    assert_same(reference, logits_trace(load(stored, cache=min_cache(stored, "auto")), PROMPT, 4), "repack --quantize int4")
    with pytest.raises(ExpertPagerError, match="stored with --quantize int4"):
        load(stored, quantize="int8")


def test_block_kv_cache_holds_what_concatenation_holds(monkeypatch):
    from transformers.cache_utils import DynamicLayer

    from expertpager.runtime import decode_attention
    from expertpager.runtime.decode_attention import BlockLayer

    monkeypatch.setattr(decode_attention, "KV_BLOCK", 4)
    monkeypatch.setattr(decode_attention, "KV_FIRST", 2)
    g = torch.Generator().manual_seed(0)
    block, plain = BlockLayer(), DynamicLayer()
    buffers = []
    with torch.inference_mode():  # as generate runs it (no view tracking there)
        for n in (1, 1, 1, 1, 1, 6):  # doubling, across block boundaries, a chunk larger than a block
            k, v = (torch.randn(1, 2, n, 8, generator=g).bfloat16() for _ in range(2))
            got, want = block.update(k, v), plain.update(k, v)
            assert all(torch.equal(a, b) for a, b in zip(got, want)) and block.get_seq_length() == plain.get_seq_length()
            buffers.append(block.keys.whole)
    assert [b.shape[-2] for b in buffers] == [2, 2, 4, 4, 8, 12]  # doubled to a block, then grown in blocks
    assert buffers[0] is buffers[1] and buffers[2] is buffers[3]  # each kept while it has room
    assert not buffers[-1][..., 11:, :].any()  # zero past the 11 tokens


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("block", [False, True])
def test_decode_attention_matches_sdpa(masked, block):
    """Near sdpa in float32, on plain keys and values and on a block cache's (multiplied whole, the rest masked)."""
    import torch.nn.functional as F

    from expertpager.runtime.decode_attention import BlockLayer, decode_attention

    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 8, 1, 16, generator=g).bfloat16()
    k, v = (torch.randn(2, 2, 37, 16, generator=g).bfloat16() for _ in range(2))
    mask = torch.rand(2, 1, 1, 37, generator=g) > 0.3 if masked else None
    with torch.inference_mode():
        held = BlockLayer().update(k, v) if block else (k, v)
        assert not block or held[0].whole.shape[-2] == 64  # the first room past 37 tokens
        out, _ = decode_attention(None, q, *held, mask, scaling=0.25)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=0.25, enable_gqa=True)
    assert out.shape == (2, 1, 8, 16)
    assert torch.allclose(out.float(), want.transpose(1, 2), atol=0.02, rtol=0.02)


def test_compact_generate_paged_equals_fully_cached(tmp_path, monkeypatch):
    """generate's decode steps in the compact tier (its own expert step, attention and block KV cache) give the
    same tokens paged at the smallest cache as fully cached, across KV blocks."""
    from expertpager.runtime import decode_attention
    from expertpager.runtime.generate import generate

    monkeypatch.setattr(decode_attention, "KV_BLOCK", 4)
    path = write_tiny_gguf(tmp_path / "mixed.gguf", "llama", resident=("Q8_0", "Q4_0"))
    everything = load(path)
    assert everything.config._attn_implementation == decode_attention.NAME
    want = generate(everything, PROMPT, 12).tokens
    smallest = load(path, cache=min_cache(path, "compact"), policy="lru")
    assert generate(smallest, PROMPT, 12).tokens == want
    assert smallest.pager.stats_snapshot().evictions > 0
