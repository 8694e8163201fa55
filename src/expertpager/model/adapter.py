"""What a PEFT LoRA adapter is, from its adapter_config.json and safetensors header (no tensor data): LoRA on resident
linears (by module path) and on experts, either peft's `target_parameters` on the fused experts matrices
(gate_up_proj, down_proj) or the older per-expert modules (gate_proj/up_proj/down_proj, w1/w3/w2), each with its rank
and scaling as peft computes them."""

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ExpertPagerError
from .tensors import TensorInfo, read_safetensors_header

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
"""Parameters of transformers' experts modules that `target_parameters` may adapt, in the order the modules register
them: peft wraps the first one targeted innermost, so its keys carry the most `.base_layer`."""
PER_EXPERT_ROLES = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA biases", "modules_to_save": "modules_to_save",
               "trainable_token_indices": "trainable tokens", "layer_replication": "layer replication"}

STACKED_KEY = re.compile(r"^(.*\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts)((?:\.base_layer)*)\.lora_([AB])\.weight$")
PER_EXPERT_KEY = re.compile(r"^(.*\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts)\.(\d+)\.(\w+)\.lora_([AB])\.weight$")
LINEAR_KEY = re.compile(r"^(.*)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class LoraPair:
    """One LoRA update: delta W = scaling * B @ A, A [rank (x experts), in], B [out, rank (x experts)]."""

    a: TensorInfo
    b: TensorInfo


@dataclass(frozen=True)
class ExpertLora:
    """LoRA on one experts matrix ("gate_up" or "down") of one layer. `stacked`: peft's target_parameters tensors,
    A [E*rank, in] and B [out, E*rank]. `per_expert[e]`: an older adapter's pairs for expert e (gate then up for
    gate_up), which peft fuses as it loads them: A concatenated along the rank, B block-diagonal, rank and alpha
    doubled."""

    layer: int
    matrix: str
    rank: int
    scaling: float
    stacked: LoraPair | None = None
    per_expert: dict[int, tuple[LoraPair, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterInfo:
    """A LoRA adapter: `linears` maps a resident module path (as in the transformers model) to its pair and scaling;
    `experts` maps (layer, matrix) to its expert LoRA."""

    name: str
    path: str
    config: dict
    linears: dict[str, tuple[LoraPair, float]]
    experts: dict[tuple[int, str], ExpertLora]

    @property
    def expert_layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.experts})


def scaling(config: dict, key: str, rank: int | None = None, alpha: float | None = None) -> tuple[int, float]:
    """(rank, scaling) of the target `key` as peft computes them: rank_pattern / alpha_pattern (a pattern matches
    when the key ends with it after a dot), then alpha / rank, or alpha / sqrt(rank) with use_rslora."""
    if rank is None:
        rank = _pattern(config.get("rank_pattern") or {}, key, config["r"])
    if alpha is None:
        alpha = _pattern(config.get("alpha_pattern") or {}, key, config["lora_alpha"])
    return rank, alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _pattern(patterns: dict, key: str, default):
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def read_adapter_config(folder: Path) -> dict:
    """adapter_config.json, checked for what the runtime computes: plain LoRA (no DoRA, biases, extra modules)."""
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExpertPagerError(f"{path}: cannot read adapter config ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ExpertPagerError(f"{path}: not a LoRA adapter (peft_type {config.get('peft_type') if isinstance(config, dict) else None!r})")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise ExpertPagerError(f"{path}: {what} is not supported (only plain LoRA)")
    if config.get("fan_in_fan_out"):
        raise ExpertPagerError(f"{path}: fan_in_fan_out adapters (Conv1D models) are not supported")
    if not isinstance(config.get("r"), int) or not isinstance(config.get("lora_alpha"), (int, float)):
        raise ExpertPagerError(f"{path}: r and lora_alpha must be numbers")
    return config


def read_adapter(name: str, ref: str | Path, num_experts: int) -> AdapterInfo:
    """The adapter in folder `ref` (adapter_config.json + adapter_model.safetensors), for a base model with
    `num_experts` experts per layer; headers only."""
    folder = Path(ref)
    if not folder.is_dir():
        raise ExpertPagerError(f"{folder}: no such adapter folder (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = read_adapter_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ExpertPagerError(f"{weights}: missing (only safetensors adapters are read)")
    tensors, _ = read_safetensors_header(str(weights))
    pairs: dict[str, dict[str, TensorInfo]] = {}
    for t in tensors:
        key = t.name.removeprefix("base_model.model.")
        m = LINEAR_KEY.match(key)
        if m is None:
            raise ExpertPagerError(f"{weights}: tensor {t.name!r} is not a LoRA A/B weight")
        if len(t.shape) != 2:
            raise ExpertPagerError(f"{weights}: tensor {t.name!r} has shape {list(t.shape)}, expected 2 dimensions")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ExpertPagerError(f"{weights}: {module} has lora_{'A' if 'A' in ab else 'B'} but not its partner")
    linears, experts, per_expert = {}, {}, {}
    for module, ab in sorted(pairs.items()):
        pair = LoraPair(ab["A"], ab["B"])
        stacked, single = STACKED_KEY.match(module + ".lora_A.weight"), PER_EXPERT_KEY.match(module + ".lora_A.weight")
        if stacked:
            experts.update(_stacked(weights, config, stacked, pair, pairs, num_experts))
        elif single and single.group(4) in PER_EXPERT_ROLES:
            layer, expert, role = int(single.group(2)), int(single.group(3)), PER_EXPERT_ROLES[single.group(4)]
            per_expert.setdefault((single.group(1), layer), {}).setdefault(expert, {})[role] = pair
        else:
            linears[module] = (pair, scaling(config, module, pair.a.shape[0])[1])
    for (module, layer), by_expert in per_expert.items():
        experts.update(_per_expert(weights, config, module, layer, by_expert, num_experts))
    return AdapterInfo(name, str(folder), config, linears, experts)


def _targets(config: dict, module: str) -> list[str]:
    """The experts parameters of `module` that the config's target_parameters adapt, in registration order."""
    wanted = config.get("target_parameters") or []
    return [p for p in EXPERT_PARAMS if any(f"{module}.{p}" == t or f"{module}.{p}".endswith("." + t) for t in wanted)]


def _stacked(weights: Path, config: dict, m: re.Match, pair: LoraPair, pairs: dict, num_experts: int) -> dict:
    module, layer, depth = m.group(1), int(m.group(2)), m.group(3).count(".base_layer")
    targets = _targets(config, module)
    if depth >= len(targets):
        raise ExpertPagerError(f"{weights}: {module}{m.group(3)} has LoRA weights but target_parameters "
                               f"{config.get('target_parameters')} name only {len(targets)} parameter(s) of it")
    param = targets[len(targets) - 1 - depth]  # the first targeted is wrapped innermost
    rank = pair.a.shape[0] // num_experts
    if rank * num_experts != pair.a.shape[0] or pair.b.shape[1] != pair.a.shape[0]:
        raise ExpertPagerError(f"{weights}: LoRA of {module}.{param} has A {list(pair.a.shape)} and B {list(pair.b.shape)}, "
                               f"not [experts x rank, in] and [out, experts x rank] for {num_experts} experts")
    key = f"{module}.{param}"
    want, s = scaling(config, key)
    if want != rank:
        raise ExpertPagerError(f"{weights}: LoRA of {key} has rank {rank}, but adapter_config.json says {want}")
    return {(layer, param.removesuffix("_proj")): ExpertLora(layer, param.removesuffix("_proj"), rank, s, stacked=pair)}


def _per_expert(weights: Path, config: dict, module: str, layer: int, by_expert: dict, num_experts: int) -> dict:
    """An older adapter's per-expert pairs of one layer, as peft fuses them for transformers' fused experts."""
    if sorted(by_expert) != list(range(num_experts)):
        raise ExpertPagerError(f"{weights}: {module} has LoRA weights for experts {sorted(by_expert)}, not all {num_experts}")
    roles = {frozenset(v) for v in by_expert.values()}
    if len(roles) != 1:
        raise ExpertPagerError(f"{weights}: {module}: experts are adapted on different projections")
    have = next(iter(roles))
    if ("gate" in have) != ("up" in have):
        raise ExpertPagerError(f"{weights}: {module}: gate and up are fused in the model; an adapter must target both or neither")
    out = {}
    r, alpha = config["r"], config["lora_alpha"]
    if "gate" in have:
        rank, s = scaling(config, f"{module}.gate_up_proj", 2 * r, 2 * alpha)
        out[(layer, "gate_up")] = ExpertLora(layer, "gate_up", rank, s,
                                             per_expert={e: (v["gate"], v["up"]) for e, v in by_expert.items()})
    if "down" in have:
        rank, s = scaling(config, f"{module}.down_proj")
        out[(layer, "down")] = ExpertLora(layer, "down", rank, s, per_expert={e: (v["down"],) for e, v in by_expert.items()})
    for lora in out.values():
        for pairs in lora.per_expert.values():
            if sum(p.a.shape[0] for p in pairs) != lora.rank:
                raise ExpertPagerError(f"{weights}: {module}: LoRA rank {pairs[0].a.shape[0]} disagrees with adapter_config.json")
    return out
