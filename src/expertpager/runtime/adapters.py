"""The LoRA adapters a paged model carries, one active at a time: resident LoRA (attention, dense and shared
linears) held in memory as forward hooks, expert LoRA paged as pieces through the model's own SliceCache."""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import ExpertPagerError
from ..model.adapter import WEIGHTS_FILE, AdapterInfo, ExpertLora, read_adapter
from ..model.layout import ExpertSlice, SliceKey
from .lora import LinearLora

LORA_DTYPE = torch.float32
"""What peft holds resident LoRA factors in on a float32, bfloat16 or float16 model (it upcasts 16-bit adapters)."""


class Adapters:
    """Adapters by name; `active` is the one in use (None: the base model). Choose per call with `use(name)`."""

    def __init__(self, infos: Mapping[str, AdapterInfo]):
        self.infos = dict(infos)
        self.pieces: dict[tuple, ExpertSlice] = {}  # (layer, expert, name) -> where its expert LoRA factors are
        self.resident_bytes = 0  # resident LoRA factors held in memory
        self.active: str | None = None

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    def select(self, name: str | None) -> None:
        """Make `name` the active adapter (None: none)."""
        if name is not None and name not in self.infos:
            raise ExpertPagerError(f"no adapter named {name!r}; loaded: {', '.join(self.infos) or 'none'}")
        self.active = name

    @contextmanager
    def use(self, name: str | None) -> Iterator[None]:
        """`with model.adapters.use("code"): ...`: that adapter for the block, then the one before."""
        before = self.active
        self.select(name)
        try:
            yield
        finally:
            self.active = before

    def expert_lora(self, layer: int) -> dict[str, ExpertLora]:
        """The active adapter's LoRA on `layer`'s experts, by matrix (gate_up, down); empty when none."""
        info = self.infos.get(self.active)
        if info is None:
            return {}
        return {m: lora for (l, m), lora in info.experts.items() if l == layer}

    def with_pieces(self, keys: list[SliceKey]) -> list[tuple]:
        """`keys` and, for those the active adapter adapts, its pieces (to prefetch them together)."""
        name = self.active
        return list(keys) + [(l, e, name) for l, e in keys if (l, e, name) in self.pieces]


def read_adapters(adapters: Mapping[str, str | Path], num_experts: int) -> dict[str, AdapterInfo]:
    """Each NAME -> folder read (headers only), so a bad adapter fails before the model loads."""
    return {name: read_adapter(name, path, num_experts) for name, path in adapters.items()}


def attach_resident(model: nn.Module, infos: Mapping[str, AdapterInfo], adapters: Adapters) -> int:
    """Hook every resident linear an adapter adapts (one hook per module, shared by the adapters); returns the bytes
    of the factors held."""
    hooks: dict[str, LinearLora] = {}
    total = 0
    for name, info in infos.items():
        if not info.linears:
            continue
        with safe_open(str(Path(info.path) / WEIGHTS_FILE), framework="pt") as f:
            for path, (pair, scaling) in info.linears.items():
                module = _linear(model, path, info)
                # fresh (aligned) tensors, as peft's nn.Linear weights are: a product's rounding may depend on the address
                a, b = (f.get_tensor(t.name).to(LORA_DTYPE, copy=True) for t in (pair.a, pair.b))
                if a.shape[1] != module.in_features or b.shape[0] != module.out_features or b.shape[1] != a.shape[0]:
                    raise ExpertPagerError(f"{info.path}: LoRA of {path} has A {list(a.shape)} and B {list(b.shape)}, which do "
                                           f"not fit the model's {module.in_features} -> {module.out_features} linear")
                if path not in hooks:
                    hooks[path] = LinearLora(lambda: adapters.active)
                    module.register_forward_hook(hooks[path])
                hooks[path].loras[name] = (a, b, scaling)
                total += (a.numel() + b.numel()) * a.element_size()
    return total


def _linear(model: nn.Module, path: str, info: AdapterInfo) -> nn.Linear:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        raise ExpertPagerError(f"{info.path}: the adapter targets {path!r}, which is not a linear layer of this model")
    return module
