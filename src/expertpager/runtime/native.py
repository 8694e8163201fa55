"""The compact tier's native kernels (native_kernels.c): int4-packed and int8 matrices times bfloat16 activations
quantized to int8 in groups of 32, with AVX-512 VNNI dot products. They read the same packed bytes as torch's
weight-only kernels (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`), which widen every weight to float32 and
ran at 14-18 GB/s here where these run near the memory's 25-29 GB/s (measured in bench/README.md).

Built on first use with the C compiler (`$CC`, else `cc`) into $EXPERTPAGER_CACHE/native (default
~/.cache/expertpager/native), keyed by the source and the flags: about a second, once. Used only where the CPU has
AVX-512 with VNNI and VBMI, the compiler works, and torch runs on GNU OpenMP (the kernels join its thread pool);
`EXPERTPAGER_NATIVE=0` turns them off. Elsewhere the tier runs on torch's kernels with bfloat16 activations: other
numbers, the same within a run, so paged output still equals fully resident output."""

import ctypes
import hashlib
import os
import subprocess
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native_kernels.c")
FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512vbmi"]
CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi"}  # as /proc/cpuinfo names them
GROUP = 32


def _cpu_ok() -> bool:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return CPU_FLAGS <= set(flags.split(":", 1)[1].split())


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
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot run here (see the module's docstring)."""
    if os.environ.get("EXPERTPAGER_NATIVE", "1") == "0" or not _cpu_ok() or not _gnu_openmp_loaded():
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError):
        return None
    args = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long,
            ctypes.c_void_p, ctypes.c_int]
    for f in (lib.ep_q4_matmul, lib.ep_q8_matmul):
        f.argtypes, f.restype = args, None
    return lib


def describe() -> str:
    """Which kernels the compact tier multiplies with here, for run's stats."""
    if library() is not None:
        return "native: int8 activations per 32, AVX-512 VNNI"
    return "torch: bfloat16 activations (set EXPERTPAGER_NATIVE=1 and see runtime/native.py)" if os.environ.get(
        "EXPERTPAGER_NATIVE") == "0" else "torch: bfloat16 activations (no AVX-512 VNNI/VBMI, C compiler or GNU OpenMP)"


def q4_fits(weight: torch.Tensor) -> bool:
    """Whether an int4-packed weight [N, K/2] has a shape the native kernel takes (N a multiple of 64)."""
    return library() is not None and weight.is_contiguous() and weight.shape[0] % 64 == 0 and weight.shape[1] * 2 % GROUP == 0


def q8_fits(weight: torch.Tensor) -> bool:
    """Whether int8 rows [N, K] have a shape the native kernel takes (K a multiple of 64)."""
    return library() is not None and weight.is_contiguous() and weight.shape[1] % 64 == 0


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
    return _bound(library().ep_q4_matmul, weight, scale_zero)


def q8_kernel(weight: torch.Tensor, scale: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """q8_matmul with its weights bound once."""
    return _bound(library().ep_q8_matmul, weight, scale)


def _bound(kernel, weight: torch.Tensor, scales: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    n = weight.shape[0]

    def matmul(x: torch.Tensor) -> torch.Tensor:  # holds weight and scales, so their memory outlives it
        x = x.contiguous()
        out = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
        if x.shape[0]:
            kernel(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), scales.data_ptr(), n, out.data_ptr(),
                   torch.get_num_threads())
        return out

    return matmul
