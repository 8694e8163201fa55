"""The native kernels against a float64 product of the same int8-quantized activations, and the fallback."""

import pytest
import torch

from expertpager.runtime import native
from expertpager.runtime.compact import GROUP, INT4_MM, INT8_MM, compact_matmul

needs_native = pytest.mark.skipif(native.kernels() is None, reason="no AVX2/AVX-512, C compiler or GNU OpenMP here")


def use_isa(monkeypatch, name: str) -> None:
    """Run the native kernels with instruction set `name` (skip where this CPU or machine cannot)."""
    monkeypatch.setenv("EXPERTPAGER_NATIVE", name)
    native.kernels.cache_clear()
    if native.isa() != name or native.kernels() is None:
        native.kernels.cache_clear()
        pytest.skip(f"no {name} kernels here")


@pytest.fixture(params=list(native.ISAS))
def isa(request, monkeypatch):
    use_isa(monkeypatch, request.param)
    yield request.param
    monkeypatch.undo()
    native.kernels.cache_clear()


def quantized(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels see it, in float64: per group of 32, codes round(x / scale) (ties to even) times scale,
    scale = max |x| / 127, computed in float32 as the kernels do."""
    xf = x.float().reshape(x.shape[0], -1, GROUP)
    d = xf.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(xf * inv).double() * d.double()).reshape(x.shape)


def int4_matrix(n: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed int4 weights, their scale_zero, and the float64 matrix they stand for."""
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g)
    scale = torch.rand(n, k // GROUP, generator=g) / 50 + 1e-3
    zero = torch.randn(n, k // GROUP, generator=g) / 50
    sz = torch.stack([scale.T, zero.T], -1).to(torch.bfloat16).contiguous()
    s, z = sz[..., 0].T.double(), sz[..., 1].T.double()
    w = ((codes.double() - 8).reshape(n, -1, GROUP) * s[..., None] + z[..., None]).reshape(n, k)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), sz, w


def check(y: torch.Tensor, xq: torch.Tensor, w: torch.Tensor) -> None:
    """y equals the float64 product rounded to bfloat16, up to float32 accumulation."""
    exact = xq @ w.T
    slack = (xq.abs() @ w.abs().T) * 1e-6
    assert y.dtype == torch.bfloat16
    assert ((y.double() - exact).abs() <= exact.abs() * 2 ** -8 + slack).all()


@pytest.mark.parametrize("rows,n,k", [(1, 64, 32), (1, 1536, 2048), (3, 2048, 768), (5, 128, 96)])
def test_int4_kernel_is_the_product_of_int8_activations(isa, rows, n, k):
    g = torch.Generator().manual_seed(n + k)
    packed, sz, w = int4_matrix(n, k, g)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    y = native.q4_matmul(x, packed, sz)
    check(y, quantized(x), w)
    assert not torch.equal(y, INT4_MM(x, packed, GROUP, sz))  # not torch's bfloat16-activation kernel
    for r in range(rows):  # a row's result does not depend on the rows beside it
        assert torch.equal(y[r:r + 1], native.q4_matmul(x[r:r + 1], packed, sz))


@pytest.mark.parametrize("rows,n,k", [(1, 2048, 768), (4, 100, 128), (2, 3, 64)])
def test_int8_kernel_is_the_product_of_int8_activations(isa, rows, n, k):
    g = torch.Generator().manual_seed(n + k)
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = (torch.rand(n, generator=g) / 100).to(torch.bfloat16)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    x[0, :GROUP] = 0  # an all-zero group: scale 0, codes 0
    y = native.q8_matmul(x, codes, scale)
    check(y, quantized(x), codes.double() * scale.double()[:, None])
    assert not torch.equal(y, INT8_MM(x, codes, scale))


def test_instruction_sets_give_the_same_bits(monkeypatch):
    g = torch.Generator().manual_seed(2)
    packed, sz, _ = int4_matrix(192, 320, g)
    codes = torch.randint(-127, 128, (70, 320), dtype=torch.int8, generator=g)
    scale = (torch.rand(70, generator=g) / 100).to(torch.bfloat16)
    x = (torch.randn(3, 320, generator=g) * torch.logspace(-3, 2, 320)).to(torch.bfloat16)  # groups of many sizes
    x[1, 64:96] = 0
    got = {}
    for name in native.ISAS:
        use_isa(monkeypatch, name)
        got[name] = (native.q4_matmul(x, packed, sz), native.q8_matmul(x, codes, scale))
    native.kernels.cache_clear()
    assert all(torch.equal(a, b) for a, b in zip(got["avx512"], got["avx2"]))


@needs_native
def test_results_do_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(0)
    packed, sz, _ = int4_matrix(256, 512, g)
    x = torch.randn(2, 512, generator=g).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.q4_matmul(x, packed, sz)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(one, native.q4_matmul(x, packed, sz))
    finally:
        torch.set_num_threads(threads)


@needs_native
def test_kernels_are_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTPAGER_CACHE", str(tmp_path))
    native.kernels.cache_clear()
    try:
        assert native.kernels() is not None
        assert [p.name.startswith("kernels-") for p in (tmp_path / "native").iterdir()] == [True]  # no temp left
    finally:
        native.kernels.cache_clear()


def test_without_native_kernels_the_tier_uses_torch(monkeypatch):
    monkeypatch.setenv("EXPERTPAGER_NATIVE", "0")
    native.kernels.cache_clear()
    try:
        g = torch.Generator().manual_seed(1)
        packed, sz, _ = int4_matrix(64, 64, g)
        x = torch.randn(1, 64, generator=g).to(torch.bfloat16)
        assert native.kernels() is None and native.describe().startswith("torch")
        assert torch.equal(compact_matmul({"w": packed, "w_sz": sz}, "w")(x), INT4_MM(x, packed, GROUP, sz))
    finally:
        native.kernels.cache_clear()


def test_a_misspelt_setting_is_an_error(monkeypatch):
    from expertpager.errors import ExpertPagerError

    monkeypatch.setenv("EXPERTPAGER_NATIVE", "avx-512")
    with pytest.raises(ExpertPagerError, match="EXPERTPAGER_NATIVE='avx-512'"):
        native.isa()
