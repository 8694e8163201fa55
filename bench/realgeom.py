"""A Q4_K_M GGUF at Qwen3-30B-A3B layer geometry, made the way a user's file is made: an HF checkpoint (generated
bf16 weights) converted by llama.cpp's own convert_hf_to_gguf.py and quantized by llama-quantize. Run by hand:

    PYTHONPATH=src python bench/realgeom.py [--layers 12] [--skew 0.5] [--out-dir /var/tmp/ep-bench]
        [--llama-dir /work/llama/llama_cpp_python-0.3.36/vendor/llama.cpp] [--keep-intermediate]

Geometry: hidden 2048, 128 experts of moe_intermediate 768, top-8, 32 q heads / 4 kv heads of head_dim 128, vocab
151,936, untied lm_head; 12 layers by default (the real model has 48). At 12 layers the Q4_K_M file is about
4.97 GB. The checkpoint is written one layer per shard so memory stays near one layer (1.2 GB of bf16 experts).

Routing: weights are random (std 0.02), so the router input is close to isotropic; row e of each layer's router is
scaled by 1/rank(e)**skew (a random rank order per layer), which makes expert popularity skewed rather than uniform.
With the default skew 0.5 and an isotropic input the 8/16/32/64 most popular experts of a layer take about
31/50/72/91% of the picks (tools/skewed_routing.py's Zipf 1.0: 41/55/70/85%); `router_shares` computes this.

Tokenizer: the demo model's byte-level BPE (6,144 tokens) is copied in; the converter pads the vocabulary to
151,936 with unused [PADn] tokens. The converter refuses it as is: it names the pre-tokenizer by hashing the
tokenizer's output on a test text and knows only published vocabularies. The conversion therefore runs through a
shim that replaces TextModel.get_vocab_base_pre with a function returning "gpt-2", the llama.cpp name for the split
that tokenizers' ByteLevel(use_regex=True) does (the demo tokenizer's only pre-tokenizer). The converter and
gguf-py are otherwise the vendored ones, unmodified. Files go under --out-dir, never into the repository; the
checkpoint and the bf16 GGUF (about 15.8 GB each at 12 layers) are deleted after quantizing unless
--keep-intermediate. An existing output file is reused; files are written under a temporary name and renamed.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEMO_TOKENIZER = REPO / "src" / "expertpager" / "demo_model"
DEFAULT_OUT_DIR = Path("/var/tmp/ep-bench")
DEFAULT_LLAMA_DIR = Path("/work/llama/llama_cpp_python-0.3.36/vendor/llama.cpp")
PRE_TOKENIZER = "gpt-2"

# Runs convert_hf_to_gguf.py with the vendored gguf-py and a fixed pre-tokenizer name (see the module docstring).
CONVERT_SHIM = """
import runpy, sys
llama_dir, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [llama_dir, llama_dir + "/gguf-py"]
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [llama_dir + "/convert_hf_to_gguf.py"] + sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass(frozen=True)
class Geometry:
    """Qwen3-30B-A3B's layer shapes; only the layer count differs from the real model by default."""

    hidden: int = 2048
    experts: int = 128
    moe_intermediate: int = 768
    top_k: int = 8
    heads: int = 32
    kv_heads: int = 4
    head_dim: int = 128
    vocab: int = 151936
    layers: int = 12


def hf_config(g: Geometry) -> dict:
    """config.json of a Qwen3MoeForCausalLM with geometry `g` (bos/eos match the demo tokenizer's <|endoftext|>)."""
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": g.hidden,
            "moe_intermediate_size": g.moe_intermediate, "intermediate_size": 6144, "num_hidden_layers": g.layers,
            "num_experts": g.experts, "num_experts_per_tok": g.top_k, "num_attention_heads": g.heads,
            "num_key_value_heads": g.kv_heads, "head_dim": g.head_dim, "vocab_size": g.vocab,
            "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "rope_scaling": None, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "tie_word_embeddings": False, "attention_bias": False, "hidden_act": "silu", "bos_token_id": 0,
            "eos_token_id": 0, "pad_token_id": 1, "torch_dtype": "bfloat16", "use_sliding_window": False}


def router_scales(experts: int, skew: float, rng: np.random.Generator) -> np.ndarray:
    """Per-expert router row scales 1/rank**skew, ranks in a random order, normalised to mean 1."""
    s = 1.0 / np.arange(1, experts + 1, dtype=np.float64) ** skew
    s = s[rng.permutation(experts)]
    return (s / s.mean()).astype(np.float32)


def router_shares(experts: int, k: int, skew: float, samples: int = 4000, seed: int = 0) -> list[float]:
    """Share of top-k picks taken by the 8, 16, 32 and 64 most picked experts, for isotropic router inputs."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((samples, experts)) * router_scales(experts, skew, rng)
    picks = np.argpartition(-logits, k, axis=1)[:, :k]
    counts = np.sort(np.bincount(picks.ravel(), minlength=experts))[::-1] / picks.size
    return [round(float(counts[:n].sum()), 3) for n in (8, 16, 32, 64) if n <= experts]


def write_checkpoint(folder: Path, g: Geometry, skew: float, seed: int = 0) -> Path:
    """An HF qwen3_moe checkpoint of random bf16 weights, one safetensors shard per layer, plus the demo tokenizer."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(g), indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_TOKENIZER / name, folder / name)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> "torch.Tensor":
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    def ones(n: int) -> "torch.Tensor":
        return torch.ones(n, dtype=torch.bfloat16)

    weight_map: dict[str, str] = {}

    def shard(name: str, tensors: dict) -> None:
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    shard("base.safetensors", {"model.embed_tokens.weight": rand(g.vocab, g.hidden),
                               "lm_head.weight": rand(g.vocab, g.hidden), "model.norm.weight": ones(g.hidden)})
    q, kv = g.heads * g.head_dim, g.kv_heads * g.head_dim
    for i in range(g.layers):
        p = f"model.layers.{i}."
        router = rand(g.experts, g.hidden).float() * torch.from_numpy(router_scales(g.experts, skew, rng))[:, None]
        t = {p + "self_attn.q_proj.weight": rand(q, g.hidden), p + "self_attn.k_proj.weight": rand(kv, g.hidden),
             p + "self_attn.v_proj.weight": rand(kv, g.hidden), p + "self_attn.o_proj.weight": rand(g.hidden, q),
             p + "self_attn.q_norm.weight": ones(g.head_dim), p + "self_attn.k_norm.weight": ones(g.head_dim),
             p + "input_layernorm.weight": ones(g.hidden), p + "post_attention_layernorm.weight": ones(g.hidden),
             p + "mlp.gate.weight": router.to(torch.bfloat16)}
        for e in range(g.experts):
            t[p + f"mlp.experts.{e}.gate_proj.weight"] = rand(g.moe_intermediate, g.hidden)
            t[p + f"mlp.experts.{e}.up_proj.weight"] = rand(g.moe_intermediate, g.hidden)
            t[p + f"mlp.experts.{e}.down_proj.weight"] = rand(g.hidden, g.moe_intermediate)
        shard(f"layer-{i:03d}.safetensors", t)
        del t
        print(f"  wrote layer {i + 1}/{g.layers}", file=sys.stderr, flush=True)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def llama_tool(llama_dir: Path, name: str) -> Path:
    """Path of a built llama.cpp program (build/bin/NAME); raises FileNotFoundError naming the build command."""
    path = llama_dir / "build" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: build it with `cmake -B build -G Ninja -DGGML_NATIVE=ON "
                                f"-DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release && ninja -C build {name}` in {llama_dir}")
    return path


def convert(checkpoint: Path, out: Path, llama_dir: Path, outtype: str = "bf16", extra: tuple[str, ...] = ()) -> Path:
    """Run llama.cpp's convert_hf_to_gguf.py (through CONVERT_SHIM) on `checkpoint`, writing `out`; `extra`: more
    converter flags."""
    tmp = out.with_name(out.name + ".tmp")
    cmd = [sys.executable, "-c", CONVERT_SHIM, str(llama_dir), PRE_TOKENIZER, str(checkpoint),
           "--outtype", outtype, "--outfile", str(tmp), *extra]
    subprocess.run(cmd, check=True)
    tmp.rename(out)
    return out


def quantize(src: Path, out: Path, llama_dir: Path, qtype: str = "Q4_K_M", threads: int = 2) -> Path:
    """llama-quantize `src` to `qtype`, writing `out`."""
    tmp = out.with_name(out.name + ".tmp")
    subprocess.run([str(llama_tool(llama_dir, "llama-quantize")), str(src), str(tmp), qtype, str(threads)], check=True)
    tmp.rename(out)
    return out


def gguf_name(g: Geometry, skew: float, seed: int, qtype: str) -> str:
    """File name that encodes everything the file depends on, so a reused file always matches its request."""
    return f"qwen3moe-realgeom-L{g.layers}-skew{skew:g}-seed{seed}-{qtype}.gguf"


def make_gguf(out_dir: Path = DEFAULT_OUT_DIR, llama_dir: Path = DEFAULT_LLAMA_DIR, g: Geometry = Geometry(),
              skew: float = 0.5, seed: int = 0, qtype: str = "Q4_K_M", keep_intermediate: bool = False,
              threads: int = 2) -> Path:
    """The quantized GGUF in `out_dir`, made (checkpoint, convert, quantize) unless it already exists. Writes a
    sidecar NAME.json with the geometry, skew, sizes, timings and the conversion's pre-tokenizer workaround."""
    out = out_dir / gguf_name(g, skew, seed, qtype)
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out.name.removesuffix(f"-{qtype}.gguf")
    checkpoint, bf16 = out_dir / f"{stem}-hf", out_dir / f"{stem}-bf16.gguf"
    times = {}
    if not bf16.exists():
        if not (checkpoint / "model.safetensors.index.json").exists():
            print(f"writing checkpoint {checkpoint}", file=sys.stderr)
            t = time.perf_counter()
            write_checkpoint(checkpoint, g, skew, seed)
            times["checkpoint_s"] = round(time.perf_counter() - t, 1)
        print(f"converting to {bf16}", file=sys.stderr)
        t = time.perf_counter()
        convert(checkpoint, bf16, llama_dir)
        times["convert_s"] = round(time.perf_counter() - t, 1)
    print(f"quantizing to {out}", file=sys.stderr)
    t = time.perf_counter()
    quantize(bf16, out, llama_dir, qtype, threads)
    times["quantize_s"] = round(time.perf_counter() - t, 1)
    facts = {"geometry": asdict(g), "skew": skew, "seed": seed, "qtype": qtype, "bytes": out.stat().st_size,
             "router_top_shares_8_16_32_64": router_shares(g.experts, g.top_k, skew, seed=seed),
             "pre_tokenizer": f"{PRE_TOKENIZER} (get_vocab_base_pre replaced; the hash check refuses the demo tokenizer)",
             "llama_dir": str(llama_dir), "times": times}
    out.with_suffix(".json").write_text(json.dumps(facts, indent=1))
    if not keep_intermediate:
        shutil.rmtree(checkpoint, ignore_errors=True)
        bf16.unlink(missing_ok=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where the files go (not the repository)")
    ap.add_argument("--llama-dir", type=Path, default=DEFAULT_LLAMA_DIR,
                    help="llama.cpp source tree with convert_hf_to_gguf.py, gguf-py and build/bin/llama-quantize")
    ap.add_argument("--layers", type=int, default=12, help="MoE layers (Qwen3-30B-A3B has 48)")
    ap.add_argument("--skew", type=float, default=0.5, help="router row scale exponent: 1/rank**skew (0: uniform)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--qtype", default="Q4_K_M", help="llama-quantize type")
    ap.add_argument("--threads", type=int, default=2, help="llama-quantize threads")
    ap.add_argument("--keep-intermediate", action="store_true", help="keep the HF checkpoint and the bf16 GGUF")
    ap.add_argument("--shares", action="store_true", help="only print router_shares for --skew and exit")
    a = ap.parse_args()
    g = Geometry(layers=a.layers)
    if a.shares:
        print(json.dumps({"skew": a.skew, "top_shares_8_16_32_64": router_shares(g.experts, g.top_k, a.skew)}))
        return
    path = make_gguf(a.out_dir, a.llama_dir, g, a.skew, a.seed, a.qtype, a.keep_intermediate, a.threads)
    print(json.dumps({"gguf": str(path), "bytes": path.stat().st_size}))


if __name__ == "__main__":
    main()
