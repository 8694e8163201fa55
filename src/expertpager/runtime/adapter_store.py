"""An adapter's expert LoRA factors cut into pieces the pager can page: one piece per (layer, expert), 4 KiB-aligned
in one file, so an expert's factors are one read. peft stores B of `target_parameters` as [out, rank x experts] with
the expert as the fastest index, so no expert's factors are a byte range of the adapter file; the store is written
once per adapter, model geometry and dtype (temporary name, then rename) under $EXPERTPAGER_CACHE or
~/.cache/expertpager/adapters, and reused while the adapter file is unchanged.

A piece holds, per adapted matrix, A [rank, in] and B [out, rank] (B^T [rank, out] for a transposed experts module),
in the compute dtype (peft casts both to the weight's dtype before it merges them), each at the address modulo
ALIGN where peft's merge reads it (see runtime/lora.py)."""

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import ExpertPagerError
from ..model.adapter import AdapterInfo, ExpertLora
from ..model.layout import ExpertSlice, TensorPart
from ..pager.reads import BLOCK
from ..progress import progress_bar
from .matrices import ALIGN
from .paged_experts import DTYPE_NAMES

STORE_FORMAT = "expertpager-adapter-pieces/1"


def store_root() -> Path:
    """$EXPERTPAGER_CACHE/adapters, or ~/.cache/expertpager/adapters."""
    return Path(os.environ.get("EXPERTPAGER_CACHE", Path.home() / ".cache" / "expertpager")) / "adapters"


def factor_shapes(lora: ExpertLora, transposed: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """The shapes of one expert's A and stored B for `lora`."""
    if lora.stacked is not None:
        a, b = lora.stacked.a.shape, lora.stacked.b.shape
        size_in, size_out = a[1], b[0]
    else:
        pairs = lora.per_expert[0]
        size_in, size_out = pairs[0].a.shape[1], sum(p.b.shape[0] for p in pairs)
    return (lora.rank, size_in), ((lora.rank, size_out) if transposed else (size_out, lora.rank))


def plan_pieces(info: AdapterInfo, num_experts: int, transposed: dict[int, bool], dtype: torch.dtype,
                file: str) -> dict[tuple[int, int, str], ExpertSlice]:
    """Where each (layer, expert, adapter name) piece's parts sit in the store `file`: A where peft's stacked A
    holds expert e's rows (e x its bytes, modulo ALIGN), B at a fresh allocation's alignment (peft gathers each
    expert's B into a new tensor)."""
    pieces, pos, item = {}, 0, dtype.itemsize
    for layer in info.expert_layers:
        for e in range(num_experts):
            parts = []
            for matrix in ("gate_up", "down"):
                lora = info.experts.get((layer, matrix))
                if lora is None:
                    continue
                a, b = factor_shapes(lora, transposed[layer])
                for role, shape, align in ((f"{matrix}.A", a, e * a[0] * a[1] * item % ALIGN), (f"{matrix}.B", b, 0)):
                    pos += (align - pos) % ALIGN
                    parts.append(TensorPart(role, file, pos, shape[0] * shape[1] * item, DTYPE_NAMES[dtype], shape))
                    pos += parts[-1].length
            pieces[(layer, e, info.name)] = ExpertSlice(layer, e, tuple(parts))
            pos += -pos % BLOCK
    return pieces


def expert_factors(lora: ExpertLora, tensors: dict[str, torch.Tensor], num_experts: int,
                   transposed: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A [rank, in], B as stored) of every expert, from the adapter's tensors: peft's stacked layout taken apart,
    or an older adapter's per-expert pairs fused as peft fuses them (A concatenated, B block-diagonal)."""
    out = []
    for e in range(num_experts):
        if lora.stacked is not None:
            a_all, b_all = tensors[lora.stacked.a.name], tensors[lora.stacked.b.name]
            a = a_all.reshape(num_experts, lora.rank, -1)[e]
            b = b_all.reshape(b_all.shape[0], lora.rank, num_experts)[:, :, e]
        else:
            pairs = lora.per_expert[e]
            a = torch.cat([tensors[p.a.name] for p in pairs])
            b = torch.block_diag(*[tensors[p.b.name] for p in pairs])
        out.append((a, b.T if transposed else b))
    return out


def adapter_pieces(info: AdapterInfo, num_experts: int, transposed: dict[int, bool], dtype: torch.dtype,
                   progress: bool = False) -> dict[tuple[int, int, str], ExpertSlice]:
    """The pieces of `info`'s expert LoRA, keyed (layer, expert, adapter name), in a store written now if it is not
    there already; empty when the adapter has no expert LoRA."""
    if not info.experts:
        return {}
    weights = Path(info.path) / "adapter_model.safetensors"
    st = weights.stat()
    ident = json.dumps([STORE_FORMAT, str(weights.resolve()), st.st_size, st.st_mtime_ns, info.config, num_experts,
                        sorted(transposed.items()), str(dtype)], sort_keys=True, default=str)
    root = store_root()
    file = root / f"{info.name}-{hashlib.sha256(ident.encode()).hexdigest()[:20]}.bin"
    pieces = plan_pieces(info, num_experts, transposed, dtype, str(file))
    end = max(p.offset + p.length for s in pieces.values() for p in s.parts)
    if file.is_file() and file.stat().st_size >= end:
        return pieces
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.partial")
        _write(info, pieces, num_experts, transposed, dtype, weights, tmp, progress)
        os.replace(tmp, file)
    except OSError as e:
        raise ExpertPagerError(f"{file}: cannot write the adapter's piece store ({e.strerror or e})") from None
    return pieces


def _write(info: AdapterInfo, pieces: dict, num_experts: int, transposed: dict[int, bool], dtype: torch.dtype,
           weights: Path, tmp: Path, progress: bool) -> None:
    try:
        with safe_open(str(weights), framework="pt") as f, open(tmp, "wb") as out, \
                progress_bar(f"adapter {info.name}", len(info.expert_layers), progress) as advance:
            for layer in info.expert_layers:
                factors = {}
                for matrix in ("gate_up", "down"):
                    lora = info.experts.get((layer, matrix))
                    if lora is not None:
                        pairs = [lora.stacked] if lora.stacked is not None else [p for v in lora.per_expert.values() for p in v]
                        tensors = {t.name: f.get_tensor(t.name) for p in pairs for t in (p.a, p.b)}
                        factors[matrix] = expert_factors(lora, tensors, num_experts, transposed[layer])
                for e in range(num_experts):
                    for part in pieces[(layer, e, info.name)].parts:
                        matrix, which = part.role.split(".")
                        t = factors[matrix][e]["AB".index(which)].to(dtype).contiguous()
                        out.seek(part.offset)
                        out.write(t.view(torch.uint8).numpy().tobytes())
                advance()
            last = max(p.offset + p.length for s in pieces.values() for p in s.parts)
            out.truncate(last + -last % BLOCK)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
