"""The compact tier's native kernels (native_kernels.c): int4-packed and int8 matrices times bfloat16 activations
quantized to int8 in groups of 32, with integer dot products (AVX-512 VNNI, or AVX2). They read the same packed
bytes as torch's weight-only kernels (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`), which widen every
weight to float32 and ran at 8-21 GB/s here where these run near the memory's 25-29 GB/s (bench/README.md).

Built on first use with the C compiler (`$CC`, else `cc`) into $EXPERTPAGER_CACHE/native (default
~/.cache/expertpager/native), keyed by the source and the flags: about a second, once. Used where the CPU has
AVX-512 (F, BW, VL, VNNI, VBMI) or AVX2 with FMA, the compiler works, and torch runs on GNU OpenMP (the kernels join
its thread pool); both instruction sets give the same bits. `EXPERTPAGER_NATIVE=0` turns them off, `=avx2` keeps
to AVX2. Elsewhere the tier runs on torch's kernels with bfloat16 activations: other numbers, the same within a
run, so paged output still equals fully resident output."""

import ctypes
import hashlib
import os
import subprocess
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

from ..errors import ExpertPagerError

SOURCE = Path(__file__).with_name("native_kernels.c")
FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp", "-mavx2", "-mfma"]  # the AVX-512 functions name their own target
ISAS = {"avx512": {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi"},  # as /proc/cpuinfo names them
        "avx2": {"avx2", "fma"}}
GROUP = 32


def _cpu_flags() -> set[str]:
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


def isa() -> str | None:
    """The instruction set the kernels use here: avx512, avx2, or None (see the module's docstring)."""
    wanted = os.environ.get("EXPERTPAGER_NATIVE", "1")
    if wanted not in ("0", "1", *ISAS):
        raise ExpertPagerError(f"EXPERTPAGER_NATIVE={wanted!r}: use 0 (off), 1 (the best this CPU has), "
                               f"{' or '.join(ISAS)}")
    if wanted == "0":
        return None
    flags = _cpu_flags()
    usable = [name for name, needs in ISAS.items() if needs <= flags and wanted in ("1", name)]
    return usable[0] if usable else None


def _gnu_openmp_loaded() -> bool:
    """Whether this process already runs GNU OpenMP (torch's wheels on Linux bundle libgomp.so.1); the library then
    binds to that copy, so its parallel loops share torch's threads."""
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _build() -> Path:
    """The compiled library, built once per source and flags (a temporary name, then renamed into place)."""
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *FLAGS]).encode()).hexdigest()[:16]
    root = Path(os.environ.get("EXPERTPAGER_CACHE", Path.home() / ".cache" / "expertpager")) / "native"
    path = root / f"kernels-{key}.so"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=root)
        os.close(fd)
        try:
            subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, timeout=120)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


@cache
def kernels() -> tuple[Callable, Callable] | None:
    """The int4 and int8 kernels for this CPU's instruction set, or None where they cannot run here."""
    chosen = isa()
    if chosen is None or not _gnu_openmp_loaded():
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError):
        return None
    args = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long,
            ctypes.c_void_p, ctypes.c_int]
    found = tuple(getattr(lib, f"ep_{kind}_matmul_{chosen}") for kind in ("q4", "q8"))
    for f in found:
        f.argtypes, f.restype = args, ctypes.c_int
    return found


def describe() -> str:
    """Which kernels the compact tier multiplies with here, for run's stats (short: it is a table cell)."""
    if kernels() is not None:
        return f"native {isa()}, int8 activations"
    if os.environ.get("EXPERTPAGER_NATIVE") == "0":
        return "torch (EXPERTPAGER_NATIVE=0)"
    return "torch (no native kernels)"


def q4_fits(weight: torch.Tensor) -> bool:
    """Whether an int4-packed weight [N, K/2] has a shape the native kernel takes (N a multiple of 64)."""
    n, half_k = weight.shape
    return kernels() is not None and weight.is_contiguous() and n % 64 == 0 and half_k * 2 % GROUP == 0


def q8_fits(weight: torch.Tensor) -> bool:
    """Whether int8 rows [N, K] have a shape the native kernel takes (K a multiple of 64)."""
    return kernels() is not None and weight.is_contiguous() and weight.shape[1] % 64 == 0


def q4_matmul(x: torch.Tensor, weight: torch.Tensor, scale_zero: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bfloat16) through int4-packed weights [N, K/2] and their scale_zero [K/32, N, 2], as
    `_weight_int4pack_mm_for_cpu(x, weight, 32, scale_zero)` with x quantized to int8 per 32."""
    return q4_kernel(weight, scale_zero)(x)


def q8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bfloat16) through int8 rows [N, K] with bfloat16 row scales [N], as
    `_weight_int8pack_mm(x, weight, scale)` with x quantized to int8 per 32."""
    return q8_kernel(weight, scale)(x)


def q4_kernel(weight: torch.Tensor, scale_zero: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """q4_matmul with its weights and kernel bound once."""
    return _bound(kernels()[0], weight, scale_zero)


def q8_kernel(weight: torch.Tensor, scale: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """q8_matmul with its weights bound once."""
    return _bound(kernels()[1], weight, scale)


def _bound(kernel, weight: torch.Tensor, scales: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    n = weight.shape[0]

    def matmul(x: torch.Tensor) -> torch.Tensor:  # holds weight and scales, so their memory outlives it
        x = x.to(torch.bfloat16).contiguous()  # no copy when it already is
        out = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
        if x.shape[0] and not kernel(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), scales.data_ptr(), n,
                                     out.data_ptr(), torch.get_num_threads()):
            raise MemoryError(f"native kernel: no memory for {x.shape[0]} x {x.shape[1]} quantized activations")
        return out

    return matmul
