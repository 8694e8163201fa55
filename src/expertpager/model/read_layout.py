"""Build a Layout from a model reference, reading headers only."""

import json
import re
from pathlib import Path

from ..errors import ExpertPagerError
from .architectures import ARCHITECTURES, GGUF_ARCHITECTURES, NUM_EXPERTS_KEYS, TOP_K_KEYS, match_expert, resident_category
from .layout import ExpertSlice, Layout, ResidentTensor, TensorPart
from .manifest import read_manifest
from .refs import ResolvedModel, resolve
from .tensors import TensorInfo, read_gguf_header, read_safetensors_header


def read_layout(ref: str | Path) -> Layout:
    """The layout of the checkpoint `ref` names (folder, .gguf, repacked folder, or cached repo id)."""
    model = resolve(str(ref))
    if model.format == "repacked":
        return read_manifest(model.path)
    return _gguf_layout(model) if model.format == "gguf" else _safetensors_layout(model)


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExpertPagerError(f"{path}: cannot read config ({e})") from None
    if not isinstance(config, dict):
        raise ExpertPagerError(f"{path}: config is not a JSON object")
    return config


def text_settings(config: dict) -> dict:
    """The text model's settings: a multimodal wrapper's `text_config` over its own keys (dtype, token ids), else
    the config itself."""
    text = config.get("text_config")
    if not isinstance(text, dict):
        return config
    outer = {k: v for k, v in config.items() if not k.endswith("_config") and k != "model_type"}
    return {**outer, **text}


def _safetensors_layout(model: ResolvedModel) -> Layout:
    config = read_config(model.path)
    model_type = config.get("model_type")
    config = text_settings(config)
    tensors = [t for f in model.files for t in read_safetensors_header(str(f))[0]]
    if model_type not in ARCHITECTURES:
        if not any(match_expert(t.name) for t in tensors):
            raise ExpertPagerError(f"{model.path}: not a mixture-of-experts model ({model_type!r} has no expert tensors)")
        raise ExpertPagerError(f"{model.path / 'config.json'}: unknown architecture {model_type!r}; "
                               f"supported: {', '.join(sorted(ARCHITECTURES))}")
    arch = ARCHITECTURES[model_type]
    model_type = arch.model_type  # a wrapper's text model saved on its own is named as the wrapper
    if arch.ignore:
        tensors = [t for t in tensors if not re.search(arch.ignore, t.name)]
    num_experts = _config_int(config, NUM_EXPERTS_KEYS, model.path)
    top_k = _config_int(config, TOP_K_KEYS, model.path)
    return _assemble("safetensors", model_type, model, tensors, config, config.get("num_hidden_layers", 0), num_experts, top_k)


def _gguf_layout(model: ResolvedModel) -> Layout:
    tensors: list[TensorInfo] = []
    metadata: dict = {}
    for part in model.files:
        part_tensors, part_meta = read_gguf_header(str(part))
        tensors += part_tensors
        metadata = metadata or part_meta
    arch = metadata.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ExpertPagerError(f"{model.path}: unknown GGUF architecture {arch!r}; supported: {', '.join(sorted(GGUF_ARCHITECTURES))}")
    get = lambda key: metadata.get(f"{arch}.{key}")  # noqa: E731
    if not get("expert_count"):
        raise ExpertPagerError(f"{model.path}: not a mixture-of-experts model ({arch}.expert_count missing or 0)")
    layers = (get("block_count") or 0) - (get("nextn_predict_layers") or 0)
    if get("nextn_predict_layers"):  # llama.cpp appends multi-token-prediction blocks: not part of the model
        tensors = [t for t in tensors if not (m := re.match(r"blk\.(\d+)\.", t.name)) or int(m.group(1)) < layers]
    return _assemble("gguf", arch, model, tensors, metadata, layers, int(get("expert_count")),
                     int(get("expert_used_count") or 0))


def _config_int(config: dict, keys: tuple[str, ...], where: Path) -> int:
    for key in keys:
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    raise ExpertPagerError(f"{where / 'config.json'}: not a mixture-of-experts config (none of {', '.join(keys)} is set)")


def _assemble(fmt: str, arch: str, model: ResolvedModel, tensors: list[TensorInfo], config: dict,
              num_layers: int, num_experts: int, top_k: int) -> Layout:
    parts: dict[tuple[int, int], list[TensorPart]] = {}
    resident: list[ResidentTensor] = []
    for t in tensors:
        matched = match_expert(t.name)
        if matched is None:
            resident.append(ResidentTensor(t.name, t.file, t.offset, t.length, t.dtype, t.shape, resident_category(t.name)))
            continue
        layer, expert, role = matched
        if expert is not None:
            parts.setdefault((layer, expert), []).append(TensorPart(role, t.file, t.offset, t.length, t.dtype, t.shape))
            continue
        if not t.shape or t.shape[0] != num_experts or t.length % num_experts:
            raise ExpertPagerError(f"{t.file}: stacked expert tensor {t.name!r} has shape {list(t.shape)}, "
                                   f"which disagrees with {num_experts} experts")
        step = t.length // num_experts
        for e in range(num_experts):
            parts.setdefault((layer, e), []).append(TensorPart(role, t.file, t.offset + e * step, step, t.dtype, t.shape[1:], stacked=True))
    if not parts:
        raise ExpertPagerError(f"{model.path}: not a mixture-of-experts model (no expert tensors found)")
    slices = {key: ExpertSlice(key[0], key[1], tuple(sorted(p, key=lambda x: (x.file, x.offset)))) for key, p in sorted(parts.items())}
    moe_layers = sorted({layer for layer, _ in slices})
    _check_complete(model.path, slices, moe_layers, num_experts)
    return Layout(fmt, arch, str(model.path), [str(f) for f in model.files], max(num_layers, moe_layers[-1] + 1),
                  moe_layers, num_experts, top_k, slices, resident, config)


def _check_complete(path: Path, slices: dict, moe_layers: list[int], num_experts: int) -> None:
    """Every MoE layer has every expert, and every expert of a layer has the same roles."""
    for layer in moe_layers:
        roles = None
        for e in range(num_experts):
            s = slices.get((layer, e))
            if s is None:
                raise ExpertPagerError(f"{path}: layer {layer} has no tensors for expert {e} of {num_experts}")
            these = sorted(p.role for p in s.parts)
            if roles is not None and these != roles:
                raise ExpertPagerError(f"{path}: layer {layer} expert {e} has tensors {these}, other experts have {roles}")
            roles = these
    extra = [k for k in slices if k[1] >= num_experts]
    if extra:
        raise ExpertPagerError(f"{path}: expert index {extra[0][1]} in layer {extra[0][0]} is past the configured {num_experts} experts")
