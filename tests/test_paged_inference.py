"""Paged inference is bit-identical to the unmodified transformers model, for every architecture and budget."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from expertpager.errors import ExpertPagerError
from expertpager.runtime.decode_attention import kv_cache
from expertpager.runtime.generate import generate
from expertpager.runtime.load import load, min_cache_bytes
from tiny_models import CONFIGS, release_layout, save_tiny

STEPS = 20


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    out = {mt: save_tiny(mt, root / mt) for mt in CONFIGS}
    out["qwen3_moe-bf16"] = save_tiny("qwen3_moe", root / "qwen3_moe-bf16", dtype=torch.bfloat16)
    out["gpt_oss-bf16"] = save_tiny("gpt_oss", root / "gpt_oss-bf16", dtype=torch.bfloat16)
    bf16 = save_tiny("qwen3_5_moe", root / "qwen3_5_moe-bf16", dtype=torch.bfloat16)
    out["qwen3_5_moe-released-bf16"] = release_layout(bf16, root / "qwen3_5_moe-released-bf16")
    return out


@torch.inference_mode()
def logits_trace(model, prompt: list[int], steps: int = STEPS) -> list[torch.Tensor]:
    """Prefill logits, then the logits of `steps` greedy decode steps with a KV cache (the one generate uses)."""
    cache = kv_cache(model)
    ids = torch.tensor([prompt])
    out = []
    for _ in range(steps + 1):
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits
        out.append(logits)
        ids = logits[:, -1:].argmax(-1)
    return out


def min_cache(model_folder, expert_cache: str = "dequantized", dtype: str = "auto") -> int:
    from expertpager.model.read_layout import read_layout

    return min_cache_bytes(read_layout(model_folder), expert_cache, dtype)


def assert_same(reference: list[torch.Tensor], paged: list[torch.Tensor], what: str) -> None:
    assert len(reference) == len(paged)
    for step, (a, b) in enumerate(zip(reference, paged)):
        assert torch.equal(a, b), f"{what}: logits differ at step {step} (max {(a.float() - b.float()).abs().max()})"


PROMPT = [5, 17, 33, 2 + 40, 8, 61, 9, 12, 77, 3, 50, 21]


@pytest.mark.parametrize("arch", sorted(CONFIGS) + ["qwen3_moe-bf16", "gpt_oss-bf16", "qwen3_5_moe-released-bf16"])
def test_paged_logits_equal_resident(folders, arch):
    folder = folders[arch]
    reference = logits_trace(AutoModelForCausalLM.from_pretrained(folder), PROMPT)
    smallest = min_cache(folder)
    settings = [(smallest, policy, prefetch) for policy in ("lru", "lfu", "cycle") for prefetch in (True, False)]
    settings += [("50%", "lru", True), ("100%", "lru", False), (None, "cycle", True)]
    for cache, policy, prefetch in settings:
        model = load(folder, cache=cache, policy=policy, prefetch=prefetch)
        assert_same(reference, logits_trace(model, PROMPT), f"{arch} cache={cache} {policy} prefetch={prefetch}")
        stats = model.pager.stats_snapshot()
        assert stats.misses > 0 and model.pager.pool_bytes <= (model.memory_plan.cache_bytes)
        if cache == smallest:
            assert model.pager.num_slots == model.layout.experts_per_token
            assert stats.evictions > 0
        model.pager.close()


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "gpt_oss", "mixtral", "qwen3_next"])
def test_batch_with_padding_and_hf_generate(folders, arch):
    folder = folders[arch]
    reference = AutoModelForCausalLM.from_pretrained(folder)
    paged = load(folder, cache=min_cache(folder) * 2, policy="lru")
    ids = torch.tensor([[0, 0, 0, 5, 9, 14, 22], [7, 8, 9, 10, 11, 12, 13]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    with torch.inference_mode():
        assert torch.equal(reference(input_ids=ids, attention_mask=mask).logits, paged(input_ids=ids, attention_mask=mask).logits)
        kwargs = dict(attention_mask=mask, max_new_tokens=STEPS, do_sample=False, pad_token_id=0)
        assert torch.equal(reference.generate(ids, **kwargs), paged.generate(ids, **kwargs))


@pytest.mark.parametrize("chunk", [None, 3])
def test_generate_loop_matches_transformers_generate(folders, monkeypatch, chunk):
    """Our token loop gives transformers' greedy tokens; with `chunk`, a prompt longer than a prefill chunk goes in
    chunks through one KV cache and still does."""
    import expertpager.runtime.generate as gen

    if chunk is not None:
        monkeypatch.setattr(gen, "PREFILL_CHUNK", chunk)
        assert len(PROMPT) > 2 * chunk
    folder = folders["qwen3_moe"]
    reference = AutoModelForCausalLM.from_pretrained(folder)
    paged = load(folder, cache="25%")
    ours = generate(paged, PROMPT, STEPS).tokens
    theirs = reference.generate(torch.tensor([PROMPT]), max_new_tokens=STEPS, do_sample=False, eos_token_id=None)
    assert ours == theirs[0, len(PROMPT):].tolist()
    assert ours == generate(reference, PROMPT, STEPS).tokens


def test_budget_errors(folders):
    folder = folders["qwen3_moe"]
    with pytest.raises(ExpertPagerError, match="too small: at least"):
        load(folder, cache=min_cache(folder) - 1)
    with pytest.raises(ExpertPagerError, match="max_memory is too small"):
        load(folder, max_memory="100MB")
    with pytest.raises(ExpertPagerError, match="either"):
        load(folder, max_memory="8GB", cache="10%")
    with pytest.raises(ExpertPagerError, match="cache size"):
        load(folder, cache="ten%")


def test_expert_tensors_are_not_loaded_as_parameters(folders):
    model = load(folders["deepseek_v3"], cache="25%")
    names = [n for n, _ in model.named_parameters()]
    assert not any(".experts." in n for n in names)
    assert any("shared_experts" in n for n in names) and any("mlp.gate." in n for n in names)
    assert sum(p.numel() * p.element_size() for p in model.state_dict().values()) == model.layout.resident_bytes
