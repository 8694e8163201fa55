"""Streaming text cut at stop strings, with the demo tokenizer: the deltas add up to the text before the first stop,
and no delta ever carries the start of a stop string that later completes."""

import pytest
from transformers import AutoTokenizer

from expertpager.model.demo import demo_model_path
from expertpager.server.text_stream import TextStream

TEXT = "for item in items:\n    total += item.price  # sum the prices\nreturn total"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(demo_model_path())


def feed(tokenizer, stops):
    stream = TextStream(tokenizer, stops)
    deltas = []
    for token in tokenizer(TEXT)["input_ids"]:
        deltas.append(stream.push(token))
        if stream.stopped:
            break
    deltas.append(stream.finish())
    return "".join(deltas), stream.stopped


@pytest.mark.parametrize("stops", [["# sum"], ["price", "total +="], ["m.pr"], ["s:\n"]])
def test_cut_before_the_first_stop(tokenizer, stops):
    text, stopped = feed(tokenizer, stops)
    assert stopped and text == TEXT[:min(TEXT.index(s) for s in stops)]


def test_without_a_stop_everything_comes_through(tokenizer):
    assert feed(tokenizer, ["never there"]) == (TEXT, False)
    assert feed(tokenizer, []) == (TEXT, False)
