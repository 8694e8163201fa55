"""`expertpager prune`: a pruned checkpoint computes what the original computes with the removed experts masked out
of routing (router logits -inf before the arch's own softmax/top-k), loads in plain transformers (HF) and in the
project's runtime (GGUF); REAP statistics from the paged runtime match a direct computation; bad arguments fail."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from expertpager.cli import app
from expertpager.errors import ExpertPagerError
from expertpager.model.demo import demo_model_path
from expertpager.model.read_layout import read_layout
from expertpager.runtime.load import load
from expertpager.runtime.moe_layers import moe_layers
from expertpager.tools.prune import write_pruned
from expertpager.tools.prune_scores import collect_stats, expert_scores, kept_experts
from expertpager.tools.routing_stats import expert_counts
from expertpager.tools.trace import record_trace
from tiny_gguf import write_tiny_gguf
from tiny_models import save_tiny

PROMPT = [5, 17, 33, 2, 61, 8, 44, 70, 12, 7, 3, 71, 29, 50, 11, 64, 38, 21]  # ids below every tiny vocab (80)
PROSE = Path(__file__).parent / "data" / "heldout_prose.txt"


def mask_routers(model, removed: dict[int, list[int]]) -> None:
    """Route `model` as if the `removed` experts of each MoE layer did not exist: their router logits are -inf
    before the architecture's own selection (softmax over all experts then top-k, renormalised when the config
    says norm_topk_prob, Mixtral always; gpt-oss: top-k of the logits, then softmax over the k)."""
    for layer in moe_layers(model):
        router, out = layer.router, removed[layer.index]

        def forward(hidden, router=router, out=out):
            logits = F.linear(hidden.reshape(-1, router.weight.shape[1]), router.weight, getattr(router, "bias", None))
            logits[:, out] = float("-inf")
            if model.config.model_type == "gpt_oss":
                top, index = logits.topk(router.top_k, dim=-1)
                return logits, F.softmax(top, dim=1, dtype=top.dtype), index
            top, index = F.softmax(logits.float(), dim=-1).topk(router.top_k, dim=-1)
            if getattr(router, "norm_topk_prob", True):
                top = top / top.sum(dim=-1, keepdim=True)
            return logits, top.to(logits.dtype), index

        router.forward = forward


def random_kept(layout, keep: int, seed: int = 3) -> dict[int, list[int]]:
    scores = expert_scores(None, "random", layout.moe_layers, layout.num_experts, seed)
    return dict(zip(layout.moe_layers, kept_experts(scores, keep)))


def removed_of(kept: dict[int, list[int]], num_experts: int) -> dict[int, list[int]]:
    return {layer: [e for e in range(num_experts) if e not in ks] for layer, ks in kept.items()}


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=torch.tensor([PROMPT])).logits[0]


@pytest.mark.parametrize("arch,overrides", [("qwen3_moe", {}), ("qwen3_moe", {"norm_topk_prob": False}),
                                            ("qwen2_moe", {}), ("mixtral", {}), ("gpt_oss", {})])
def test_pruned_hf_equals_original_with_removed_experts_masked(tmp_path, arch, overrides):
    src = save_tiny(arch, tmp_path / "src", **overrides)
    layout = read_layout(src)
    keep = layout.num_experts - 1 if layout.num_experts <= 4 else 5
    kept = random_kept(layout, keep)
    out = write_pruned(layout, kept, tmp_path / "pruned", {"test": True}, progress=False)

    pruned = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, nothing of ours
    assert pruned.config.num_experts_per_tok == layout.experts_per_token
    assert read_layout(out).num_experts == keep and len(read_layout(out).slices) == keep * len(layout.moe_layers)
    original = AutoModelForCausalLM.from_pretrained(src).eval()
    unmasked = logits(original)
    mask_routers(original, removed_of(kept, layout.num_experts))
    masked = logits(original)
    got = logits(pruned)
    # Not bit-equal in general: a softmax over E logits (some -inf) and over the kept ones sum in another order.
    torch.testing.assert_close(got, masked, rtol=1e-5, atol=1e-5)
    assert (got - unmasked).abs().max() > 1e-3  # the removed experts were in use: pruning changed the output
    assert json.loads((out / "pruning.json").read_text()) == {"test": True}
    assert not list(tmp_path.glob(".*partial"))


def test_reap_statistics_match_a_direct_computation(tmp_path):
    src = save_tiny("qwen3_moe", tmp_path / "m")
    paged = load(src, cache="30%")
    stats = collect_stats(paged, PROMPT)
    assert paged.pager.stats_snapshot().misses > 0  # gathered through the pager, the experts did not all fit
    trace = record_trace(AutoModelForCausalLM.from_pretrained(src).eval(), torch.tensor(PROMPT))
    assert np.array_equal(stats.counts, expert_counts(trace)) and stats.tokens == len(PROMPT)

    resident = AutoModelForCausalLM.from_pretrained(src).eval()
    layers = moe_layers(resident)
    seen = {}
    handles = [l.experts.register_forward_pre_hook(lambda _m, args, i=i: seen.__setitem__(i, args)) for i, l in enumerate(layers)]
    logits_ = logits(resident)
    for h in handles:
        h.remove()
    assert logits_.isfinite().all()
    expected = np.zeros_like(stats.reap_sums)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            hidden, index, weights = seen[i]
            for j in range(index.shape[1]):  # each routed expert alone, weight 1: its own output
                alone = layer.experts(hidden, index[:, j:j + 1], torch.ones_like(weights[:, j:j + 1]))
                np.add.at(expected[i], index[:, j].numpy(), (weights[:, j].double() * alone.double().norm(dim=-1)).numpy())
    np.testing.assert_allclose(stats.reap_sums, expected, rtol=1e-5)
    np.testing.assert_allclose(stats.reap, np.divide(expected, stats.counts, out=np.zeros_like(expected), where=stats.counts > 0), rtol=1e-5)


def test_gguf_prune_loads_in_the_runtime_and_equals_masked(tmp_path):
    src = write_tiny_gguf(tmp_path / "m.gguf", "llama")  # Mixtral, experts in Q4_0, F16, BF16, Q8_0
    layout = read_layout(src)
    kept = random_kept(layout, layout.num_experts - 1)
    out = write_pruned(layout, kept, tmp_path / "pruned.gguf", {"kept": {str(k): v for k, v in kept.items()}}, progress=False)
    pruned = read_layout(out)
    assert pruned.num_experts == layout.num_experts - 1 and pruned.format == "gguf"
    got = logits(load(out, expert_cache="dequantized"))
    original = load(src, expert_cache="dequantized")
    mask_routers(original, removed_of(kept, layout.num_experts))
    torch.testing.assert_close(got, logits(original), rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "pruned.pruning.json").read_text())["kept"]["0"] == kept[0]


def test_cli_prunes_the_demo_model_paged_to_hf_and_gguf(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(PROSE.read_text()[:2000])
    runner = CliRunner()
    args = ["prune", str(demo_model_path()), "--input", str(text), "--keep", "50%", "--cache", "25%", "--json"]
    result = runner.invoke(app, args + ["--out", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["keep"] == 32 and info["calibration_tokens"] > 400
    mapping = json.loads((tmp_path / "hf" / "pruning.json").read_text())
    for row in mapping["layers"]:  # the kept experts are the 32 with the highest REAP scores
        scores = np.array(row["scores"])
        assert len(row["kept"]) == 32 and scores[row["kept"]].min() >= np.delete(scores, row["kept"]).max()
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.num_experts == 32

    result = runner.invoke(app, args + ["--out", str(tmp_path / "p.gguf"), "--type", "bf16"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "p.pruning.json").read_text())["layers"] == mapping["layers"]  # same scores
    paged = load(tmp_path / "p.gguf", cache="25%")
    assert torch.equal(logits(paged), logits(hf))
    assert not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("extra,message", [
    (["--keep", "100%"], "nothing to prune"),
    (["--keep", "64"], "nothing to prune"),
    (["--keep", "7"], "fewer than the 8 the router picks"),
    (["--keep", "lots"], "--keep must be a percentage"),
    (["--keep", "50%", "--method", "best"], "unknown pruning method"),
    (["--keep", "50%", "--input", "/nonexistent/calib.txt"], "/nonexistent/calib.txt: cannot read"),
    (["--keep", "50%"], "--method reap needs calibration text"),
    (["--keep", "50%", "--method", "random", "--per-domain", "/nonexistent/code.json"], "no such profile"),
])
def test_bad_arguments_are_clear_errors(tmp_path, extra, message):
    result = CliRunner().invoke(app, ["prune", str(demo_model_path()), "--out", str(tmp_path / "out"), *extra])
    assert isinstance(result.exception, ExpertPagerError) and message in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_cli_error_is_one_line_exit_2(tmp_path):
    (tmp_path / "out").mkdir()
    proc = subprocess.run([sys.executable, "-m", "expertpager", "prune", str(demo_model_path()), "--keep", "50%",
                           "--method", "random", "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "already exists" in proc.stderr
