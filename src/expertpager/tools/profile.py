"""Domain profiles from a corpus: run the model over a text, count how often each slice is used, and draw the
counts (layer x expert heatmaps) and compare two profiles."""

import numpy as np
import torch
from transformers import PreTrainedModel

from ..runtime.profiles import Profile, similarity
from .routing_stats import expert_counts
from .trace import record_trace


def build_profile(model: PreTrainedModel, input_ids: list[int], name: str, model_name: str = "") -> Profile:
    """The per-slice usage counts of `model` over `input_ids`."""
    trace = record_trace(model, torch.tensor(input_ids), domain=name)
    return Profile(name, [int(l) for l in trace.layers], expert_counts(trace), trace.num_tokens, model_name)


def compare(a: Profile, b: Profile, share: float = 0.25) -> dict:
    """How alike two profiles are: cosine similarity overall and per layer, and the Jaccard overlap of each
    layer's hottest `share` of experts."""
    n = max(1, int(round(share * a.counts.shape[1])))
    hot = lambda p, m: set(np.argsort(-p.counts[m], kind="stable")[:n].tolist())
    jaccard = [len(hot(a, m) & hot(b, m)) / len(hot(a, m) | hot(b, m)) for m in range(len(a.layers))]
    return {"a": a.name, "b": b.name, "cosine": similarity(a.counts, b.counts), "layers": a.layers,
            "layer_cosine": [similarity(a.counts[m], b.counts[m]) for m in range(len(a.layers))],
            "hot_share": share, "hot_jaccard": jaccard}


def heatmap(profiles: list[Profile], path: str) -> None:
    """One panel per profile: usage frequency per layer (rows) and expert (columns), experts in id order; with two
    profiles a third panel shows their difference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(p.name, p.frequencies, "viridis") for p in profiles]
    if len(profiles) == 2:
        panels.append((f"{profiles[0].name} - {profiles[1].name}", profiles[0].frequencies - profiles[1].frequencies, "coolwarm"))
    width = max(4.0, profiles[0].counts.shape[1] / 10)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 1.2 + 0.35 * len(profiles[0].layers) * len(panels)), squeeze=False)
    for ax, (title, data, cmap) in zip(axes[:, 0], panels):
        lim = np.abs(data).max() or 1.0
        im = ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest",
                       vmin=-lim if cmap == "coolwarm" else 0, vmax=lim)
        ax.set(title=title, xlabel="expert", ylabel="layer")
        ax.set_yticks(range(len(profiles[0].layers)), profiles[0].layers)
        fig.colorbar(im, ax=ax, label="share of tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
