"""The compact tier against the float32 (dequantized) tier: error on the demo model, memory and speed on a real GGUF.

    python bench/compact.py [--tokens 4096] [--gguf /var/tmp/ep-bench/MODEL.gguf --decode 16 --tiers compact]

1. Error: the demo model exported to q4_0 and q8_0 GGUF (and to q8_0 with an untied copy of its lm_head, so the
   file has an int8 output tensor); each tier scores the first `--tokens` tokens of the
   held-out code and prose texts in windows of 256 (loss and perplexity), and against the float32 tier of the same
   file: top-1 agreement of next-token predictions and mean KL(float32 || tier).
   The demo model's float checkpoint likewise: bfloat16 and `--quantize int8|int4` against float32.
2. With `--gguf` (for example bench/realgeom.py's Q4_K_M file at Qwen3-30B-A3B layer geometry): bytes per slice in
   the cache against the file, resident RAM against the file's resident bytes, and decode tok/s with every slice
   paged in first (fully resident), per tier, in one run.
Prints a table per part, then one JSON line.
"""

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from expertpager.model.demo import demo_model_path
from expertpager.runtime.load import load
from expertpager.tools.export_gguf import export_gguf
from expertpager.runner import load_tokenizer

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
TIERS = {"float32": dict(expert_cache="dequantized", dtype="float32"), "compact": dict(expert_cache="compact"),
         "compact int4": dict(expert_cache="compact", quantize="int4")}


@torch.inference_mode()
def window_logits(model, ids: torch.Tensor, window: int = 256) -> list[torch.Tensor]:
    return [model(input_ids=ids[s:s + window][None]).logits[0, :-1].float() for s in range(0, ids.numel() - 1, window)
            if ids[s:s + window].numel() > 1]


def heldout(tok, domain: str, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `tokens` ids of a held-out text, and the targets window_logits predicts."""
    ids = torch.tensor(tok((DATA / f"heldout_{domain}.txt").read_text())["input_ids"][:tokens])
    targets = torch.cat([ids[s + 1:s + 256] for s in range(0, ids.numel() - 1, 256) if ids[s:s + 256].numel() > 1])
    return ids, targets


def scored(logits: dict[str, torch.Tensor], targets: torch.Tensor, reference: str, **labels) -> list[dict]:
    """Loss and perplexity of each tier's logits, top-1 agreement and mean KL against the `reference` tier's."""
    ref = logits[reference].log_softmax(-1)
    rows = []
    for name, lg in logits.items():
        loss = F.cross_entropy(lg, targets).item()
        lp = lg.log_softmax(-1)
        rows.append(dict(**labels, tier=name, loss=round(loss, 4), ppl=round(float(torch.exp(torch.tensor(loss))), 2),
                         top1_agree=round((lg.argmax(-1) == ref.argmax(-1)).float().mean().item(), 4),
                         mean_kl=float(f"{(ref.exp() * (ref - lp)).sum(-1).mean().item():.3g}")))
    return rows


def untied_copy(folder: Path, out: Path) -> Path:
    """The demo model with its lm_head a separate copy of the embedding, so its GGUF export has an output.weight
    (the demo ties them; a real model's Q6_K/Q8_0 output tensor goes to int8 rows with int8 activations)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    model.save_pretrained(out)
    for f in folder.iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            shutil.copy(f, out / f.name)
    return out


def error_rows(tokens: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        untied = untied_copy(Path(demo_model_path()), Path(tmp) / "untied")
        for label, folder, qtype in (("q4_0", demo_model_path(), "q4_0"), ("q8_0", demo_model_path(), "q8_0"),
                                     ("q8_0 untied", untied, "q8_0")):
            path = export_gguf(folder, Path(tmp) / f"demo-{label.replace(' ', '-')}.gguf", qtype, progress=False)
            tok = load_tokenizer(str(path))
            for domain in ("code", "prose"):
                ids, targets = heldout(tok, domain, tokens)
                logits = {name: torch.cat(window_logits(load(path, **opts), ids)) for name, opts in TIERS.items()}
                rows += scored(logits, targets, "float32", file=label, domain=domain)
    return rows


def quantize_rows(tokens: int) -> list[dict]:
    """The demo model's float checkpoint: float32, bfloat16, and `--quantize int8|int4` (experts compact, resident
    linears int8 rows), against float32."""
    tiers = {"float32": dict(dtype="float32"), "bfloat16": dict(dtype="bfloat16"),
             "int8": dict(quantize="int8"), "int4": dict(quantize="int4")}
    tok = load_tokenizer(str(demo_model_path()))
    rows = []
    for domain in ("code", "prose"):
        ids, targets = heldout(tok, domain, tokens)
        logits = {name: torch.cat(window_logits(load(demo_model_path(), **opts), ids)) for name, opts in tiers.items()}
        rows += scored(logits, targets, "float32", file="demo", domain=domain)
    return rows


def size_rows(path: str, decode: int, tiers: list[str]) -> list[dict]:
    rows = []
    for name in tiers:
        opts = TIERS[name]
        t0 = time.perf_counter()
        model = load(path, **opts)
        load_s = time.perf_counter() - t0
        layout = model.layout
        served = [sum(p.length for p in m.slices[e].parts) for m in model.modules() if hasattr(m, "slices") for e in m.slices]
        resident = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        ids = torch.tensor([[1] + list(range(100, 163))])
        for layer in layout.moe_layers:  # every slice paged in before timing: fully resident
            with model.pager.pin_many([(layer, e) for e in range(layout.num_experts)]):
                pass
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True)  # prefill: pages every routed slice in
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            model(input_ids=nxt, past_key_values=cache, use_cache=True)  # warm
            t0 = time.perf_counter()
            for _ in range(decode):
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
            tps = decode / (time.perf_counter() - t0)
        rows.append(dict(tier=name, cache_bytes_per_slice=sum(served) / len(served),
                         file_bytes_per_slice=layout.expert_bytes / len(layout.slices),
                         slice_ratio=round(sum(served) / layout.expert_bytes, 3), resident_ram=resident,
                         file_resident=layout.resident_bytes, resident_ratio=round(resident / layout.resident_bytes, 2),
                         decode_tps=round(tps, 2), hit_rate=round(model.pager.stats_snapshot().hit_rate, 3),
                         load_s=round(load_s, 1), peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
        model.pager.close()
        del model
    return rows


def table(rows: list[dict]) -> None:
    keys = list(rows[0])
    print("  ".join(f"{k:>14}" for k in keys))
    for r in rows:
        print("  ".join(f"{r[k]:>14}" if not isinstance(r[k], float) else f"{r[k]:>14.4g}" for k in keys))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="held-out tokens per domain for the error table")
    ap.add_argument("--gguf", help="a quantized GGUF for the memory and speed table (e.g. bench/realgeom.py's)")
    ap.add_argument("--decode", type=int, default=16, help="decode tokens timed per tier with --gguf")
    ap.add_argument("--tiers", default="compact,float32",
                    help="tiers for the --gguf table (float32 needs 4 bytes a weight: 29 GB for the 12-layer Q4_K_M file)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {"error": error_rows(args.tokens), "quantize": quantize_rows(args.tokens)}
    table(result["error"])
    table(result["quantize"])
    if args.gguf:
        result["size"] = size_rows(args.gguf, args.decode, args.tiers.split(","))
        table(result["size"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
