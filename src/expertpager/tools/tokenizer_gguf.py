"""A checkpoint's tokenizer written into GGUF metadata as convert_hf_to_gguf.py writes it: a SentencePiece model
(tokenizer.model, e.g. Mixtral) as a "llama" vocabulary with scores and token types, a byte-level BPE
(tokenizer.json) as a "gpt2" vocabulary. Byte-level BPEs whose split llama.cpp and transformers' GGUF reader do not
both know by one tokenizer.ggml.pre name are not exported."""

import json
from pathlib import Path

import gguf

from ..errors import ExpertPagerError

# How llama.cpp splits text before BPE for each tokenizer.ggml.pre name we write: the regex llm_tokenizer_bpe runs
# for it and the ignore_merges flag llama_vocab::impl::load sets for it, copied from src/llama-vocab.cpp of llama.cpp
# as vendored in llama-cpp-python 0.3.36. Only names that transformers' GGUF reader maps to the same split are here.
# For gpt-4o and tekken llama.cpp runs an approximation of the tokenizer.json regex (its comments there quote the
# original): it tells letter case apart by ASCII a-z and A-Z only and admits no combining mark where the original
# does; it is still the name llama.cpp's converter writes for those tokenizers. "default" (llama.cpp's name for a
# BPE that names none) is not GPT-2's split: it cuts out punctuation runs first and digit runs into threes.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = _CONTRACTIONS + (r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                           r"|\s+(?!\S)|\s+")
_UPPER, _LOWER = r"((?=[\p{L}])([^a-z]))", r"((?=[\p{L}])([^A-Z]))"
LLAMA_CPP_SPLITS = {  # name: (regex, ignore_merges)
    "gpt-2": (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)", False),
    "llama-bpe": (_LLAMA3, True),
    "dbrx": (_LLAMA3, False),
    "qwen2": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
              False),
    "qwen35": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+", False),
    "gpt-4o": (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
               rf"{_CONTRACTIONS}?|\p{{N}}{{1,3}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+", False),
    "tekken": (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*|\p{{N}}"
               rf"| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+", True),
}


def as_llama_cpp(regex: str) -> str:
    """A tokenizer.json split regex as llama-vocab.cpp spells it: its std::regex has no (?i:), so the contractions
    are spelt out in both cases, and gpt-4o's and tekken's letter-case classes become ASCII-case lookaheads."""
    return (regex.replace("(?i:'s|'t|'re|'ve|'m|'ll|'d)", _CONTRACTIONS)
            .replace(r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", _UPPER).replace(r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]", _LOWER))


def pre_tokenizer_name(tokenizer_json: dict) -> str | None:
    r"""tokenizer.ggml.pre for a tokenizer.json: the llama.cpp name that splits text as its pre_tokenizer does
    (of two, the one that takes its BPE model's ignore_merges), or None when none does. ByteLevel with use_regex
    splits with GPT-2's regex ("gpt-2"; llama.cpp leaves off its last alternative, |\s+, which its GPT-2 splitter
    applies all the same); an isolating Split(regex) then ByteLevel without it splits with that regex.
    (convert_hf_to_gguf.py picks the name by hashing the tokenizer's output on a test text, which only knows the
    vocabularies it has seen; this picks by the split itself.)"""
    spec = tokenizer_json.get("pre_tokenizer") or {}
    steps = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else [spec]
    *splits, last = steps or [{}]
    if last.get("type") != "ByteLevel" or last.get("add_prefix_space", True):
        return None
    if not splits and last.get("use_regex", True):
        regex = LLAMA_CPP_SPLITS["gpt-2"][0]
    elif (len(splits) == 1 and not last.get("use_regex", True) and splits[0].get("type") == "Split"
          and splits[0].get("behavior") == "Isolated" and not splits[0].get("invert")
          and "Regex" in splits[0].get("pattern", {})):
        regex = as_llama_cpp(splits[0]["pattern"]["Regex"])
    else:
        return None
    ignore_merges = bool(tokenizer_json.get("model", {}).get("ignore_merges"))
    names = [name for name, (split, _) in LLAMA_CPP_SPLITS.items() if split == regex]
    return min(names, key=lambda name: LLAMA_CPP_SPLITS[name][1] != ignore_merges, default=None)


def _added_tokens(folder: Path, config: dict) -> dict[int, tuple[str, bool]]:
    """Tokens added on top of a SentencePiece model, id: (text, special), from added_tokens.json and then
    tokenizer_config.json's added_tokens_decoder (special when marked so or when it looks like <|...|>)."""
    added = {}
    if (folder / "added_tokens.json").is_file():
        added = {i: (text, False) for text, i in json.loads((folder / "added_tokens.json").read_text()).items()}
    for i, token in config.get("added_tokens_decoder", {}).items():
        text = token["content"]
        added[int(i)] = (text, bool(token.get("special")) or (text.startswith("<|") and text.endswith("|>")))
    return added


def _add_sentencepiece(w: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    """tokenizer.model as _set_vocab_sentencepiece writes it: pieces, scores and SentencePiece token types, padded
    to the model's vocabulary with unused [PADi]; added tokens score -1000, control or user-defined."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise ExpertPagerError(f"{folder / 'tokenizer.model'}: exporting a SentencePiece tokenizer needs the "
                               "sentencepiece package (pip install sentencepiece)") from None
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(folder / "tokenizer.model"))
    except (OSError, RuntimeError) as e:
        raise ExpertPagerError(f"{folder / 'tokenizer.model'}: not a SentencePiece model ({e})") from None
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores, types = [-10000.0] * vocab_size, [gguf.TokenType.UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
        types[i] = (gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL if sp.IsControl(i)
                    else gguf.TokenType.UNUSED if sp.IsUnused(i) else gguf.TokenType.BYTE if sp.IsByte(i)
                    else gguf.TokenType.NORMAL)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    for i, (text, special) in _added_tokens(folder, config).items():
        if i < vocab_size:
            tokens[i], scores[i] = text if special else text.replace("\u2581", " "), -1000.0
            types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    if config.get("add_prefix_space") is not None:
        w.add_add_space_prefix(config["add_prefix_space"])
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(folder, n_vocab=vocab_size).add_to_gguf(w, quiet=True)


def add_tokenizer(w: gguf.GGUFWriter, folder: Path, vocab_size: int) -> bool:
    """Add the tokenizer in `folder` to `w`; False when there is none this can export. A SentencePiece model
    (tokenizer.model) comes first, as in convert_hf_to_gguf.py."""
    if (folder / "tokenizer.model").is_file():
        _add_sentencepiece(w, folder, vocab_size)
        return True
    path = folder / "tokenizer.json"
    if not path.exists():
        return False
    spec = json.loads(path.read_text())
    pre = pre_tokenizer_name(spec)
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
