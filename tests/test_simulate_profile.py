"""simulate and profile: real traces and models through the real pager policies, CLI output, plots."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from expertpager.cli import app
from expertpager.errors import ExpertPagerError
from expertpager.model.read_layout import read_layout
from expertpager.pager import Step, replay, replay_steps
from expertpager.runtime.load import load
from expertpager.runtime.profiles import load_profile, save_profile
from expertpager.tools.profile import build_profile, compare, heatmap
from expertpager.tools.simulate import simulate, trace_steps
from expertpager.tools.speculation import recall_precision, speculation
from expertpager.tools.skewed_routing import skewed_trace
from expertpager.tools.trace import record_trace, save_trace
from tiny_models import save_tiny

PNG = b"\x89PNG"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny("qwen3_moe", tmp_path_factory.mktemp("tiny_sim") / "q", num_hidden_layers=4)


def test_steps_without_prefetch_replay_like_single_pins():
    trace = skewed_trace(40, 3, 16, 2, seed=1)
    steps = trace_steps(trace)
    flat = [k for s in steps for k in s.keys]
    for policy in ("lru", "lfu", "cycle", "belady"):
        a, b = replay(flat, 4096, 12 * 4096, policy, 2), replay_steps(steps, 4096, 12 * 4096, policy, 2)
        assert a.misses + a.hits == b.misses + b.hits == len(flat)
        assert b.misses >= replay_steps(steps, 4096, 12 * 4096, "belady", 2).misses


def test_warmup_steps_are_replayed_but_not_counted():
    trace = skewed_trace(40, 3, 16, 2, seed=2)
    steps = trace_steps(trace, "temporal")
    for policy in ("lru", "cycle"):  # online policies: the first steps decide the same with or without the rest
        full, head = replay_steps(steps, 4096, 12 * 4096, policy, 2), replay_steps(steps[:30], 4096, 12 * 4096, policy, 2)
        tail = replay_steps(steps, 4096, 12 * 4096, policy, 2, warmup=30)
        assert (tail.hits, tail.misses, tail.bytes_read) == (full.hits - head.hits, full.misses - head.misses,
                                                             full.bytes_read - head.bytes_read)
        assert tail.prefetch_issued == full.prefetch_issued - head.prefetch_issued
    assert replay_steps(steps, 4096, 12 * 4096, "belady", 2, warmup=len(steps)).misses == 0


def test_perfect_prefetch_leaves_only_first_use_misses():
    keys = [[(0, 0), (0, 1)], [(1, 2), (1, 3)], [(0, 4), (0, 5)], [(1, 6), (1, 7)]]
    steps = [Step(tuple(k), tuple(keys[i + 1]) if i + 1 < len(keys) else ()) for i, k in enumerate(keys)]
    r = replay_steps(steps, 4096, 4 * 4096, "lru", 2)
    assert (r.misses, r.hits, r.prefetch_issued, r.prefetch_hits) == (2, 6, 6, 6)
    assert replay_steps([Step(s.keys) for s in steps], 4096, 4 * 4096, "lru", 2).misses == 8


def test_simulate_cli_json_and_plot(tmp_path, tiny):
    path = tmp_path / "syn.npz"
    save_trace(skewed_trace(64, 4, 8, 2), path)
    plot = tmp_path / "hit.png"
    out = CliRunner().invoke(app, ["simulate", str(path), "--cache", "30%,60%", "--prefetch", "none,temporal",
                                   "--json", "--plot", str(plot)])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)["rows"]
    assert {(r["policy"], r["prefetch"]) for r in rows} >= {("lru", "none"), ("cycle", "temporal"), ("belady", "none")}
    assert len(rows) == 2 * (3 * 2 + 1)
    for r in rows:
        assert {"policy", "cache_fraction", "hit_rate", "bytes_per_token"} <= r.keys() and 0 <= r["hit_rate"] <= 1
    best = {f: min(r["misses"] for r in rows if r["cache_fraction"] == f) for f in (0.3, 0.6)}
    assert all(r["misses"] == best[r["cache_fraction"]] for r in rows if r["policy"] == "belady")
    assert plot.read_bytes()[:4] == PNG


def test_simulate_figure_has_a_bytes_panel():
    """Below each trace's hit rates, the bytes read per token of the same rows; Belady labelled as the bound for
    demand loading only (prefetching policies can beat its hit rate, at the price of more bytes)."""
    from expertpager.tools.simulate import figure, simulate

    rows = simulate({"syn": skewed_trace(64, 4, 8, 2)}, [0.3, 0.6], ["lru", "belady"], ["none", "temporal"], 4096)
    fig = figure(rows)
    hits, reads = fig.axes
    assert (hits.get_ylabel(), reads.get_ylabel()) == ("hit rate", "MB read per token")
    for ax, field, scale in ((hits, "hit_rate", 1), (reads, "bytes_per_token", 1e-6)):
        lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
        assert set(lines) == {"lru", "lru + temporal", "belady (demand-only bound)"}
        want = [getattr(r, field) * scale for r in rows if (r.policy, r.prefetch) == ("lru", "temporal")]
        assert lines["lru + temporal"] == pytest.approx(want)
    assert max(reads.get_lines()[0].get_ydata()) > 0


def test_next_layer_simulation_uses_the_model(tmp_path, tiny):
    model = load(tiny)
    ids = torch.arange(3, 60)
    trace = record_trace(model, ids)
    save_trace(trace, tmp_path / "t.npz")
    actual, predicted = speculation(model, trace.tokens, lookahead=2, extra=1)
    assert np.array_equal(np.sort(actual, -1), np.sort(trace.experts.astype(np.int64), -1))
    recall, precision = recall_precision(actual, predicted)
    assert np.isnan(recall[0]).all() and 0 <= np.nanmin(recall) and np.nanmax(precision) <= 1
    one_ahead = speculation(model, trace.tokens, lookahead=1)[1]
    assert np.array_equal(one_ahead[:, :, 0], predicted[:, :, 0, :2])
    rows = simulate({"t": trace}, [0.5], ["lru"], ["next-layer", "next-layer-1"], read_layout(tiny).slices,
                    {"t": one_ahead})
    assert rows[0].prefetch_issued > rows[1].prefetch_issued > 0
    steps = trace_steps(trace, "next-layer-1", one_ahead)
    m = len(trace.layers)
    assert steps[0].prefetch == ((trace.layers[1], one_ahead[0, 0, 0, 0]),) and steps[m - 1].prefetch == ()
    with pytest.raises(ExpertPagerError, match="unknown prefetch 'next-layer-2'"):
        simulate({"t": trace}, [0.5], ["lru"], ["next-layer-2"], read_layout(tiny).slices, {"t": one_ahead})
    out = CliRunner().invoke(app, ["simulate", str(tmp_path / "t.npz"), "--model", str(tiny), "--prefetch",
                                   "next-layer", "--cache", "50%", "--policy", "lru", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["rows"][0]["hit_rate"] == rows[0].hit_rate
    model.pager.close()


def test_profiles_heatmap_and_compare(tmp_path, tiny):
    model = load(tiny)
    a = build_profile(model, list(range(3, 40)), "low", str(tiny))
    b = build_profile(model, list(range(50, 90)), "high", str(tiny))
    model.pager.close()
    assert a.counts.sum() == a.tokens * 2 * len(a.layers)
    save_profile(a, tmp_path / "low.json")
    save_profile(b, tmp_path / "high.json")
    assert np.array_equal(load_profile(tmp_path / "low.json").counts, a.counts)
    info = compare(a, a)
    assert info["cosine"] == pytest.approx(1.0) and all(j == 1.0 for j in info["hot_jaccard"])
    heatmap([a], str(tmp_path / "a.png"))
    assert (tmp_path / "a.png").read_bytes()[:4] == PNG
    out = CliRunner().invoke(app, ["profile", "--compare", "low,high", "--out", str(tmp_path), "--json"])
    assert out.exit_code == 0, out.output
    got = json.loads(out.stdout)
    assert got["cosine"] == pytest.approx(compare(a, b)["cosine"]) and len(got["hot_jaccard"]) == len(a.layers)
    assert (tmp_path / "low-vs-high.png").read_bytes()[:4] == PNG


def test_cycle_policy_survives_its_weight_rescaling():
    """LayerCycle rescales its decayed counts after about 3,600 tokens; its heaps must still hold every slice."""
    trace = skewed_trace(4000, 2, 6, 1, seed=3)
    steps = trace_steps(trace)
    cycle = replay_steps(steps, 4096, 3 * 4096, "cycle", 1)
    assert cycle.hits + cycle.misses == 4000 * 2
    assert cycle.misses >= replay_steps(steps, 4096, 3 * 4096, "belady", 1).misses


def test_profile_cli_on_the_demo_model(tmp_path):
    from expertpager.model.demo import demo_model_path

    text = (Path(__file__).parent / "data" / "heldout_prose.txt").read_text()[:1500]
    (tmp_path / "prose.txt").write_text(text)
    out = CliRunner().invoke(app, ["profile", str(demo_model_path()), "--input", str(tmp_path / "prose.txt"),
                                   "--name", "prose", "--out", str(tmp_path / "profiles"), "--json"])
    assert out.exit_code == 0, out.output
    info = json.loads(out.stdout)
    p = load_profile(info["profile"])
    assert p.name == "prose" and p.tokens == info["tokens"] > 100 and p.counts.shape == (8, 64)
    assert p.counts.sum() == p.tokens * 8 * 8
    assert Path(info["heatmap"]).read_bytes()[:4] == PNG
