"""Repacked checkpoints: one aligned read per slice, identical logits, corrupt slices detected and never used."""

import json
import os

import pytest

from expertpager.errors import ExpertPagerError
from expertpager.model.read_layout import read_layout
from expertpager.pager import SliceCache, checksum_verifier, plan_reads
from expertpager.runtime.load import load
from expertpager.runtime.paged_experts import slice_tensors
from expertpager.tools.export_gguf import export_gguf
from expertpager.tools.repack import repack
from test_paged_inference import PROMPT, assert_same, logits_trace, min_cache
from tiny_gguf import write_tiny_gguf
from tiny_models import save_tiny

STEPS = 6


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    hf = save_tiny("qwen3_moe", root / "hf")
    return {"safetensors": hf, "gguf": export_gguf(hf, root / "qwen3.gguf", "q8_0", progress=False),
            "quantized-gguf": write_tiny_gguf(root / "llama.gguf", "llama")}


@pytest.mark.parametrize("source,files", [("safetensors", "single"), ("gguf", "per-layer"), ("quantized-gguf", "per-slice")])
def test_repacked_runs_identically_with_one_read_per_miss(sources, tmp_path, source, files):
    out = repack(sources[source], tmp_path / "out", files, progress=False)
    layout = read_layout(out)
    assert layout.format == "repacked" and len(layout.checksums) == len(layout.slices)
    for s in layout.slices.values():
        plan = plan_reads(s)
        assert len(plan.runs) == 1 and plan.runs[0].start % 4096 == 0 and plan.runs[0].length == -(-s.nbytes // 4096) * 4096
        assert [p.role for p in s.parts][:2] == ["gate", "up"]
    expected = logits_trace(load(sources[source]), PROMPT, STEPS)
    model = load(out, cache=min_cache(out))
    assert_same(expected, logits_trace(model, PROMPT, STEPS), f"repacked {source} ({files})")
    assert model.pager.stats_snapshot().load_errors == 0
    assert not list(tmp_path.glob(".*partial"))


def test_gate_up_is_one_view(sources, tmp_path):
    import torch

    layout = read_layout(repack(sources["safetensors"], tmp_path / "out", progress=False))
    with SliceCache(layout.slices, 10**7) as cache, cache.pin((0, 0)) as buf:
        w = slice_tensors(layout.slices[(0, 0)], buf.views, torch.float32)
        assert w["gate_up"].data_ptr() == buf.views["gate"].ctypes.data


def test_corrupt_slice_is_detected_named_and_never_used(sources, tmp_path):
    out = repack(sources["safetensors"], tmp_path / "out", progress=False)
    layout = read_layout(out)
    target = layout.slices[(1, 3)]
    with open(target.parts[0].file, "r+b") as f:
        f.seek(target.parts[0].offset + 5)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    with SliceCache(layout.slices, 10**7, verify=checksum_verifier(layout.slices, layout.checksums)) as cache:
        with cache.pin((1, 2)):
            pass
        with pytest.raises(ExpertPagerError, match=r"experts.bin: expert slice \(1, 3\) .* is corrupt"):
            cache.pin((1, 3))
        assert (1, 3) not in cache.resident()
        with pytest.raises(ExpertPagerError, match="corrupt"):
            cache.pin((1, 3))
    model = load(out)
    with pytest.raises(ExpertPagerError, match=r"expert slice \(1, 3\)"):
        for i in range(64):  # some prompt routes to expert 3 of layer 1
            model(input_ids=__import__("torch").tensor([[i % 90, (7 * i) % 90, (13 * i) % 90]]))


def test_manifest_that_disagrees_with_its_files(sources, tmp_path):
    out = repack(sources["gguf"], tmp_path / "out", "per-layer", progress=False)
    manifest = out / "expertpager.json"
    original = manifest.read_text()
    with open(out / "experts-0002.bin", "r+b") as f:
        f.truncate(4096)
    with pytest.raises(ExpertPagerError, match=r"slice \(2, \d\) .* does not fit experts-0002.bin"):
        read_layout(out)
    m = json.loads(original)
    m["slices"][0]["parts"][1]["offset"] += 1
    manifest.write_text(json.dumps(m))
    with pytest.raises(ExpertPagerError, match="not contiguous"):
        read_layout(out)
    manifest.write_text(original.replace('"expertpager-repacked/1"', '"something-else"'))
    with pytest.raises(ExpertPagerError, match="not an expertpager manifest"):
        read_layout(out)
    with pytest.raises(ExpertPagerError, match="already exists"):
        repack(sources["gguf"], out, progress=False)
    with pytest.raises(ExpertPagerError, match="unknown --files"):
        repack(sources["gguf"], tmp_path / "x", "per-tensor", progress=False)


def test_cli_export_and_repack(sources, tmp_path):
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "expertpager", *map(str, args)], capture_output=True, text=True)

    out = cli("export", sources["safetensors"], tmp_path / "m.gguf", "--type", "q4_0")
    assert out.returncode == 0 and (tmp_path / "m.gguf").exists()
    out = cli("repack", tmp_path / "m.gguf", tmp_path / "r", "--files", "per-layer")
    assert out.returncode == 0 and (tmp_path / "r" / "expertpager.json").exists()
    out = cli("repack", tmp_path / "m.gguf", tmp_path / "r")
    assert out.returncode == 2 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1 and "already exists" in out.stderr
    out = cli("export", sources["safetensors"], tmp_path / "x.gguf", "--type", "q2_k")
    assert out.returncode == 2 and "unknown export type 'q2_k'" in out.stderr and not (tmp_path / "x.gguf").exists()


def test_interrupted_export_and_repack_leave_nothing(sources, tmp_path, monkeypatch):
    from expertpager.tools import export_gguf as export_module
    from expertpager.tools import repack as repack_module

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "_encode", interrupted)
    monkeypatch.setattr(repack_module, "slice_digest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(sources["safetensors"], tmp_path / "m.gguf", progress=False)
    with pytest.raises(KeyboardInterrupt):
        repack(sources["gguf"], tmp_path / "r", progress=False)
    assert list(tmp_path.iterdir()) == []
