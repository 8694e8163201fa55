"""LoRA adapters on a paged model equal peft's own forward on the same base model, with expert LoRA paged as pieces
through the same SliceCache (loaded only for routed experts), chosen per call."""

import inspect
import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, DynamicCache
from typer.testing import CliRunner

from expertpager.cli import app
from expertpager.errors import ExpertPagerError
from expertpager.runtime.adapter_store import adapter_pieces
from expertpager.runtime.load import load, min_cache_bytes
from tiny_adapters import save_peft_adapter, save_per_expert_adapter
from tiny_models import save_tiny

PROMPT = [5, 17, 33, 42, 8, 61, 9, 12, 77, 3, 50, 21]
STEPS = 4


@pytest.fixture(autouse=True)
def store(tmp_path, monkeypatch):
    """Each test writes adapter piece stores in its own folder."""
    monkeypatch.setenv("EXPERTPAGER_CACHE", str(tmp_path / "store"))
    return tmp_path / "store" / "adapters"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("adapters")


@torch.inference_mode()
def logits_trace(model, steps: int = STEPS) -> list[torch.Tensor]:
    """Prefill logits, then `steps` greedy decode steps with a KV cache (a PeftModel passes the cache through)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    cache, ids, out = DynamicCache(config=base.config), torch.tensor([PROMPT]), []
    for _ in range(steps + 1):
        logits = model(input_ids=ids, use_cache=True, **{arg: cache}).logits
        out.append(logits)
        ids = logits[:, -1:].argmax(-1)
    return out


def peft_trace(folder, adapter) -> list[torch.Tensor]:
    return logits_trace(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), str(adapter)).eval())


def assert_same(want, got, what):
    for step, (a, b) in enumerate(zip(want, got, strict=True)):
        assert torch.equal(a, b), f"{what}: logits differ at step {step} (max {(a.float() - b.float()).abs().max()})"


@pytest.mark.parametrize("arch,dtype", [("qwen3_moe", torch.float32), ("qwen3_moe", torch.bfloat16),
                                        ("gpt_oss", torch.float32), ("mixtral", torch.bfloat16)])
def test_target_parameters_adapter_equals_peft(root, arch, dtype):
    folder = save_tiny(arch, root / f"{arch}-{dtype}", dtype=dtype)
    adapter = save_peft_adapter(folder, root / f"lora-{arch}-{dtype}")
    want = peft_trace(folder, adapter)
    base = logits_trace(AutoModelForCausalLM.from_pretrained(folder))
    assert not torch.equal(want[0], base[0])  # the adapter changes the output
    for cache in ("min", "50%"):
        if cache == "min":
            probe = load(folder, adapters={"a": adapter})
            cache = min_cache_bytes(probe.layout, pieces=probe.adapters.pieces)
            probe.pager.close()
            with pytest.raises(ExpertPagerError, match="and their adapter pieces"):
                load(folder, cache=cache - 1, adapters={"a": adapter})
        model = load(folder, cache=cache, adapters={"a": adapter}, adapter="a")
        if isinstance(cache, int):
            assert model.pager.num_slots == 2 * model.layout.experts_per_token
        assert_same(want, logits_trace(model), f"{arch} {dtype} cache={cache}")
        stats = model.pager.stats_snapshot()
        assert stats.adapters.misses > 0 and stats.adapters.bytes_read > 0
        if isinstance(cache, int):
            assert stats.evictions > 0 and stats.adapters.evictions > 0
        if cache == "50%":
            with model.adapters.use(None):  # the same model without the adapter is the base model
                assert_same(base, logits_trace(model), f"{arch} {dtype} cache={cache} no adapter")
        model.pager.close()


def test_pieces_load_only_for_routed_experts(root):
    folder = save_tiny("qwen3_moe", root / "routed")
    adapter = save_peft_adapter(folder, root / "lora-routed")
    model = load(folder, adapters={"a": adapter}, adapter="a", prefetch=False)  # every piece fits: nothing evicted
    with torch.inference_mode():
        model(input_ids=torch.tensor([[5, 9]]))
    resident = model.pager.resident()
    slices = {k for k in resident if len(k) == 2}
    pieces = {k[:2] for k in resident if len(k) == 3}
    assert pieces == slices and len(pieces) < len(model.adapters.pieces)
    stats = model.pager.stats_snapshot()
    assert stats.adapters.misses == len(pieces) and stats.misses == len(slices)
    model.pager.close()


def test_adapters_chosen_per_call(root):
    folder = save_tiny("qwen3_moe", root / "choose")
    a = save_peft_adapter(folder, root / "lora-a", seed=1)
    b = save_peft_adapter(folder, root / "lora-b", seed=2, r=8, lora_alpha=4, use_rslora=True,
                          target_modules=("q_proj", "o_proj"), target_parameters=["mlp.experts.down_proj"],
                          alpha_pattern={"o_proj": 32}, rank_pattern={"o_proj": 2})
    model = load(folder, cache="40%", adapters={"a": a, "b": b})
    assert model.adapters.active is None and model.adapters.names == ["a", "b"]
    for name, path in (("b", b), ("a", a), ("b", b)):  # switching back and forth, pieces of both in one cache
        with model.adapters.use(name):
            assert_same(peft_trace(folder, path), logits_trace(model), f"adapter {name}")
    assert_same(logits_trace(AutoModelForCausalLM.from_pretrained(folder)), logits_trace(model), "none")
    with pytest.raises(ExpertPagerError, match="no adapter named 'c'"):
        model.adapters.select("c")
    model.pager.close()


@pytest.mark.parametrize("arch,block,names", [("qwen3_moe", "mlp", ("gate_proj", "up_proj", "down_proj")),
                                              ("mixtral", "block_sparse_moe", ("w1", "w3", "w2"))])
@pytest.mark.parametrize("rslora", [False, True])
def test_per_expert_adapter_equals_peft(root, arch, block, names, rslora):
    folder = save_tiny(arch, root / f"old-{arch}")
    adapter = save_per_expert_adapter(folder, root / f"old-lora-{arch}-{rslora}", block, names, use_rslora=rslora)
    model = load(folder, cache="50%", adapters={"old": adapter}, adapter="old")
    assert_same(peft_trace(folder, adapter), logits_trace(model), f"{arch} per-expert rslora={rslora}")
    model.pager.close()


def test_piece_store_written_once_atomically(root, store):
    folder = save_tiny("qwen3_moe", root / "store-model")
    adapter = save_peft_adapter(folder, root / "lora-store")
    model = load(folder, adapters={"a": adapter})
    files = list(store.iterdir())
    assert len(files) == 1 and not files[0].name.startswith(".")
    stamp = files[0].stat().st_mtime_ns
    again = adapter_pieces(model.adapters.infos["a"], 8, {l: False for l in range(3)}, torch.float32)
    assert again == model.adapters.pieces and files[0].stat().st_mtime_ns == stamp
    model.pager.close()


def test_bad_adapters(root, tmp_path):
    folder = save_tiny("qwen3_moe", root / "bad-model")
    good = save_peft_adapter(folder, root / "lora-good")
    with pytest.raises(ExpertPagerError, match="no such adapter folder"):
        load(folder, adapters={"x": tmp_path / "missing"})
    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads((good / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ExpertPagerError, match="DoRA is not supported"):
        load(folder, adapters={"x": dora})
    (dora / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ExpertPagerError, match="not a LoRA adapter"):
        load(folder, adapters={"x": dora})
    other = save_tiny("qwen3_moe", root / "wider", moe_intermediate_size=24)
    with pytest.raises(ExpertPagerError, match="do not fit"):  # resident LoRA: checked at load
        load(save_tiny("qwen3_moe", root / "wider-attn", hidden_size=64), adapters={"a": good})
    model = load(other, adapters={"a": good}, adapter="a")
    with pytest.raises(ExpertPagerError, match="adapter 'a': its LoRA on layer 0's (gate_up|down) does not fit"):
        model(input_ids=torch.tensor([[5, 9]]))  # expert LoRA: checked at its first merge
    model.pager.close()
    with pytest.raises(ExpertPagerError, match="compact expert cache"):
        load(folder, quantize="int4", adapters={"a": good})


def test_cli_compare_with_adapter(root):
    folder = save_tiny("qwen3_moe", root / "cli")
    a = save_peft_adapter(folder, root / "lora-cli")
    run = ["run", str(folder), "--prompt-ids", "5,6,7,8", "-n", "6", "--cache", "30%", "--adapter", f"code={a}"]
    out = CliRunner().invoke(app, [*run, "--compare", "--json"])  # resident: peft's own model with the adapter
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["identical"] and result["paged"]["stats"]["adapter"] == "code"
    assert result["paged"]["stats"]["adapter_bytes_read"] > 0
    base = CliRunner().invoke(app, [*run, "--use-adapter", "none", "--json"])
    assert json.loads(base.stdout)["tokens"] != result["paged"]["tokens"]
    bad = subprocess.run([sys.executable, "-m", "expertpager", *run, "--use-adapter", "prose"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no such adapter" in bad.stderr and "Traceback" not in bad.stderr


def test_demo_adapters_equal_peft():
    from expertpager.model.demo import demo_model_path

    folder = demo_model_path()
    ids = torch.tensor([PROMPT])
    paths = {d: folder / "adapters" / d for d in ("code", "prose")}
    model = load(folder, cache="25%", adapters=paths)
    for name, path in paths.items():
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), str(path)).eval()
        with torch.inference_mode(), model.adapters.use(name):
            assert torch.equal(peft_model(input_ids=ids).logits, model(input_ids=ids).logits), name
    model.pager.close()
