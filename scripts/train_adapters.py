"""Train two small LoRA adapters of the demo model with peft: one on code, one on prose, from the same sources
scripts/train_demo.py trains the model on (the standard library's sources; pydoc_data/topics.py), held-out splits
untouched. LoRA on the attention projections (target_modules) and on every expert (target_parameters on the fused
experts.gate_up_proj / experts.down_proj). Saved in bfloat16 as PEFT adapters (adapter_config.json +
adapter_model.safetensors) under --out/code and --out/prose, with each adapter's held-out losses in facts.json.
A few minutes on 2 CPU cores:

    PYTHONPATH=src python scripts/train_adapters.py [--steps 60] [--out src/expertpager/demo_model/adapters]
"""

import argparse
import json
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from expertpager.model.demo import demo_model_path
from expertpager.tools.evaluate import evaluate_loss
from train_demo import code_documents, encode_stream, heldout_texts, lm_losses, prose_documents, sample_windows

DOMAINS = {"code": code_documents, "prose": prose_documents}


def train_one(domain: str, args: argparse.Namespace, tokenizer, held: dict[str, torch.Tensor]) -> dict:
    """Fine-tune a LoRA on `domain` and save it; returns its held-out losses."""
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32)
    model.set_experts_implementation("grouped_mm")
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = get_peft_model(model, config)
    docs = DOMAINS[domain]()[0]
    docs = [docs[i] for i in torch.randperm(len(docs), generator=torch.Generator().manual_seed(args.seed)).tolist()]
    kept, size = [], 0
    for doc in docs:  # a random subset of the training documents, up to --train-chars: a few steps see little more
        if size < args.train_chars:
            kept.append(doc)
            size += len(doc)
    stream = encode_stream(tokenizer, kept)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for step in range(args.steps):
        model.train()
        per_seq, _ = lm_losses(model, sample_windows(stream, args.batch, args.seq, gen))
        per_seq.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 25 == 0:
            print(f"{domain} step {step + 1}: train loss {per_seq.mean().item():.3f}", flush=True)
    seconds = time.time() - t0
    model.eval()
    losses = {d: round(evaluate_loss(model, ids, window=256)[0], 4) for d, ids in held.items()}
    out = args.out / domain
    model.to(torch.bfloat16).save_pretrained(out)
    return {"train_seconds": round(seconds), "steps": args.steps, "batch": f"{args.batch} x {args.seq}",
            "rank": args.rank, "heldout_loss": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("src/expertpager/demo_model/adapters"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-chars", type=int, default=1_000_000, help="Training text per domain, in characters.")
    parser.add_argument("--held-tokens", type=int, default=2048, help="Held-out tokens per domain to evaluate on.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(demo_model_path())
    held = {d: tokenizer(t, add_special_tokens=False, return_tensors="pt")["input_ids"][0][:args.held_tokens]
            for d, t in heldout_texts().items()}
    base = AutoModelForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32).eval()
    facts = {"base": {"heldout_loss": {d: round(evaluate_loss(base, ids, window=256)[0], 4) for d, ids in held.items()}}}
    for domain in DOMAINS:
        facts[domain] = train_one(domain, args, tokenizer, held)
        print(domain, facts[domain], flush=True)
    facts["command"] = "PYTHONPATH=src python scripts/train_adapters.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out")
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / ".facts.json.partial"
    tmp.write_text(json.dumps(facts, indent=1) + "\n")
    tmp.replace(args.out / "facts.json")


if __name__ == "__main__":
    main()
