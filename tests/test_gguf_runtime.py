"""GGUF checkpoints run through the paged runtime: HF -> GGUF export -> our runtime gives the HF model's logits."""

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from expertpager.errors import ExpertPagerError
from expertpager.model.read_layout import read_layout
from expertpager.runtime.load import load
from expertpager.tools.export_gguf import export_gguf
from test_paged_inference import PROMPT, assert_same, logits_trace, min_cache
from tiny_gguf import write_tiny_gguf
from tiny_models import release_layout, save_tiny

STEPS = 8
Q8_0_TOLERANCE = 0.05  # max |logit difference| of a Q8_0 export; logits of these tiny models are of order 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """HF checkpoints by name, built once."""
    root = tmp_path_factory.mktemp("hf")
    return {
        "qwen3_moe": save_tiny("qwen3_moe", root / "qwen3_moe"),
        "mixtral": save_tiny("mixtral", root / "mixtral"),
        "olmoe": save_tiny("olmoe", root / "olmoe"),
        "qwen2_moe": save_tiny("qwen2_moe", root / "qwen2_moe"),  # layer 1 dense (mlp_only_layers)
        "gpt_oss": save_tiny("gpt_oss", root / "gpt_oss"),
        "deepseek_v2": save_tiny("deepseek_v2", root / "deepseek_v2"),
        "deepseek_v3": save_tiny("deepseek_v3", root / "deepseek_v3"),
        "qwen3_moe-f16": save_tiny("qwen3_moe", root / "qwen3_moe-f16", dtype=torch.float16),
        "qwen3_moe-bf16": save_tiny("qwen3_moe", root / "qwen3_moe-bf16", dtype=torch.bfloat16),
        "qwen3_next": save_tiny("qwen3_next", root / "qwen3_next"),
        "qwen3_5_moe-released-bf16": release_layout(save_tiny("qwen3_5_moe", root / "q35", dtype=torch.bfloat16),
                                                    root / "qwen3_5_moe-released-bf16"),
    }


def reference(folder, steps: int = STEPS):
    """The HF model's logits with every weight copied into memory of its own, as the GGUF runtime holds a GGUF's
    weights. (transformers uses a safetensors file's 2D tensors in place, at the file's alignment, which a GGUF
    cannot reproduce, and some CPUs' GEMM kernels round differently by alignment.)"""
    model = AutoModelForCausalLM.from_pretrained(folder)
    for p in model.parameters():
        p.data = p.data.clone()
    return logits_trace(model, PROMPT, steps)


@pytest.mark.parametrize("name,out_type", [("qwen3_moe", "f32"), ("mixtral", "f32"), ("olmoe", "f32"),
                                           ("qwen2_moe", "f32"), ("gpt_oss", "f32"), ("deepseek_v2", "f32"),
                                           ("deepseek_v3", "f32"), ("qwen3_moe-f16", "f16"),
                                           ("qwen3_moe-bf16", "bf16"), ("qwen3_next", "f32"),
                                           ("qwen3_5_moe-released-bf16", "bf16")])
def test_export_round_trip_is_exact(tiny, tmp_path, name, out_type):
    path = export_gguf(tiny[name], tmp_path / f"{name}.gguf", out_type, progress=False)
    expected = reference(tiny[name])
    for cache in (min_cache(path), None):
        model = load(path, cache=cache)
        assert model.dtype == expected[0].dtype
        assert_same(expected, logits_trace(model, PROMPT, STEPS), f"{name} as {out_type}, cache={cache}")
        model.pager.close()
    assert not list(tmp_path.glob(".*partial"))


def test_qwen2moe_dense_layer_named_as_llama_cpp_names_it(tiny, tmp_path):
    """qwen2_moe's mlp_only_layers: gguf-py has no dense FFN names for qwen2moe; the export writes llama.cpp's
    blk.N.ffn_gate/up/down, and the runtime reads the layer back as dense (round trip: the test above)."""
    layout = read_layout(export_gguf(tiny["qwen2_moe"], tmp_path / "dense.gguf", progress=False))
    assert layout.moe_layers == [0, 2]
    dense = {t.name: t.shape for t in layout.resident if t.name.startswith("blk.1.ffn_")}
    assert dense == {"blk.1.ffn_norm.weight": (32,), "blk.1.ffn_gate.weight": (48, 32), "blk.1.ffn_up.weight": (48, 32),
                     "blk.1.ffn_down.weight": (32, 48)}


def test_q8_0_within_tolerance_and_q4_0_runs(tiny, tmp_path):
    expected = reference(tiny["qwen3_moe"], steps=0)[0]
    q8 = export_gguf(tiny["qwen3_moe"], tmp_path / "q8.gguf", "q8_0", progress=False)
    types = {s.part("gate").dtype for s in read_layout(q8).slices.values()}
    assert types == {"Q8_0"}  # down rows of 16 fall back to F16, as llama.cpp's converter does
    got = logits_trace(load(q8), PROMPT, 0)[0]
    assert (got - expected).abs().max() < Q8_0_TOLERANCE
    q4 = export_gguf(tiny["qwen3_moe"], tmp_path / "q4.gguf", "q4_0", progress=False)
    assert torch.isfinite(logits_trace(load(q4), PROMPT, 0)[0]).all()


def test_hybrid_q8_0_in_the_compact_tier(tiny, tmp_path):
    """Qwen3.5's reordered linear-attention projections stay out of the compact resident modules (loaded
    dequantized, their rows put back); the rest runs compact, paged equal to resident."""
    q8 = export_gguf(tiny["qwen3_5_moe-released-bf16"], tmp_path / "q8.gguf", "q8_0", progress=False)
    everything = load(q8)
    assert {type(m).__name__ for m in everything.modules()} >= {"CompactLinear", "Linear"}
    got = logits_trace(everything, PROMPT, 2)
    # against the same file computed in float32 from its dequantized weights: bfloat16 compute moves these logits
    # (of order 4) by about 0.1; projections loaded compact with their value heads still tiled move them by 3.9
    float32 = logits_trace(load(q8, expert_cache="dequantized"), PROMPT, 0)[0]
    assert (got[0].float() - float32).abs().max() < 0.3
    assert_same(got, logits_trace(load(q8, cache=min_cache(q8, "compact")), PROMPT, 2), "qwen35moe q8_0, smallest")


def test_quantized_slices_paged_equal_all_resident(tmp_path):
    """Layers in Q4_0, F16, BF16 and Q8_0: paging at the smallest budget changes nothing."""
    path = write_tiny_gguf(tmp_path / "mixed.gguf", "llama")
    everything = logits_trace(load(path), PROMPT, STEPS)
    smallest = load(path, cache=min_cache(path), policy="lru")
    assert_same(everything, logits_trace(smallest, PROMPT, STEPS), "llama gguf, smallest cache")
    assert smallest.pager.stats_snapshot().evictions > 0


def test_gguf_bad_input(tiny, tmp_path):
    with pytest.raises(ExpertPagerError, match="no GGUF tensor blk.0.attn_q_norm.weight"):
        load(write_tiny_gguf(tmp_path / "q.gguf", "qwen3moe"))
    with pytest.raises(ExpertPagerError, match="running GGUF architecture 'granitemoe' is not supported"):
        load(write_tiny_gguf(tmp_path / "g.gguf", "granitemoe"))
    with pytest.raises(ExpertPagerError, match="unknown export type"):
        export_gguf(tiny["qwen3_moe"], tmp_path / "x.gguf", "q3_k")
    with pytest.raises(ExpertPagerError, match="exporting granitemoe to GGUF is not supported"):
        export_gguf(save_tiny("granitemoe", tmp_path / "gr"), tmp_path / "x.gguf")
    # metadata that disagrees with the tensors: the embedding is 32 wide, the file says 48
    path = export_gguf(tiny["qwen3_moe"], tmp_path / "bad.gguf", progress=False)
    reader = gguf.GGUFReader(path, "r+")
    reader.fields["qwen3moe.embedding_length"].parts[-1][0] = 48
    reader.data.flush()
    with pytest.raises(ExpertPagerError, match="has shape .* but the metadata gives"):
        load(path)


def test_tokenizer_round_trip(tmp_path):
    """A byte-level BPE tokenizer is exported into the GGUF; transformers rebuilds one that encodes the same ids."""
    import pydoc_data.topics
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from expertpager.runner import load_tokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(pydoc_data.topics.topics.values())[:50], vocab_size=300, min_frequency=2,
                            special_tokens=["<|endoftext|>"])
    folder = save_tiny("qwen3_moe", tmp_path / "tok", vocab_size=300, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>").save_pretrained(folder)
    path = export_gguf(folder, tmp_path / "tok.gguf", progress=False)
    theirs, ours = AutoTokenizer.from_pretrained(folder), load_tokenizer(str(path))
    text = "def fibonacci(n):\n    return n if n < 2 else 42  # héllo <|endoftext|>"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    assert ours.decode(ours(text)["input_ids"]) == text


def test_unsupported_expert_type_and_wrong_sizes_are_named(tmp_path):
    from dataclasses import replace

    from expertpager.runtime.gguf_model import check_slices

    layout = read_layout(write_tiny_gguf(tmp_path / "m.gguf", "llama"))
    key = (1, 2)
    s = layout.slices[key]
    layout.slices[key] = replace(s, parts=(replace(s.parts[0], dtype="IQ2_XXS"), *s.parts[1:]))
    with pytest.raises(ExpertPagerError, match=r"expert slice \(1, 2\) part .*unsupported quantization type 'IQ2_XXS'"):
        check_slices(layout)
    layout.slices[key] = replace(s, parts=(replace(s.parts[0], length=s.parts[0].length - 2), *s.parts[1:]))
    with pytest.raises(ExpertPagerError, match=r"expert slice \(1, 2\) part .* has \d+ bytes, but a"):
        check_slices(layout)


def test_deepseek2_split_kv_b_as_newer_llama_cpp_writes_it(tiny, tmp_path):
    """attn_kv_b split into attn_k_b ([heads, kv_lora, nope], per head transposed) and attn_v_b: same logits."""
    path = export_gguf(tiny["deepseek_v2"], tmp_path / "kv.gguf", progress=False)
    reader = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(str(tmp_path / "split.gguf"), "deepseek2")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    heads, nope = 4, 8
    for t in reader.tensors:
        data = np.array(t.data)
        if t.name.endswith("attn_kv_b.weight"):
            kv_b = data.reshape(heads, -1, data.shape[-1])
            w.add_tensor(t.name.replace("kv_b", "k_b"), np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1)))
            w.add_tensor(t.name.replace("kv_b", "v_b"), np.ascontiguousarray(kv_b[:, nope:]))
        else:
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_same(logits_trace(load(path), PROMPT, 2), logits_trace(load(tmp_path / "split.gguf"), PROMPT, 2),
                "deepseek2 with split kv_b")
