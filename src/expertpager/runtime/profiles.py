"""Domain profiles: how often each expert slice is used on a kind of text, stored as small JSON files, and the
closest profile to a prompt's own routing (cosine similarity of per-slice counts)."""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ExpertPagerError
from ..model.layout import SliceKey


def default_profiles_dir() -> Path:
    """Where `expertpager profile` writes and the domain predictor reads: $EXPERTPAGER_PROFILES or ~/.cache."""
    return Path(os.environ.get("EXPERTPAGER_PROFILES", Path.home() / ".cache" / "expertpager" / "profiles"))


@dataclass
class Profile:
    name: str
    layers: list[int]  # decoder layer of each MoE layer (row of counts)
    counts: np.ndarray  # int64 [M, E]: tokens that used expert e in MoE layer m
    tokens: int
    model: str = ""

    @property
    def frequencies(self) -> np.ndarray:
        """Share of tokens that used each slice, [M, E]."""
        return self.counts / max(self.tokens, 1)

    def hottest(self, n: int) -> list[SliceKey]:
        """The `n` most used slices, hottest first."""
        flat = np.argsort(-self.counts.reshape(-1), kind="stable")[:n]
        m, e = np.unravel_index(flat, self.counts.shape)
        return [(self.layers[i], int(j)) for i, j in zip(m.tolist(), e.tolist())]


def save_profile(profile: Profile, path: str | Path) -> None:
    """Write `profile` as JSON."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"name": profile.name, "model": profile.model, "tokens": profile.tokens,
                                      "layers": list(profile.layers), "counts": profile.counts.tolist()}))


def load_profile(path: str | Path) -> Profile:
    """Read a profile written by `save_profile`."""
    try:
        d = json.loads(Path(path).read_text())
        return Profile(d["name"], [int(x) for x in d["layers"]], np.asarray(d["counts"], dtype=np.int64),
                       int(d["tokens"]), d.get("model", ""))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExpertPagerError(f"{path}: not an expertpager profile ({e})") from None


def load_profiles(folder: str | Path, layers: list[int], num_experts: int) -> list[Profile]:
    """Profiles in `folder` (*.json) made on a model with these MoE layers and experts per layer."""
    found = [load_profile(p) for p in sorted(Path(folder).glob("*.json"))]
    return [p for p in found if p.layers == list(layers) and p.counts.shape[1] == num_experts]


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two per-slice count arrays."""
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norm) if norm else 0.0


def closest(profiles: list[Profile], counts: np.ndarray) -> tuple[Profile | None, float]:
    """The profile most like `counts` [M, E] and its cosine similarity; (None, 0.0) when there are none."""
    scored = [(similarity(p.counts, counts), i) for i, p in enumerate(profiles)]
    if not scored:
        return None, 0.0
    score, i = max(scored)
    return profiles[i], score
