"""Torch dequantization equals gguf-py's numpy reference bit for bit, for every supported type."""

import gguf
import numpy as np
import pytest
import torch

from expertpager.errors import ExpertPagerError
from expertpager.runtime.dequant import BLOCKS, dequantize

# Byte ranges of float16 scales inside one block: set to finite random halves so results are comparable bit for bit.
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2],
              "Q6_K": [208]}


def random_blocks(qtype: str, rows: int, row_blocks: int, seed: int) -> np.ndarray:
    """Random bytes in the block structure of `qtype`, [rows, row_blocks * bytes per block]; scales finite."""
    rng = np.random.default_rng(seed)
    _, size = BLOCKS[qtype]
    if qtype in ("F32", "F16", "BF16"):
        dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.float32}[qtype]
        values = rng.standard_normal((rows, row_blocks)).astype(dtype)
        if qtype == "BF16":
            return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return values.view(np.uint8)
    raw = rng.integers(0, 256, (rows * row_blocks, size), dtype=np.uint8)
    for at in F16_FIELDS.get(qtype, []):
        raw[:, at:at + 2] = (rng.standard_normal(rows * row_blocks) * 0.1).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, row_blocks * size)


@pytest.mark.filterwarnings("ignore:overflow encountered")  # MXFP4 scales up to 2^127 overflow in both
@pytest.mark.parametrize("qtype", sorted(BLOCKS))
def test_bit_exact_against_gguf(qtype):
    block, _ = BLOCKS[qtype]
    for seed, (rows, row_blocks) in enumerate([(1, 1), (3, 2), (16, 4), (7, 9)]):
        raw = random_blocks(qtype, rows, row_blocks, seed)
        expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).astype(np.float32)
        got = dequantize(torch.from_numpy(raw.reshape(-1)), qtype, (rows, row_blocks * block))
        assert got.dtype == torch.float32 and tuple(got.shape) == expected.shape
        assert np.array_equal(got.numpy().view(np.uint32), expected.view(np.uint32)), f"{qtype} rows={rows}"


def test_round_trip_of_gguf_quantizer():
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    for qtype in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "MXFP4"):
        q = gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype])
        expected = gguf.quants.dequantize(q, gguf.GGMLQuantizationType[qtype])
        assert np.array_equal(dequantize(torch.from_numpy(q.reshape(-1)), qtype, x.shape).numpy(), expected)


def test_bad_input():
    with pytest.raises(ExpertPagerError, match="unsupported quantization type 'IQ2_XXS'"):
        dequantize(torch.zeros(66, dtype=torch.uint8), "IQ2_XXS", (256,))
    with pytest.raises(ExpertPagerError, match="not a whole number of Q4_K blocks"):
        dequantize(torch.zeros(144, dtype=torch.uint8), "Q4_K", (2, 128))
    with pytest.raises(ExpertPagerError, match="do not hold a Q8_0 tensor"):
        dequantize(torch.zeros(33, dtype=torch.uint8), "Q8_0", (32,))
