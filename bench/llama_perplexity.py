"""Perplexity of the demo model's q4_0 and q8_0 GGUF exports: expertpager's float32 and compact tiers next to
llama.cpp's llama-perplexity on the same files and text, with llama-perplexity's protocol. Run by hand:

    PYTHONPATH=src python bench/llama_perplexity.py [--ctx 256] [--chunks 16] [--threads 2]
        [--llama-dir /work/llama/llama_cpp_python-0.3.36/vendor/llama.cpp]

The protocol (llama.cpp tools/perplexity, `perplexity()`): the text is tokenized once; each chunk is `--ctx`
consecutive tokens (the first replaced by BOS when the vocabulary adds one), evaluated from an empty context, and
only the second half of each chunk is scored (the predictions of tokens ctx/2+1 .. ctx-1); PPL = exp(mean NLL)
over all chunks. llama-perplexity needs llama.cpp's build (`ninja -C build llama-perplexity`, see bench/README.md).
Prints a table, then one JSON line.
"""

import argparse
import json
import math
import re
import subprocess
import tempfile
from pathlib import Path

import gguf
import torch
import torch.nn.functional as F

from expertpager.model.demo import demo_model_path
from expertpager.runner import load_tokenizer
from expertpager.runtime.load import load
from expertpager.tools.export_gguf import export_gguf
from realgeom import DEFAULT_LLAMA_DIR, llama_tool

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
TIERS = {"float32": dict(expert_cache="dequantized", dtype="float32"), "compact": dict(expert_cache="compact")}


def bos_id(path: Path) -> int | None:
    """The BOS id when the GGUF's vocabulary adds one (tokenizer.ggml.add_bos_token), else None."""
    fields = gguf.GGUFReader(path).fields

    def value(key):
        f = fields.get(key)
        return None if f is None else f.parts[f.data[0]][0].item()

    return value("tokenizer.ggml.bos_token_id") if value("tokenizer.ggml.add_bos_token") else None


@torch.inference_mode()
def our_perplexity(model, ids: list[int], ctx: int, chunks: int, bos: int | None) -> float:
    """llama-perplexity's number for `model`: second-half NLL of each `ctx`-token chunk."""
    nll, count = 0.0, 0
    for c in range(min(chunks, len(ids) // ctx)):
        chunk = ids[c * ctx:(c + 1) * ctx]
        if bos is not None:
            chunk = [bos] + chunk[1:]
        logits = model(input_ids=torch.tensor([chunk])).logits[0].float()
        first = ctx // 2
        nll += F.cross_entropy(logits[first:ctx - 1], torch.tensor(chunk[first + 1:]), reduction="sum").item()
        count += ctx - 1 - first
    return math.exp(nll / count)


def llama_perplexity(llama_dir: Path, path: Path, text: Path, ctx: int, chunks: int, threads: int) -> float:
    """llama-perplexity's final estimate. Its output goes to a file: through a pipe, its last lines were lost here."""
    with tempfile.TemporaryFile("w+") as log:
        subprocess.run([str(llama_tool(llama_dir, "llama-perplexity")), "-m", str(path), "-f", str(text), "-c", str(ctx),
                        "--chunks", str(chunks), "-t", str(threads), "-b", str(ctx)], stdout=log, stderr=log, check=True)
        log.seek(0)
        printed = log.read()
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", printed)
    if not found:
        raise RuntimeError(f"llama-perplexity printed no estimate:\n{printed[-2000:]}")
    return float(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-dir", type=Path, default=DEFAULT_LLAMA_DIR)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in ("q4_0", "q8_0"):
            path = export_gguf(demo_model_path(), Path(tmp) / f"demo-{qtype}.gguf", qtype, progress=False)
            tok, bos = load_tokenizer(str(path)), bos_id(path)
            models = {name: load(path, **opts) for name, opts in TIERS.items()}
            for domain in ("code", "prose"):
                text = DATA / f"heldout_{domain}.txt"
                ids = tok(text.read_text())["input_ids"]
                row = dict(file=qtype, domain=domain)
                row.update({name: round(our_perplexity(m, ids, args.ctx, args.chunks, bos), 3) for name, m in models.items()})
                row["llama.cpp"] = round(llama_perplexity(args.llama_dir, path, text, args.ctx, args.chunks, args.threads), 3)
                row["compact / llama.cpp"] = round(row["compact"] / row["llama.cpp"], 4)
                row["float32 / llama.cpp"] = round(row["float32"] / row["llama.cpp"], 4)
                rows.append(row)
                print(row, flush=True)
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    print(json.dumps({"ctx": args.ctx, "chunks": args.chunks, "rows": rows}))


if __name__ == "__main__":
    main()
