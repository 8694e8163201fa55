"""GGML block formats to float32 with torch, op for op as gguf-py's numpy reference (`gguf/quants.py`), so the
results are bit-identical to `gguf.quants.dequantize`."""

import math
from collections.abc import Callable

import torch

from ..errors import ExpertPagerError

QK_K = 256
BLOCKS: dict[str, tuple[int, int]] = {  # type: (weights per block, bytes per block)
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20),
    "Q5_0": (32, 22), "Q5_1": (32, 24), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210), "MXFP4": (32, 17),
}
MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # e2m1, doubled


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two bytes per row as a float16 scale, widened to float32: [n, 2] -> [n, 1]."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Low nibbles then high nibbles of each run of `group` bytes: [n, m] -> [n, 2m] (uint8)."""
    n = qs.shape[0]
    shifted = qs.reshape(n, -1, 1, group) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    return (shifted & 0x0F).reshape(n, -1)


def _bits(b: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Fields of `width` bits, lowest first, of each byte across runs of 32 bytes: [n, m] -> [n, m*count/32, 32]."""
    n = b.shape[0]
    shifts = torch.arange(0, count * width, width, dtype=torch.uint8).reshape(1, 1, count, 1)
    return ((b.reshape(n, -1, 1, 32) >> shifts) & ((1 << width) - 1)).reshape(n, -1, 32)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    qs = _nibbles(b[:, 2:], 16).to(torch.int8) - 8
    return _f16(b[:, :2]) * qs.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * _nibbles(b[:, 4:], 16).float() + _f16(b[:, 2:4])


def _high_bits_32(qh: torch.Tensor) -> torch.Tensor:
    """Bit i of a little-endian uint32 for i in 0..31: [n, 4] -> [n, 32] (uint8)."""
    return ((qh.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(qh.shape[0], 32)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    qs = (_nibbles(b[:, 6:], 16) | (_high_bits_32(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return _f16(b[:, :2]) * qs.float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    qs = _nibbles(b[:, 8:], 16) | (_high_bits_32(b[:, 4:8]) << 4)
    return _f16(b[:, :2]) * qs.float() + _f16(b[:, 2:4])


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in Q4_K/Q5_K's 12 scale bytes."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_scaled(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: d * scale * q - dmin * min over 8 sub-blocks of 32."""
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.float()).reshape(n, -1, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).reshape(n, -1, 1)
    return (d * q.float() - dm).reshape(n, QK_K)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    return _k_scaled(b, _nibbles(b[:, 16:], 32).reshape(b.shape[0], -1, 32))


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql = _nibbles(b[:, 48:], 32).reshape(n, -1, 32)
    qh = _bits(b[:, 16:48], 1, 8)
    return _k_scaled(b, ql | (qh << 4))


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b[:, 208:210]) * scales).reshape(n, QK_K // 16, 1)
    ql = _nibbles(b[:, :128], 64).reshape(n, -1, 32)
    qh = _bits(b[:, 128:192], 2, 4)
    q = (ql | (qh << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, QK_K // 16, -1).float()).reshape(n, QK_K)


def _mxfp4(b: torch.Tensor) -> torch.Tensor:
    e = b[:, :1].to(torch.int32)
    bits = torch.where(e < 2, torch.tensor(0x00200000, dtype=torch.int32) << e, (e - 1) << 23)
    d = bits.view(torch.float32)
    qs = _nibbles(b[:, 1:], 16).long()
    values = torch.tensor(MXFP4_VALUES, dtype=torch.int8)[qs]
    return d * values.float()


def _bf16(b: torch.Tensor) -> torch.Tensor:
    return (b.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


def _f16_values(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def _f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


DEQUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "F32": _f32, "F16": _f16_values, "BF16": _bf16, "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0,
    "Q5_1": _q5_1, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k, "MXFP4": _mxfp4,
}


def quant_nbytes(qtype: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of `shape` (numpy order) takes in `qtype`; raises when the type is unknown or rows don't fit blocks."""
    block, size = block_of(qtype)
    if shape and shape[-1] % block:
        raise ExpertPagerError(f"rows of {shape[-1]} weights are not a whole number of {qtype} blocks of {block}")
    return math.prod(shape) // block * size


def block_of(qtype: str) -> tuple[int, int]:
    """(weights, bytes) of one block of `qtype`, or an error naming the supported types."""
    if qtype not in BLOCKS:
        raise ExpertPagerError(f"unsupported quantization type {qtype!r}; supported: {', '.join(BLOCKS)}")
    return BLOCKS[qtype]


def dequantize(raw: torch.Tensor, qtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 tensor of `shape` from the uint8 bytes `raw` of a `qtype` tensor (rows are whole blocks)."""
    if raw.numel() != quant_nbytes(qtype, shape):
        raise ExpertPagerError(f"{raw.numel()} bytes do not hold a {qtype} tensor of shape {list(shape)}")
    block, size = BLOCKS[qtype]
    return DEQUANTIZERS[qtype](raw.reshape(-1, size)).reshape(shape)
