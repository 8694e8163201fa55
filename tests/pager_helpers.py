"""Real files with random bytes and the expert slices that point into them, for the pager tests."""

import threading
from pathlib import Path

import numpy as np

from expertpager.model.layout import ExpertSlice, TensorPart

ROLES = ("gate", "up", "down")


def write_model(
    folder: Path,
    layers: int = 3,
    experts: int = 4,
    size: int = 3000,
    files: int = 2,
    fused: bool = False,
    seed: int = 0,
) -> tuple[dict, dict[str, bytes]]:
    """GGUF-like files (one stacked tensor per role and layer, unaligned offsets, sizes varying by layer) or, with
    fused=True, safetensors-like per-expert tensors with the three parts adjacent. Returns (slices, contents)."""
    rng = np.random.default_rng(seed)
    chunks: dict[str, list[bytes]] = {}
    pos: dict[str, int] = {}
    slices = {}
    parts: dict[tuple[int, int], list[TensorPart]] = {}

    def put(path: str, nbytes: int) -> int:
        if path not in chunks:
            header = 1237 + 101 * len(chunks)  # an unaligned header, as in GGUF and safetensors
            chunks[path], pos[path] = [rng.integers(0, 256, header, dtype=np.uint8).tobytes()], header
        offset = pos[path]
        chunks[path].append(rng.integers(0, 256, nbytes, dtype=np.uint8).tobytes())
        pos[path] += nbytes
        return offset

    for layer in range(layers):
        path = str(folder / f"model-{layer % files}.bin")
        n = size + 517 * (layer % 3)  # quant types differ per layer
        if fused:
            for e in range(experts):
                for role in ROLES:
                    parts.setdefault((layer, e), []).append(TensorPart(role, path, put(path, n), n, "U8", (n,)))
        else:
            for role in ROLES:
                base = put(path, n * experts)
                put(path, 29)  # padding between tensors
                for e in range(experts):
                    parts.setdefault((layer, e), []).append(TensorPart(role, path, base + e * n, n, "U8", (n,)))
    for (layer, e), ps in parts.items():
        slices[(layer, e)] = ExpertSlice(layer, e, tuple(sorted(ps, key=lambda p: (p.file, p.offset))))
    contents = {}
    for path, cs in chunks.items():
        data = b"".join(cs)
        Path(path).write_bytes(data)
        contents[path] = data
    return slices, contents


def expected(contents: dict[str, bytes], part: TensorPart) -> bytes:
    return contents[part.file][part.offset : part.offset + part.length]


def check_buffer(buf, sl: ExpertSlice, contents: dict[str, bytes]) -> None:
    assert buf.key == sl.key
    for part in sl.parts:
        assert buf.views[part.role].tobytes() == expected(contents, part), (sl.key, part.role)


class Gate:
    """A verify hook that holds the load of one key until opened, so a test can act while it is in flight."""

    def __init__(self, key):
        self.key, self.entered, self.open = key, threading.Event(), threading.Event()

    def __call__(self, key, views):
        if key == self.key:
            self.entered.set()
            assert self.open.wait(20)
