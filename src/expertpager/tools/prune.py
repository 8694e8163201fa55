"""Write a pruned checkpoint: in every MoE layer only the kept experts, renumbered in their original order, with the
router's rows (and its bias or e_score_correction_bias) sliced to match and the expert count reduced, as a standard
HF folder or GGUF that transformers and llama.cpp load unmodified; plus a JSON map from new to original expert ids
with the scores. Everything is written under a temporary name and renamed at the end."""

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import ExpertPagerError
from ..model.architectures import NUM_EXPERTS_KEYS, match_expert, resident_category
from ..model.layout import Layout
from ..model.read_layout import read_layout
from ..progress import progress_bar
from ..runtime.load import load
from ..runtime.profiles import Profile
from .export_gguf import EXPORT_TYPES, export_gguf
from .prune_scores import check_method, collect_stats, expert_scores, kept_experts, parse_keep
from .repack import COPIED_SUFFIXES

INDEX = "model.safetensors.index.json"
WINDOW = 256  # calibration tokens per independent window
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
EXPERT_ID = re.compile(r"(\.experts\.)(\d+)(\.)")
GGUF_SLICED = re.compile(r"^blk\.(\d+)\.(?:ffn_(?:gate|up|down|gate_up)_exps|ffn_gate_inp|exp_probs_b)\.(?:weight|bias)$")


def mapping_path(out: str | Path) -> Path:
    """Where the new-to-original expert map goes: `pruning.json` in an HF folder, `NAME.pruning.json` beside a GGUF."""
    out = Path(out)
    return out.with_name(out.stem + ".pruning.json") if out.suffix == ".gguf" else out / "pruning.json"


def check_prunable(layout: Layout, out: str | Path, out_type: str = "f32") -> None:
    """Fail before any work when `layout` cannot be pruned into `out` (an HF input to a GGUF in `out_type`)."""
    out = Path(out)
    if out.suffix == ".gguf" and layout.format != "gguf" and out_type.lower() not in EXPORT_TYPES:
        raise ExpertPagerError(f"unknown GGUF type {out_type!r}; use one of {', '.join(EXPORT_TYPES)}")
    if out.exists():
        raise ExpertPagerError(f"{out}: already exists; prune writes a new {'file' if out.suffix == '.gguf' else 'folder'}")
    if not out.parent.is_dir():
        raise ExpertPagerError(f"{out}: its folder {out.parent} does not exist")
    if layout.format == "repacked":
        raise ExpertPagerError(f"{layout.path}: prune the checkpoint it was repacked from, not the repacked folder")
    if layout.format == "gguf" and out.suffix != ".gguf":
        raise ExpertPagerError(f"{layout.path}: a GGUF prunes to a GGUF: give --out NAME.gguf")
    if layout.format == "gguf" and len(layout.files) > 1:
        raise ExpertPagerError(f"{layout.path}: pruning a split GGUF is not supported; merge it first (llama-gguf-split --merge)")
    if int(layout.config.get("n_group") or 1) > 1:
        raise ExpertPagerError(f"{layout.path}: grouped top-k routing (n_group {layout.config['n_group']}) assumes "
                               "equal expert groups, which pruning by score breaks")
    if layout.format == "gguf" and _gguf_int(layout, "expert_group_count") > 1:
        raise ExpertPagerError(f"{layout.path}: grouped top-k routing (expert_group_count > 1) cannot be pruned by score")


def _gguf_int(layout: Layout, key: str) -> int:
    field = gguf.GGUFReader(layout.path).fields.get(f"{layout.architecture}.{key}")
    return int(field.contents()) if field is not None else 0


@contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A temporary sibling of `out` to write into, renamed to `out` when the block ends without error."""
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def _hf_tensor(name: str, shape: list[int], layout: Layout, kept: dict[int, list[int]]
               ) -> tuple[str, list[int] | None] | None:
    """What becomes of one HF tensor: (new name, rows of its first axis to keep, or None for all), or None to drop."""
    expert = match_expert(name)
    if expert is not None:
        layer, e, _ = expert
        if e is None:  # all experts of the layer stacked along the first axis
            return name, kept[layer]
        if e not in kept[layer]:
            return None
        return EXPERT_ID.sub(lambda m: f"{m[1]}{kept[layer].index(e)}{m[3]}", name, count=1), None
    layer = LAYER.search(name)
    if layer and int(layer[1]) in kept and resident_category(name) == "router" and shape[:1] == [layout.num_experts]:
        return name, kept[int(layer[1])]
    return name, None


def write_hf(layout: Layout, kept: dict[int, list[int]], out: Path, progress: bool = True,
             mapping: dict | None = None) -> None:
    """The pruned HF folder: shard by shard (only the kept slices of one shard in memory), the config's expert count
    set, the index renamed, tokenizer and generation files copied, and `mapping` as pruning.json."""
    keep = len(next(iter(kept.values())))
    total = sum(len(safe_open(f, "np").keys()) for f in layout.files)
    with _staged(out) as tmp, progress_bar(f"prune -> {out.name}", total, progress) as advance:
        tmp.mkdir()
        weight_map, size = {}, 0
        for f in layout.files:
            tensors = {}
            with safe_open(f, "pt") as st:
                for name in st.keys():
                    part = st.get_slice(name)
                    plan = _hf_tensor(name, list(part.get_shape()), layout, kept)
                    if plan is not None:
                        new, rows = plan
                        t = st.get_tensor(name) if rows is None else st.get_tensor(name)[rows]
                        tensors[new] = t.contiguous()
                        weight_map[new] = Path(f).name
                        size += t.numel() * t.element_size()
                    advance()
                metadata = st.metadata()
            save_file(tensors, tmp / Path(f).name, metadata=metadata)
        if (Path(layout.path) / INDEX).exists():
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2))
        config = json.loads((Path(layout.path) / "config.json").read_text())
        for key in NUM_EXPERTS_KEYS:
            if key in config:
                config[key] = keep
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in Path(layout.path).iterdir():
            if f.is_file() and f.suffix in COPIED_SUFFIXES and f.name not in ("config.json", INDEX, "pruning.json"):
                shutil.copyfile(f, tmp / f.name)
        if mapping is not None:
            (tmp / "pruning.json").write_text(json.dumps(mapping, indent=1))


def write_gguf(layout: Layout, kept: dict[int, list[int]], out: Path, progress: bool = True) -> None:
    """The pruned GGUF from a GGUF: every key copied but `<arch>.expert_count`; expert tensors, router rows and
    `exp_probs_b` sliced along the expert axis; other tensors copied as stored."""
    reader = gguf.GGUFReader(layout.path)
    arch = layout.architecture
    keep = len(next(iter(kept.values())))
    w = gguf.GGUFWriter(None, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = keep if field.name == f"{arch}.expert_count" else field.contents()
        w.add_key_value(field.name, value, kind, sub_type=sub)
    tensors = []
    for t in reader.tensors:
        m = GGUF_SLICED.match(t.name)
        data = t.data[kept[int(m[1])]] if m and t.data.shape[0] == layout.num_experts else t.data
        tensors.append(data)
        w.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, t.tensor_type)
    with _staged(out) as tmp, progress_bar(f"prune -> {out.name}", len(tensors), progress) as advance:
        try:
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for data in tensors:
                w.write_tensor_data(np.ascontiguousarray(data))
                advance()
            w.flush()
            os.fsync(w.fout[0].fileno())
        finally:
            w.close()


def write_pruned(layout: Layout, kept: dict[int, list[int]], out: str | Path, mapping: dict, out_type: str = "f32",
                 progress: bool = True) -> Path:
    """Write `layout` with only `kept[layer]` experts to `out`: an HF folder, or a .gguf (sliced from a GGUF, or from
    an HF checkpoint through a pruned HF folder and `export_gguf` with `out_type`); and `mapping` (mapping_path)."""
    out = Path(out)
    check_prunable(layout, out, out_type)
    if out.suffix != ".gguf":
        write_hf(layout, kept, out, progress, mapping)
        return out
    if layout.format == "gguf":
        write_gguf(layout, kept, out, progress)
    else:
        folder = out.with_name(f".{out.name}.hf")
        shutil.rmtree(folder, ignore_errors=True)
        try:
            write_hf(layout, kept, folder, progress)
            export_gguf(folder, out, out_type, progress)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    with _staged(mapping_path(out)) as tmp:
        tmp.write_text(json.dumps(mapping, indent=1))
    return out


def prune(model_ref: str | Path, token_ids: list[int] | None, keep: str, method: str, out: str | Path,
          profile: Profile | None = None, seed: int = 0, cache: str | None = None, out_type: str = "f32",
          progress: bool = True) -> dict:
    """Prune `model_ref` to `keep` experts per MoE layer ('75%' or a count) by `method`, scoring on `token_ids` run
    through the paged runtime with an expert cache of `cache` (default: every slice fits), and write `out`.
    Returns the mapping written beside it."""
    layout = read_layout(model_ref)
    n = parse_keep(keep, layout.num_experts, layout.experts_per_token)
    check_method(method)
    check_prunable(layout, out, out_type)
    stats = None
    if method != "random":
        if not token_ids:
            raise ExpertPagerError(f"--method {method} needs calibration text (--input FILE)")
        model = load(model_ref, cache=cache)
        try:
            with progress_bar("scoring experts", -(-len(token_ids) // WINDOW), progress) as advance:
                stats = collect_stats(model, token_ids, WINDOW, on_window=advance)
        finally:
            model.pager.close()
    scores = expert_scores(stats, method, layout.moe_layers, layout.num_experts, seed, profile)
    kept = dict(zip(layout.moe_layers, kept_experts(scores, n)))
    mapping = {"source": str(layout.path), "method": method, "keep": n, "num_experts": layout.num_experts,
               "experts_per_token": layout.experts_per_token, "seed": seed if method == "random" else None,
               "per_domain": profile.name if profile is not None else None,
               "calibration_tokens": stats.tokens if stats is not None else 0,
               "layers": [{"layer": layer, "kept": kept[layer], "scores": scores[m].tolist(),
                           **({"counts": stats.counts[m].tolist()} if stats is not None else {})}
                          for m, layer in enumerate(layout.moe_layers)]}
    write_pruned(layout, kept, out, mapping, out_type, progress)
    return mapping
