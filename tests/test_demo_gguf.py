"""The demo model exported to GGUF runs paged with the same logits as the HF checkpoint (bf16), and within a stated
tolerance at q8_0; the GGUF's own tokenizer encodes like the HF one."""

from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from expertpager.model.demo import demo_model_path
from expertpager.runner import load_tokenizer
from expertpager.runtime.load import load
from expertpager.tools.export_gguf import export_gguf
from test_paged_inference import logits_trace

DEMO_Q8_0_TOLERANCE = 0.25  # max |logit difference| at q8_0 (measured 0.11 with logits up to 9.4; bf16 weights)
TEXT = "The for statement is used to iterate over the elements of a sequence"


@pytest.fixture(scope="module")
def hf():
    tokenizer = AutoTokenizer.from_pretrained(demo_model_path())
    model = AutoModelForCausalLM.from_pretrained(demo_model_path())
    prompt = tokenizer(TEXT)["input_ids"]
    return tokenizer, prompt, logits_trace(model, prompt)


def test_demo_bf16_gguf_paged_equals_hf(hf, tmp_path):
    tokenizer, prompt, reference = hf
    path = export_gguf(demo_model_path(), tmp_path / "demo-bf16.gguf", "bf16", progress=False)
    paged = load(path, cache="25%")
    got = logits_trace(paged, prompt)
    assert all(torch.equal(a, b) for a, b in zip(reference, got))
    assert paged.pager.stats_snapshot().misses > 0
    assert load_tokenizer(str(path))(TEXT)["input_ids"] == prompt
    code = (Path(__file__).parent / "data" / "heldout_code.txt").read_text()[:20000]
    assert load_tokenizer(str(path))(code)["input_ids"] == tokenizer(code)["input_ids"]
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # GPT-2's split in llama.cpp


def test_demo_q8_0_gguf_within_tolerance(hf, tmp_path):
    _, prompt, reference = hf
    path = export_gguf(demo_model_path(), tmp_path / "demo-q8_0.gguf", "q8_0", progress=False)
    got = logits_trace(load(path, cache="25%", expert_cache="dequantized"), prompt, steps=0)[0].float()
    assert (got - reference[0].float()).abs().max() < DEMO_Q8_0_TOLERANCE
    assert torch.equal(got.argmax(-1), reference[0].argmax(-1))
