"""The embedded demo model: where it is, its geometry and size, that it loads offline and generates."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from expertpager.model.demo import demo_model_path
from expertpager.tools.trace import load_trace

DATA = Path(__file__).parent / "data"
MB = 1_000_000


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(demo_model_path()).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(demo_model_path())


def test_folder_is_in_the_package():
    folder = demo_model_path()
    assert folder.parent.name == "expertpager"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (folder / name).is_file(), name
    assert sum(f.stat().st_size for f in folder.iterdir()) < 20 * MB


def test_geometry():
    config = AutoConfig.from_pretrained(demo_model_path())
    assert config.model_type == "qwen3_moe"
    assert json.loads((demo_model_path() / "config.json").read_text())["dtype"] == "bfloat16"
    assert config.num_hidden_layers >= 6 and config.mlp_only_layers == []
    assert 32 <= config.num_experts <= 64
    assert 4 <= config.num_experts_per_tok <= 8
    assert 4096 <= config.vocab_size <= 8192


def test_weights_are_bf16_and_small():
    path = demo_model_path() / "model.safetensors"
    assert path.stat().st_size <= 20 * MB
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    assert dtypes == {"BF16"}


def test_tokenizer_special_tokens(tokenizer):
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|pad|>"
    text = "def f(x):\n    return x  # the language reference\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_loads_in_bf16_and_generates(model, tokenizer):
    assert model.dtype == torch.bfloat16
    ids = tokenizer("import os\n\ndef ", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 6
    assert torch.equal(out, model.generate(ids, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("domain", ["code", "prose"])
def test_heldout_traces(domain, tokenizer):
    text = (DATA / f"heldout_{domain}.txt").read_text(encoding="utf-8")
    assert len(text.encode()) < MB
    trace = load_trace(DATA / "traces" / f"demo_{domain}_heldout.npz")
    config = AutoConfig.from_pretrained(demo_model_path())
    assert trace.domain == domain
    assert trace.num_tokens >= 2000
    assert trace.experts.shape[1:] == (config.num_hidden_layers, config.num_experts_per_tok)
    assert trace.num_experts == config.num_experts
    assert 0 <= trace.experts.min() and trace.experts.max() < trace.num_experts
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: trace.num_tokens]
    np.testing.assert_array_equal(trace.tokens, ids)
