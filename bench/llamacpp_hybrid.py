"""llama.cpp's own converter against ours, on tiny Qwen3.5-MoE and Qwen3-Next models (run by hand; needs a llama.cpp
source tree with convert_hf_to_gguf.py and gguf-py, see bench/realgeom.py).

For each model (random weights, built by tests/tiny_models.py with the demo tokenizer's 6,144-token vocabulary; the
Qwen3.5 one in the released layout: multimodal config, fused experts, vision and MTP tensors):
1. llama.cpp's convert_hf_to_gguf.py (`--no-mtp`) writes a GGUF; our runtime loads it and its logits are compared,
   with torch.equal, to transformers' on the HF checkpoint (prefill and greedy decode), fully resident and paged at
   the smallest cache;
2. `expertpager export` writes the same model; every tensor (name, type, bytes) and metadata key is compared with
   llama.cpp's file.
Prints a table and one JSON line.

    PYTHONPATH=src python bench/llamacpp_hybrid.py [--llama-dir DIR] [--dtype float32|bfloat16]
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoModelForCausalLM

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).resolve().parent.parent / "tests")]
from realgeom import DEFAULT_LLAMA_DIR, DEMO_TOKENIZER, convert  # noqa: E402
from test_paged_inference import PROMPT, logits_trace, min_cache  # noqa: E402
from tiny_models import release_layout, save_tiny  # noqa: E402

from expertpager.runtime.load import load  # noqa: E402
from expertpager.tools.export_gguf import export_gguf  # noqa: E402

STEPS = 8


def hf_model(arch: str, root: Path, dtype: torch.dtype) -> Path:
    """A tiny `arch` checkpoint with the demo tokenizer (Qwen3.5 in its released layout)."""
    folder = save_tiny(arch, root / f"{arch}-saved", dtype=dtype, vocab_size=6144)
    if arch == "qwen3_5_moe":
        folder = release_layout(folder, root / arch)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_TOKENIZER / name, folder / name)
    return folder


def tensors_and_metadata(path: Path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(path)
    meta = {k: v.contents() for k, v in r.fields.items() if not k.startswith(("GGUF.", "tokenizer.", "general."))}
    return {t.name: (t.tensor_type.name, np.array(t.data)) for t in r.tensors}, meta


def compare_files(ours: Path, theirs: Path) -> dict:
    to, mo = tensors_and_metadata(ours)
    tt, mt = tensors_and_metadata(theirs)
    differ = sorted(n for n in set(to) & set(tt) if to[n][0] != tt[n][0] or not np.array_equal(to[n][1], tt[n][1]))
    return {"tensors": len(tt), "only_ours": sorted(set(to) - set(tt)), "only_llamacpp": sorted(set(tt) - set(to)),
            "tensors_differ": differ, "metadata_only_ours": sorted(set(mo) - set(mt)),
            "metadata_only_llamacpp": sorted(set(mt) - set(mo)),
            "metadata_differ": sorted(k for k in set(mo) & set(mt) if mo[k] != mt[k])}


def check(arch: str, root: Path, llama_dir: Path, dtype: torch.dtype) -> dict:
    folder = hf_model(arch, root, dtype)
    theirs = convert(folder, root / f"{arch}-llamacpp.gguf", llama_dir, "f32" if dtype == torch.float32 else "bf16",
                     ("--no-mtp",))  # the MTP tensors here are a stand-in, not a whole MTP layer
    reference = AutoModelForCausalLM.from_pretrained(folder)
    for p in reference.parameters():  # weights in memory of their own, as a GGUF's are held
        p.data = p.data.clone()
    expected = logits_trace(reference, PROMPT, STEPS)
    row = {"arch": arch, "dtype": str(dtype).removeprefix("torch.")}
    for name, cache in (("resident", None), ("smallest cache", min_cache(theirs))):
        model = load(theirs, cache=cache)
        got = logits_trace(model, PROMPT, STEPS)
        row[f"llamacpp_file_{name.replace(' ', '_')}_equal"] = all(torch.equal(a, b) for a, b in zip(expected, got))
        row[f"llamacpp_file_{name.replace(' ', '_')}_max_diff"] = max(float((a.float() - b.float()).abs().max())
                                                                     for a, b in zip(expected, got))
        model.pager.close()
    ours = export_gguf(folder, root / f"{arch}-ours.gguf", "f32" if dtype == torch.float32 else "bf16", progress=False)
    row.update(compare_files(ours, theirs))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-dir", type=Path, default=DEFAULT_LLAMA_DIR)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [check(arch, Path(tmp), args.llama_dir, getattr(torch, args.dtype)) for arch in ("qwen3_5_moe", "qwen3_next")]
    for row in rows:
        print(f"{row['arch']:12} {row['dtype']:9} llama.cpp's GGUF in our runtime: logits equal to transformers "
              f"resident {row['llamacpp_file_resident_equal']}, paged at the smallest cache "
              f"{row['llamacpp_file_smallest_cache_equal']} (max diff {row['llamacpp_file_resident_max_diff']:.3g}); "
              f"our export vs llama.cpp's: {row['tensors']} tensors, {len(row['tensors_differ'])} differ "
              f"{row['tensors_differ'][:4]}, metadata only ours {row['metadata_only_ours']}, only llama.cpp "
              f"{row['metadata_only_llamacpp']}, differing {row['metadata_differ']}")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
