"""Property: for any small config of every supported architecture, paged experts give exactly what unmodified
transformers gives (the experts module's output and the logits), at every cache size and in float32 and bfloat16.

Sizes follow what transformers' own grouped_mm path accepts on CPU: rows of 16 bytes, so hidden and expert widths
are multiples of 4 (float32) or 8 (bfloat16); other widths make transformers' resident model itself fail."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, DynamicCache

from expertpager.runtime.load import load
from test_paged_inference import min_cache
from tiny_models import CONFIGS, save_tiny

ARCHS = sorted(CONFIGS)


@st.composite
def shapes(draw):
    arch = draw(st.sampled_from(ARCHS))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    step = 4 if dtype == torch.float32 else 8
    width = st.integers(1, 12).map(lambda n: n * step)
    experts = draw(st.integers(2, 12))
    top_k = draw(st.integers(1, min(4, experts)))
    hidden, inner = draw(width), draw(width)
    over = dict(hidden_size=hidden, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2)
    if arch in ("mixtral", "gpt_oss", "granitemoe"):
        over.update(intermediate_size=inner, num_local_experts=experts, num_experts_per_tok=top_k)
    elif arch.startswith("deepseek"):
        groups = 2 if arch == "deepseek_v3" and experts % 2 == 0 and experts >= 4 and top_k <= experts // 2 else 1
        over.update(moe_intermediate_size=inner, n_routed_experts=experts, num_experts_per_tok=top_k, n_group=groups,
                    topk_group=1, num_key_value_heads=2, first_k_dense_replace=draw(st.integers(0, 1)))
    else:
        over.update(moe_intermediate_size=inner, num_experts=experts, num_experts_per_tok=top_k)
    if arch in ("qwen2_moe", "qwen3_5_moe", "qwen3_next"):
        over.update(shared_expert_intermediate_size=draw(width))
    if arch == "qwen2_moe":
        over.update(mlp_only_layers=[])
    if arch in ("qwen3_5_moe", "qwen3_next"):  # a Gated DeltaNet layer, then full attention
        over.update(layer_types=["linear_attention", "full_attention"])
    if arch == "gpt_oss":
        over.update(layer_types=["sliding_attention", "full_attention"])
    return arch, dtype, over, draw(st.integers(1, 40)), draw(st.floats(0, 1)), draw(st.integers(0, 2**16))


def experts_io(model) -> list:
    """Hooks that record every experts module's output, in call order."""
    outputs = []
    for name, module in model.named_modules():
        if name.endswith("experts") and "shared" not in name:
            module.register_forward_hook(lambda _m, _a, out: outputs.append(out.clone()))
    return outputs


@torch.inference_mode()
def run(model, prompt: list[int], steps: int = 2) -> list[torch.Tensor]:
    cache = DynamicCache(config=model.config)
    ids, out = torch.tensor([prompt]), []
    for _ in range(steps + 1):
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits
        out.append(logits)
        ids = logits[:, -1:].argmax(-1)
    return out


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=shapes())
def test_paged_equals_transformers_for_any_shape(tmp_path_factory, case):
    arch, dtype, over, tokens, fraction, seed = case
    folder = save_tiny(arch, tmp_path_factory.mktemp("shape") / arch, dtype=dtype, seed=seed, **over)
    prompt = torch.randint(3, 96, (tokens,), generator=torch.Generator().manual_seed(seed)).tolist()
    reference = AutoModelForCausalLM.from_pretrained(folder)
    expected_experts = experts_io(reference)
    expected = run(reference, prompt)
    smallest = min_cache(folder)
    paged = load(folder, cache=None if fraction > 0.9 else smallest + int(fraction * smallest * 4))
    got_experts = experts_io(paged)
    got = run(paged, prompt)
    paged.pager.close()
    what = f"{arch} {dtype} {over} tokens={tokens} fraction={fraction:.2f}"
    assert len(expected_experts) == len(got_experts)
    for i, (a, b) in enumerate(zip(expected_experts, got_experts)):
        assert torch.equal(a, b), f"{what}: experts call {i} differs by {(a.float() - b.float()).abs().max()}"
    for step, (a, b) in enumerate(zip(expected, got)):
        assert torch.equal(a, b), f"{what}: logits differ at step {step}"
