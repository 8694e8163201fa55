"""Fitted speculators: per MoE layer, a linear map from an earlier layer's normalised residual stream to this
layer's router logits, fitted on calibration text (`expertpager calibrate`, tools/calibrate.py), which next-layer
speculation uses in place of the plain router when a model has one.

File format: a safetensors file with, for each target MoE layer L and look-ahead distance D (in MoE layers),
`layers.L.ahead.D.weight` [E, H] and `layers.L.ahead.D.bias` [E] (float32), and metadata `format`
("expertpager-speculator"), `model_type`, `hidden_size`, `num_experts`, `layers` (the model's MoE layer indices,
JSON), `ahead` (the distances, JSON), `tokens` (calibration tokens) and `shrink` (the ridge strength).
"""

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import ExpertPagerError
from ..model.refs import SIDECAR_FILES

SPECULATOR_FILE = SIDECAR_FILES[0]
FORMAT = "expertpager-speculator"
KEY = re.compile(r"^layers\.(\d+)\.ahead\.(\d+)\.(weight|bias)$")


@dataclass
class Speculator:
    """Fitted maps keyed by (target decoder layer index, distance in MoE layers): (weight [E, H], bias [E])."""

    maps: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]
    layers: list[int]
    hidden_size: int
    num_experts: int
    model_type: str = ""
    info: dict = field(default_factory=dict)  # calibration facts: tokens, shrink
    path: Path | None = None

    @property
    def nbytes(self) -> int:
        """Bytes its maps take in memory."""
        return sum(w.nbytes + b.nbytes for w, b in self.maps.values())

    def get(self, target: int, distance: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The map predicting layer `target`'s router logits from the MoE layer `distance` before it, if fitted."""
        return self.maps.get((target, distance))

    @property
    def ahead(self) -> list[int]:
        return sorted({d for _, d in self.maps})


def default_speculator_path(model_path: str | Path) -> Path:
    """Where a model's speculator lives: `speculator.safetensors` in its folder (beside a single-file model)."""
    p = Path(model_path)
    return (p if p.is_dir() else p.parent) / SPECULATOR_FILE


def save_speculator(spec: Speculator, path: str | Path) -> Path:
    """Write `spec` to `path` through a temporary name, so a failed write leaves nothing half-written."""
    path = Path(path)
    tensors = {}
    for (target, d), (w, b) in sorted(spec.maps.items()):
        tensors[f"layers.{target}.ahead.{d}.weight"] = w.float().contiguous()
        tensors[f"layers.{target}.ahead.{d}.bias"] = b.float().contiguous()
    meta = {"format": FORMAT, "model_type": spec.model_type, "hidden_size": str(spec.hidden_size),
            "num_experts": str(spec.num_experts), "layers": json.dumps(spec.layers), "ahead": json.dumps(spec.ahead),
            **{k: str(v) for k, v in spec.info.items()}}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates its files private; give it a normal file's mode
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ExpertPagerError(f"{path}: cannot write the speculator ({e})") from None
    return path


def load_speculator(path: str | Path, layers: list[int] | None = None, hidden_size: int | None = None,
                    num_experts: int | None = None) -> Speculator:
    """Read a speculator file and check it against the model's MoE layers and geometry when given; any problem is
    one ExpertPagerError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ExpertPagerError(f"{path}: no such speculator file")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as e:
        raise ExpertPagerError(f"{path}: not a readable speculator file ({e})") from None
    try:
        if meta.get("format") != FORMAT:
            raise ValueError(f"metadata format is {meta.get('format')!r}, expected {FORMAT!r}")
        spec = Speculator({}, [int(l) for l in json.loads(meta["layers"])], int(meta["hidden_size"]),
                          int(meta["num_experts"]), meta.get("model_type", ""),
                          {k: meta[k] for k in ("tokens", "shrink") if k in meta}, path)
        parts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            m = KEY.match(name)
            if not m:
                raise ValueError(f"unexpected tensor {name}")
            parts.setdefault((int(m.group(1)), int(m.group(2))), {})[m.group(3)] = t.float()
        for (target, d), p in parts.items():
            if set(p) != {"weight", "bias"} or p["weight"].shape != (spec.num_experts, spec.hidden_size) \
                    or p["bias"].shape != (spec.num_experts,) or target not in spec.layers:
                raise ValueError(f"layer {target} distance {d}: weight {tuple(p.get('weight', torch.empty(0)).shape)}"
                                 f" and bias {tuple(p.get('bias', torch.empty(0)).shape)} do not fit "
                                 f"{spec.num_experts} experts x hidden {spec.hidden_size}")
            spec.maps[(target, d)] = (p["weight"], p["bias"])
    except (KeyError, ValueError) as e:
        raise ExpertPagerError(f"{path}: bad speculator file ({e})") from None
    want = {"MoE layers": (layers, spec.layers), "hidden size": (hidden_size, spec.hidden_size),
            "experts per layer": (num_experts, spec.num_experts)}
    for what, (model, stored) in want.items():
        if model is not None and model != stored:
            raise ExpertPagerError(f"{path}: speculator was fitted for a model with {what} {stored}, this model has "
                                   f"{model}; run `expertpager calibrate` for this model")
    return spec


def find_speculator(model_path: str | Path, speculator: "str | Path | Speculator | bool | None",
                    layers: list[int], hidden_size: int, num_experts: int) -> Speculator | None:
    """The speculator to use: None or True: the model folder's `speculator.safetensors` when present (True: it
    must be); a path: that file; a Speculator: itself; False or 'none': the plain routers."""
    if speculator is False or speculator == "none":
        return None
    if isinstance(speculator, Speculator):
        return speculator
    if speculator is None or speculator is True:
        path = default_speculator_path(model_path)
        if not path.exists():
            if speculator:
                raise ExpertPagerError(f"{path}: no speculator file; run `expertpager calibrate`")
            return None
    else:
        path = Path(speculator)
    return load_speculator(path, layers, hidden_size, num_experts)
