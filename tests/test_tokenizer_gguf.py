"""The tokenizer.ggml.pre name an export writes makes llama.cpp split text as the checkpoint's tokenizer.json does.

llama.cpp is not run here: its split regexes per name are data in expertpager.tools.tokenizer_gguf (copied from
llama-vocab.cpp), and these tests check that data against tokenizer.json's regexes as the `tokenizers` library runs
them, and against transformers' GGUF reader, which must read the same name back to the same split."""

import json
from pathlib import Path

import gguf
import pytest
import regex
from tokenizers import Regex, pre_tokenizers
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

from expertpager.model.demo import demo_model_path
from expertpager.tools.tokenizer_gguf import LLAMA_CPP_SPLITS, as_llama_cpp, pre_tokenizer_name

# the text convert_hf_to_gguf.py (get_vocab_base_pre) tokenizes to tell pre-tokenizers apart
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 '
          '333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
          '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
          '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
CODE = (Path(__file__).parent / "data" / "heldout_code.txt").read_text()[:20000]
ASCII = "".join(c for c in CHKTXT + CODE if c.isascii())

# For each name we may write: the tokenizer.json pre_tokenizer it stands for, the BPE model's ignore_merges, and the
# text on which llama.cpp's regex must split as tokenizer.json's does (for gpt-4o and tekken llama.cpp's regex tells
# letter case apart in ASCII only and admits no combining mark: it splits CHKTXT's Khmer differently, ASCII alike).
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def split_then_byte_level(name: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": GGUF_PRE_TOKENIZER_SPLITS[name]}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


CASES = {
    "gpt-2": (BYTE_LEVEL, False, CHKTXT + CODE),
    "llama-bpe": (split_then_byte_level("llama-bpe"), True, CHKTXT + CODE),
    "dbrx": (split_then_byte_level("dbrx"), False, CHKTXT + CODE),
    "qwen2": (split_then_byte_level("qwen2"), False, CHKTXT + CODE),
    "qwen35": (split_then_byte_level("qwen35"), False, CHKTXT + CODE),
    "gpt-4o": (split_then_byte_level("gpt-4o"), False, ASCII),
    "tekken": (split_then_byte_level("tekken"), True, ASCII),
}

# llama-vocab.cpp's regexes for "default" (a BPE vocabulary that names no pre-tokenizer, or names "default")
LLAMA_CPP_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", LLAMA_CPP_SPLITS["gpt-2"][0], r"\p{N}+", "[0-9][0-9][0-9]"]


def llama_cpp_split(regexes: list[str], text: str) -> list[str]:
    """Pieces as llama.cpp's unicode_regex_split makes them: each regex splits every piece the one before made,
    and text between matches stays a piece of its own."""
    pieces = [text]
    for expr in regexes:
        out = []
        for piece in pieces:
            at = 0
            for m in regex.finditer(expr, piece):
                out += [piece[at:m.start()]] * (m.start() > at) + [m.group()] * (m.end() > m.start())
                at = m.end()
            out += [piece[at:]] * (at < len(piece))
        pieces = out
    return pieces


def tokenizer_json_split(spec: dict, text: str) -> list[str]:
    """Pieces as the `tokenizers` library splits `text` with the pre_tokenizer `spec`, ByteLevel's mapping undone."""
    if spec["type"] == "ByteLevel":
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        to_byte = {c: b for b, c in bytes_to_unicode().items()}
        return [bytes(to_byte[c] for c in piece).decode() for piece, _ in pre.pre_tokenize_str(text)]
    pre = pre_tokenizers.Split(Regex(spec["pretokenizers"][0]["pattern"]["Regex"]), behavior="isolated")
    return [piece for piece, _ in pre.pre_tokenize_str(text)]


def test_demo_tokenizer_is_gpt2():
    spec = json.loads((Path(demo_model_path()) / "tokenizer.json").read_text())
    assert pre_tokenizer_name(spec) == "gpt-2"


def test_table_names_each_split_once():
    assert len(set(LLAMA_CPP_SPLITS.values())) == len(LLAMA_CPP_SPLITS)  # a split and ignore_merges: one name
    assert set(CASES) == set(LLAMA_CPP_SPLITS)


@pytest.mark.parametrize("name", CASES)
def test_llama_cpp_regex_is_the_tokenizer_json_regex(name):
    spec, ignore_merges, text = CASES[name]
    assert pre_tokenizer_name({"pre_tokenizer": spec, "model": {"ignore_merges": ignore_merges}}) == name
    expected = tokenizer_json_split(spec, text)
    assert "".join(expected) == text
    assert llama_cpp_split([LLAMA_CPP_SPLITS[name][0]], text) == expected
    # transformers' GGUF reader gives the name back the same split: its table's regex, or GPT2Tokenizer's own
    assert GGUF_PRE_TOKENIZER_SPLITS.get(name) == (None if name == "gpt-2" else spec["pretokenizers"][0]["pattern"]
                                                    ["Regex"])


def test_llama3_regex_as_llama_cpp_spells_it():
    """llama-vocab.cpp's comment quotes the tokenizer.json regex it adapted for llama3; the adaptation is ours."""
    original = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    assert as_llama_cpp(original) == LLAMA_CPP_SPLITS["llama-bpe"][0]


def test_default_is_not_gpt2s_split():
    """What exports wrote before: llama.cpp's "default" cuts punctuation runs and digit runs apart."""
    assert llama_cpp_split(LLAMA_CPP_DEFAULT, CODE) != tokenizer_json_split(BYTE_LEVEL, CODE)


@pytest.mark.parametrize("spec", [
    {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True},  # llama.cpp adds no prefix space
    {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},  # no split at all
    {"type": "Sequence", "pretokenizers": [  # ByteLevel's own regex after the Split: two splits
        split_then_byte_level("qwen2")["pretokenizers"][0], BYTE_LEVEL]},
    {"type": "Sequence", "pretokenizers": [  # a regex llama.cpp has no name for
        {"type": "Split", "pattern": {"Regex": r"\p{N}+|\S+|\s+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]},
    {"type": "Metaspace", "replacement": "▁"},
    None,
])
def test_no_name_for_other_splits(spec):
    assert pre_tokenizer_name({"pre_tokenizer": spec, "model": {"type": "BPE"}}) is None


def test_ignore_merges_picks_between_names_of_one_split():
    """llama-bpe looks a whole piece up in the vocabulary before merging, dbrx does not; a split with one name keeps
    it whatever ignore_merges says (transformers converts tiktoken vocabularies, gpt-4o's kind, with it set)."""
    assert pre_tokenizer_name({"pre_tokenizer": BYTE_LEVEL, "model": {"ignore_merges": True}}) == "gpt-2"
    gpt4o = split_then_byte_level("gpt-4o")
    assert pre_tokenizer_name({"pre_tokenizer": gpt4o, "model": {"ignore_merges": True}}) == "gpt-4o"
    llama3 = split_then_byte_level("llama-bpe")
    assert pre_tokenizer_name({"pre_tokenizer": llama3, "model": {"ignore_merges": True}}) == "llama-bpe"
    assert pre_tokenizer_name({"pre_tokenizer": llama3, "model": {"ignore_merges": False}}) == "dbrx"


@pytest.mark.parametrize("name", ["gpt-2", "qwen2", "gpt-4o"])
def test_export_writes_the_name_and_transformers_reads_it_back(name, tmp_path):
    import pydoc_data.topics
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from expertpager.runner import load_tokenizer
    from expertpager.tools.export_gguf import export_gguf
    from tiny_models import save_tiny

    bpe = ByteLevelBPETokenizer()
    if name != "gpt-2":
        bpe._tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS[name]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.train_from_iterator(list(pydoc_data.topics.topics.values())[:50], vocab_size=300, min_frequency=2,
                            special_tokens=["<|endoftext|>"])
    folder = save_tiny("qwen3_moe", tmp_path / "tok", vocab_size=300, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>").save_pretrained(folder)
    path = export_gguf(folder, tmp_path / "tok.gguf", progress=False)
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == name
    theirs, ours = AutoTokenizer.from_pretrained(folder), load_tokenizer(str(path))
    text = CHKTXT + CODE[:3000]
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]


def train_sentencepiece(path: Path) -> Path:
    """A 400-piece SentencePiece BPE trained here, set up as Llama's and Mixtral's are (byte fallback, no
    normalization, whitespace kept, digits split)."""
    import io

    import pydoc_data.topics
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(pydoc_data.topics.topics.values())[:60]), model_writer=model, vocab_size=400,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    path.write_bytes(model.getvalue())
    return path


def test_export_sentencepiece_as_llama_vocab(tmp_path):
    """A Mixtral checkpoint with tokenizer.model exports a "llama" vocabulary: pieces, scores and types as
    SentencePiece has them, an added special token as a control token, the rest of the vocabulary unused padding;
    transformers' GGUF reader then tokenizes as SentencePiece itself does."""
    import sentencepiece as spm

    from expertpager.runner import load_tokenizer
    from expertpager.tools.export_gguf import export_gguf
    from tiny_models import save_tiny

    folder = save_tiny("mixtral", tmp_path / "mixtral", vocab_size=403)
    sp = spm.SentencePieceProcessor(model_file=str(train_sentencepiece(folder / "tokenizer.model")))
    (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        "400": {"content": "<|im_end|>", "special": True}, "401": {"content": "▁user", "special": False}}}))
    (tmp_path / "out").mkdir()  # away from tokenizer.model, which transformers would read instead
    path = export_gguf(folder, tmp_path / "out" / "mixtral.gguf", progress=False)
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    tokens, scores = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.scores"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert tokens[:400] == [sp.IdToPiece(i) for i in range(400)]
    assert scores[:400] == pytest.approx([sp.GetScore(i) for i in range(400)])
    T = gguf.TokenType
    assert types[:3] == [T.UNKNOWN, T.CONTROL, T.CONTROL]
    assert [types[i] for i in range(400) if tokens[i].startswith("<0x")] == [T.BYTE] * 256
    assert tokens[400:] == ["<|im_end|>", " user", "[PAD402]"]
    assert types[400:] == [T.CONTROL, T.USER_DEFINED, T.UNUSED]
    text = CODE[:3000] + " Hello  world\n\n\t 3.14 é我 🚀"
    assert load_tokenizer(str(path))(text)["input_ids"] == [1] + sp.encode(text)


def test_export_names_a_broken_sentencepiece_model(tmp_path):
    from expertpager.errors import ExpertPagerError
    from expertpager.tools.export_gguf import export_gguf
    from tiny_models import save_tiny

    folder = save_tiny("mixtral", tmp_path / "mixtral")
    (folder / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ExpertPagerError, match="tokenizer.model: not a SentencePiece model"):
        export_gguf(folder, tmp_path / "out.gguf", progress=False)
    assert not (tmp_path / "out.gguf").exists()
