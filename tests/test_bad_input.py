"""Bad input gets one clear ExpertPagerError naming the file; the CLI prints one line and exits 2."""

import json
import shutil
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM

from expertpager.errors import ExpertPagerError
from expertpager.model.read_layout import read_layout
from expertpager.sizes import parse_size
from tiny_gguf import write_tiny_gguf
from tiny_models import save_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny("qwen3_moe", tmp_path_factory.mktemp("m") / "qwen3_moe")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("g") / "m.gguf", "qwen3moe")


def copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def expect_error(ref, *words):
    with pytest.raises(ExpertPagerError) as info:
        read_layout(ref)
    for w in words:
        assert w in str(info.value), str(info.value)
    return str(info.value)


def test_missing_path(tmp_path):
    expect_error(tmp_path / "nope", "nope", "no such file")


def test_truncated_safetensors(tiny, tmp_path):
    folder = copy(tiny, tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    expect_error(folder, "model.safetensors", "truncated")
    path.write_bytes(b"\x01\x02")
    expect_error(folder, "model.safetensors", "not a safetensors file")


def test_offsets_past_end_and_overlap(tiny, tmp_path):
    folder = copy(tiny, tmp_path)
    path = folder / "model.safetensors"
    original = path.read_bytes()

    def past_end(h):
        name = next(k for k in h if k != "__metadata__")
        h[name]["data_offsets"] = [10**9, 10**9 + h[name]["data_offsets"][1] - h[name]["data_offsets"][0]]

    rewrite_header(path, past_end)
    expect_error(folder, "model.safetensors", "past the end")
    path.write_bytes(original)

    def overlap(h):
        a, b = [k for k in h if k != "__metadata__"][:2]
        h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + h[b]["data_offsets"][1] - h[b]["data_offsets"][0]]

    rewrite_header(path, overlap)
    expect_error(folder, "model.safetensors", "overlap")


def test_shape_disagrees_with_offsets(tiny, tmp_path):
    folder = copy(tiny, tmp_path)
    rewrite_header(folder / "model.safetensors", lambda h: h["lm_head.weight"].update(shape=[1, 2]))
    expect_error(folder, "lm_head.weight", "disagree")


def test_non_moe_model(tmp_path):
    config = AutoConfig.for_model("qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "dense")
    expect_error(tmp_path / "dense", "not a mixture-of-experts")


def test_unknown_architecture(tiny, tmp_path):
    folder = copy(tiny, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "frobnicate_moe"}))
    expect_error(folder, "unknown architecture", "frobnicate_moe")


def test_index_names_missing_shard(tiny, tmp_path):
    folder = copy(tiny, tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    expect_error(folder, "model-00002-of-00002.safetensors", "does not exist")


def test_truncated_gguf_and_non_moe_gguf(tiny_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    expect_error(cut, "cut.gguf")
    cut.write_bytes(b"GGUF" + b"\x00" * 10)
    expect_error(cut, "cut.gguf", "not a valid GGUF")
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(tmp_path / "dense.gguf"), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    expect_error(tmp_path / "dense.gguf", "not a mixture-of-experts")


def test_repo_not_in_cache(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "expertpager", "inspect", "someorg/some-moe"], capture_output=True, text=True, env=env)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "hf download someorg/some-moe" in out.stderr and str(tmp_path / "hub") in out.stderr


def make_hf_cache(hub, repo: str, source_files) -> None:
    """The real cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    base = hub / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in source_files:
        shutil.copy(f, snap / f.name)


def test_repo_ids_resolve_from_local_cache(tiny, tiny_gguf, tmp_path):
    hub = tmp_path / "hub"
    make_hf_cache(hub, "acme/tiny-moe", list(tiny.iterdir()))
    q4 = tmp_path / "tiny-Q4_0.gguf"
    shutil.copy(tiny_gguf, q4)
    q8 = write_tiny_gguf(tmp_path / "tiny-Q8_0.gguf", "qwen3moe", quants=("Q8_0",))
    make_hf_cache(hub, "acme/tiny-moe-GGUF", [q4, q8])
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}

    def inspect(ref):
        out = subprocess.run([sys.executable, "-m", "expertpager", "inspect", ref, "--json"], capture_output=True, text=True, env=env)
        return out.returncode, (json.loads(out.stdout) if out.returncode == 0 else out.stderr)

    code, info = inspect("acme/tiny-moe")
    assert code == 0 and info["architecture"] == "qwen3_moe"
    code, info = inspect("acme/tiny-moe-GGUF:Q8_0")
    assert code == 0 and info["path"].endswith("tiny-Q8_0.gguf") and set(info["slice_bytes_by_type"]) == {"Q8_0"}
    code, err = inspect("acme/tiny-moe-GGUF")
    assert code == 2 and "add :QUANT" in err
    code, err = inspect("acme/tiny-moe@nonexistent")
    assert code == 2 and "not in the local Hugging Face cache" in err


def test_cli_errors_are_one_line(tiny, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nonsense")
    out = subprocess.run([sys.executable, "-m", "expertpager", "inspect", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and str(bad) in out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1
    out = subprocess.run([sys.executable, "-m", "expertpager", "inspect", str(tiny), "--max-memory", "lots"], capture_output=True, text=True)
    assert out.returncode == 2 and "lots" in out.stderr


@pytest.mark.parametrize("text,value", [("8GB", 8 * 10**9), ("8GiB", 8 * 2**30), ("512MB", 512 * 10**6), ("1234", 1234),
                                        ("1.5 GiB", 3 * 2**29), ("2g", 2 * 2**30)])
def test_sizes(text, value):
    assert parse_size(text) == value


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_header_corruption_gives_only_our_error(tiny, tiny_gguf, tmp_path, data):
    kind = data.draw(st.sampled_from(["safetensors", "gguf"]))
    source = tiny / "model.safetensors" if kind == "safetensors" else tiny_gguf
    raw = bytearray(source.read_bytes())
    header_end = 8 + struct.unpack("<Q", raw[:8])[0] if kind == "safetensors" else 4096
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, min(header_end, len(raw)) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    folder = tmp_path / f"case-{kind}"
    folder.mkdir(exist_ok=True)
    if kind == "safetensors":
        shutil.copy(tiny / "config.json", folder / "config.json")
        target = folder / "model.safetensors"
    else:
        target = folder / "m.gguf"
    target.write_bytes(bytes(raw))
    try:
        read_layout(folder if kind == "safetensors" else target)
    except ExpertPagerError as e:
        assert str(target.name) in str(e) or str(folder) in str(e)
