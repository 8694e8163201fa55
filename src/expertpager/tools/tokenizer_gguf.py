"""A checkpoint's byte-level BPE tokenizer (tokenizer.json) written into GGUF metadata as convert_hf_to_gguf.py
writes a "gpt2" vocabulary. SentencePiece tokenizers (tokenizer.model, e.g. Mixtral) are not exported yet."""

from pathlib import Path

import gguf

PRE_TOKENIZERS = {"qwen3_moe": "qwen2", "qwen2_moe": "qwen2"}
"""tokenizer.ggml.pre by model_type; convert_hf_to_gguf.py picks it by hashing the tokenizer's output."""


def add_tokenizer(w: gguf.GGUFWriter, folder: Path, vocab_size: int, model_type: str) -> bool:
    """Add the tokenizer in `folder` to `w`; False when there is none this can export."""
    import json

    path = folder / "tokenizer.json"
    if not path.exists() or json.loads(path.read_text()).get("model", {}).get("type") != "BPE":
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
    w.add_tokenizer_pre(PRE_TOKENIZERS.get(model_type, "default"))
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(w, quiet=True)
    return True
