"""Layouts of every supported architecture: each slice's byte ranges decode to that expert's weights."""

import ctypes
import json
import mmap
import os

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from big_headers import write_sparse_gguf, write_sparse_safetensors
from expertpager.model.read_layout import read_layout
from expertpager.pager import drop_page_cache
from expertpager.report import describe
from tiny_gguf import GGUF_ARCHES, write_tiny_gguf
from tiny_models import CONFIGS, save_tiny

TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def read_part(part) -> bytes:
    with open(part.file, "rb") as f:
        f.seek(part.offset)
        return f.read(part.length)


def decode(part) -> torch.Tensor:
    raw = bytearray(read_part(part))
    return torch.frombuffer(raw, dtype=TORCH_DTYPES[part.dtype]).reshape(part.shape)


def expected_hf(experts, role: str, e: int) -> torch.Tensor:
    """The tensor transformers holds for `role` of expert e (transformers fuses gate/up at load)."""
    if role in ("gate", "up") and not hasattr(experts, "gate_proj"):
        gate_up = experts.gate_up_proj[e]
        half = gate_up.shape[0] // 2
        return gate_up[:half] if role == "gate" else gate_up[half:]
    name = {"gate_up": "gate_up_proj", "down": "down_proj", "gate_up_bias": "gate_up_proj_bias",
            "down_bias": "down_proj_bias"}[role]
    return getattr(experts, name)[e]


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hf_slices_decode_to_transformers_weights(tmp_path, model_type, dtype):
    folder = save_tiny(model_type, tmp_path / model_type, dtype=dtype)
    layout = read_layout(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    assert layout.architecture == model_type
    assert len(layout.slices) == len(layout.moe_layers) * layout.num_experts
    for (layer, e), s in layout.slices.items():
        mlp = model.model.layers[layer]
        block = getattr(mlp, "mlp", None) or getattr(mlp, "block_sparse_moe")
        for part in s.parts:
            assert torch.equal(decode(part), expected_hf(block.experts, part.role, e)), (layer, e, part.role)
    params = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    assert layout.expert_bytes + layout.resident_bytes == params


@pytest.mark.parametrize("arch", GGUF_ARCHES)
@pytest.mark.parametrize("fused", [False, True])
def test_gguf_slices_are_expert_rows_of_reader_tensors(tmp_path, arch, fused):
    path = write_tiny_gguf(tmp_path / "m.gguf", arch, fused=fused)
    layout = read_layout(path)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert layout.num_experts == 4 and layout.experts_per_token == 2
    assert layout.moe_layers == ([1, 2, 3] if arch == "deepseek2" else [0, 1, 2, 3])
    quant_types = set()
    for (layer, e), s in layout.slices.items():
        for part in s.parts:
            suffix = "bias" if part.role.endswith("_bias") else "weight"
            t = tensors[f"blk.{layer}.ffn_{part.role.removesuffix('_bias')}_exps.{suffix}"]
            assert read_part(part) == np.ascontiguousarray(t.data[e]).tobytes()
            want = gguf.quants.dequantize(t.data, t.tensor_type)[e]
            got = gguf.quants.dequantize(np.frombuffer(read_part(part), np.uint8).reshape(t.data[e].shape)
                                         if t.data.dtype == np.uint8 else np.frombuffer(read_part(part), t.data.dtype)
                                         .reshape(t.data[e].shape), t.tensor_type)
            np.testing.assert_array_equal(got, want)
            assert got.shape == part.shape
            quant_types.add(part.dtype)
    assert len(quant_types - {"F32"}) >= 3


def test_split_gguf_spans_parts(tmp_path):
    first = write_tiny_gguf(tmp_path / "m.gguf", "qwen3moe", split_max_tensors=12)
    layout = read_layout(first)
    assert len(layout.files) > 1
    assert {p.file for s in layout.slices.values() for p in s.parts} | {t.file for t in layout.resident} == set(layout.files)
    single = read_layout(write_tiny_gguf(tmp_path / "one.gguf", "qwen3moe"))
    assert single.expert_bytes == layout.expert_bytes and single.resident_bytes == layout.resident_bytes


def test_sharded_safetensors_with_index(tmp_path):
    folder = save_tiny("qwen3_moe", tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    layout = read_layout(tmp_path / "sharded")
    assert len(layout.files) > 2
    assert layout.expert_bytes == read_layout(folder).expert_bytes
    for (layer, e), s in layout.slices.items():
        gate = decode(s.part("gate"))
        assert torch.equal(gate, model.model.layers[layer].mlp.experts.gate_up_proj[e][:16])


def test_a_speculator_beside_the_weights_is_not_part_of_the_model(tmp_path):
    from safetensors.torch import save_file

    folder = save_tiny("qwen3_moe", tmp_path / "m")
    before = read_layout(folder)
    save_file({"layers.1.ahead.1.weight": torch.zeros(8, 32)}, str(folder / "speculator.safetensors"))
    after = read_layout(folder)
    assert after.files == before.files and len(after.files) == 1
    assert [t.name for t in after.resident] == [t.name for t in before.resident]


def test_qwen3_30b_geometry_matches_reference_arithmetic(tmp_path):
    """REFERENCE.md: 9.44 MB bf16 slices, 57.98 GB of experts, 3.08 GB resident; Q4_K_M slices 2.65 / 3.06 MB."""
    info = describe(read_layout(write_sparse_safetensors(tmp_path / "q30").parent))
    assert info["slice_bytes"] == 3 * 2048 * 768 * 2 == 9_437_184
    assert info["num_slices"] == 6144 and info["expert_bytes"] == 6144 * 9_437_184
    assert round(info["resident_bytes"] / 1e9, 2) == 3.08
    assert info["resident_breakdown"]["attention"] == 48 * 18_874_368 * 2
    g = describe(read_layout(write_sparse_gguf(tmp_path / "q30.gguf")))
    assert g["slice_bytes_by_type"] == {"Q4_K+Q6_K": 3_059_712, "Q4_K": 2_654_208}
    assert round(g["expert_bytes"] / 1e9, 2) == 17.55
    plan = describe(read_layout(tmp_path / "q30.gguf"), max_memory=8 * 10**9)["plan"]
    # a quantized GGUF runs in the compact tier by default: int4 gate/up and int8 down (Q6_K) with bf16 scales,
    # whole 4 KiB blocks a slot (1.16x the stored 3,059,712 bytes); resident linears packed, embedding as stored
    assert plan["fits"] and plan["slice_bytes"] == 3_543_040
    assert plan["resident_bytes"] <= 1.3 * g["resident_bytes"]
    assert plan["cache_slices"] == (plan["cache_bytes"] - plan["staging_bytes"]) // plan["slice_bytes"]


def resident_pages(path) -> int:
    """Pages of `path` in the page cache (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0
        libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
        return sum(v & 1 for v in vec)
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["safetensors", "gguf"])
def test_building_a_layout_reads_no_expert_data(tmp_path, kind):
    """A Qwen3-30B-A3B-sized file (sparse, 18-61 GB): reading it would fill the page cache with its (zero) pages;
    after read_layout only the header and the kernel's readahead are there, not the tens of GB of experts."""
    if kind == "safetensors":
        path = write_sparse_safetensors(tmp_path / "q30")
    else:
        path = write_sparse_gguf(tmp_path / "q30.gguf")
    drop_page_cache(path)
    if resident_pages(path) != 0:
        pytest.skip("posix_fadvise(DONTNEED) does not drop pages on this filesystem")
    layout = read_layout(path.parent if kind == "safetensors" else path)
    first_expert = min(p.offset for s in layout.slices.values() for p in s.parts)
    touched = resident_pages(path) * mmap.PAGESIZE
    assert layout.expert_bytes > 17e9
    assert touched <= first_expert + 32 * 2**20, f"{touched} bytes of {path} read while building the layout"


def test_inspect_json_keys(tmp_path):
    from typer.testing import CliRunner

    from expertpager.cli import app

    folder = save_tiny("deepseek_v3", tmp_path / "m")
    result = CliRunner().invoke(app, ["inspect", str(folder), "--json", "--max-memory", "2GiB"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    for key in ("architecture", "num_layers", "num_moe_layers", "num_experts", "experts_per_token", "slice_bytes",
                "expert_bytes", "resident_bytes", "total_bytes"):
        assert key in info
    assert info["num_moe_layers"] == 2 and info["dense_layers"] == [0]
    assert info["resident_breakdown"]["shared_expert"] > 0 and info["resident_breakdown"]["dense_mlp"] > 0
    assert info["plan"]["cache_slices"] == info["num_slices"]
    text = CliRunner().invoke(app, ["inspect", str(folder), "--max-memory", "600MB"])
    assert text.exit_code == 0 and "does not fit" in text.output


def test_gpt_oss_mxfp4_release_layout(tmp_path):
    """gpt-oss as released: fused, transposed gate_up with biases, MXFP4 `_blocks` (16 bytes per 32 weights) and
    `_scales` (one byte per 32 weights) per expert, stacked over experts."""
    from safetensors.torch import save_file

    from tiny_models import tiny_config

    E, H, I = 4, 64, 32
    config = tiny_config("gpt_oss", hidden_size=H, intermediate_size=I)
    config.save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(0)
    u8 = lambda *s: torch.randint(0, 255, s, dtype=torch.uint8, generator=g)  # noqa: E731
    tensors = {"model.embed_tokens.weight": torch.zeros(96, H, dtype=torch.bfloat16),
               "lm_head.weight": torch.zeros(96, H, dtype=torch.bfloat16)}
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}.mlp."
        tensors.update({
            p + "router.weight": torch.zeros(E, H, dtype=torch.bfloat16),
            p + "experts.gate_up_proj_blocks": u8(E, 2 * I, H // 32, 16), p + "experts.gate_up_proj_scales": u8(E, 2 * I, H // 32),
            p + "experts.gate_up_proj_bias": torch.zeros(E, 2 * I, dtype=torch.bfloat16),
            p + "experts.down_proj_blocks": u8(E, H, I // 32, 16), p + "experts.down_proj_scales": u8(E, H, I // 32),
            p + "experts.down_proj_bias": torch.zeros(E, H, dtype=torch.bfloat16)})
    save_file(tensors, tmp_path / "model.safetensors")
    layout = read_layout(tmp_path)
    s = layout.slices[(1, 2)]
    roles = {p.role: p for p in s.parts}
    assert set(roles) == {"gate_up_blocks", "gate_up_scales", "gate_up_bias", "down_blocks", "down_scales", "down_bias"}
    assert roles["gate_up_blocks"].shape == (2 * I, H // 32, 16) and roles["down_scales"].length == H * I // 32
    assert s.nbytes == (2 * I * H + H * I) * 17 // 32 + (2 * I + H) * 2
    blocks = tensors["model.layers.1.mlp.experts.gate_up_proj_blocks"][2]
    assert read_part(roles["gate_up_blocks"]) == blocks.numpy().tobytes()
