"""A checkpoint's byte-level BPE tokenizer (tokenizer.json) written into GGUF metadata as convert_hf_to_gguf.py
writes a "gpt2" vocabulary. SentencePiece tokenizers (tokenizer.model, e.g. Mixtral) and
byte-level BPEs whose split regex transformers' GGUF reader does not know are not exported yet."""

import json
from pathlib import Path

import gguf


def pre_tokenizer_name(spec: dict | None) -> str | None:
    """tokenizer.ggml.pre for a tokenizer.json pre_tokenizer: "default" for plain byte-level (GPT-2 regex), the
    name transformers' GGUF reader maps to the same split regex, or None when no name gives that regex.
    (convert_hf_to_gguf.py picks the name by hashing the tokenizer's output on a test text.)"""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    regexes = [p["pattern"]["Regex"] for p in (spec or {}).get("pretokenizers", [spec or {}])
               if p.get("type") == "Split" and "Regex" in p.get("pattern", {})]
    if not regexes:
        return "default" if (spec or {}).get("type") == "ByteLevel" else None
    return next((name for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items() if regex == regexes[0]), None)


def add_tokenizer(w: gguf.GGUFWriter, folder: Path, vocab_size: int) -> bool:
    """Add the tokenizer in `folder` to `w`; False when there is none this can export."""
    path = folder / "tokenizer.json"
    if not path.exists():
        return False
    spec = json.loads(path.read_text())
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    if spec.get("model", {}).get("type") != "BPE" or pre is None:
        return False
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = {i: t for i, t in tok.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(w, quiet=True)
    return True
