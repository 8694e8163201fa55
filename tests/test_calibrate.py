"""Fitted speculators: calibrate writes a file that loads back, bad files get one clear error, the runtime's outputs
stay exact with one, and the fit recalls at least what the plain routers do."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from expertpager.errors import ExpertPagerError
from expertpager.model.demo import demo_model_path
from expertpager.runtime.load import load
from expertpager.runtime.moe_layers import moe_layers
from expertpager.runtime.speculator import SPECULATOR_FILE, find_speculator, load_speculator, save_speculator
from expertpager.tools.calibrate import calibrate
from expertpager.tools.speculation import recall_precision, speculation
from expertpager.tools.trace import load_trace
from test_paged_inference import PROMPT, assert_same, logits_trace, min_cache
from tiny_models import save_tiny

HELDOUT = Path(__file__).parent / "data" / "traces" / "demo_code_heldout.npz"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny("qwen3_moe", tmp_path_factory.mktemp("cal") / "q", num_hidden_layers=4)


@pytest.fixture(scope="module")
def fitted(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    ids = np.random.default_rng(0).integers(3, 96, 600)
    return calibrate(model, ids, ahead=2, chunk=64)


def test_calibrate_writes_a_speculator_that_loads_back(tiny, fitted, tmp_path):
    path = save_speculator(fitted, tmp_path / "s.safetensors")
    back = load_speculator(path, [0, 1, 2, 3], 32, 8)
    assert back.layers == [0, 1, 2, 3] and back.ahead == [1, 2] and back.info["tokens"] == "600"
    assert set(back.maps) == {(1, 1), (2, 1), (3, 1), (2, 2), (3, 2)}
    for key, (w, b) in fitted.maps.items():
        assert torch.equal(back.maps[key][0], w) and torch.equal(back.maps[key][1], b) and w.shape == (8, 32)
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temporary left behind


def test_a_speculator_in_use_counts_against_max_memory(fitted, tmp_path):
    folder = save_tiny("qwen3_moe", tmp_path / "q", num_hidden_layers=4)
    save_speculator(fitted, folder / SPECULATOR_FILE)
    plain = load(folder, max_memory="1200MB")
    with_maps = load(folder, max_memory="1200MB", predictors="next-layer")
    assert with_maps.speculator.nbytes == sum(w.nbytes + b.nbytes for w, b in fitted.maps.values()) > 0
    assert with_maps.memory_plan.resident_bytes == plain.memory_plan.resident_bytes + with_maps.speculator.nbytes
    plain.pager.close()
    with_maps.pager.close()


def test_bad_speculator_file_is_one_clear_error(tiny, fitted, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ExpertPagerError, match="garbage.safetensors: not a readable speculator"):
        load(tiny, predictors="next-layer", speculator=garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(ExpertPagerError, match="foreign.safetensors: bad speculator file"):
        load_speculator(foreign)
    saved = save_speculator(fitted, tmp_path / "s.safetensors")
    with pytest.raises(ExpertPagerError, match=r"s.safetensors: speculator was fitted for a model with hidden size 32"):
        load_speculator(saved, [0, 1, 2, 3], 64, 8)
    with pytest.raises(ExpertPagerError, match=r"s.safetensors: .*MoE layers \[0, 1, 2, 3\]"):
        load_speculator(saved, [0, 1, 2], 32, 8)
    with pytest.raises(ExpertPagerError, match="missing.safetensors: no such speculator file"):
        load(tiny, predictors="next-layer", speculator=tmp_path / "missing.safetensors")


def test_paged_logits_with_fitted_speculator_equal_resident(tiny, fitted, tmp_path):
    folder = save_tiny("qwen3_moe", tmp_path / "q", num_hidden_layers=4)
    save_speculator(fitted, folder / SPECULATOR_FILE)
    reference = logits_trace(AutoModelForCausalLM.from_pretrained(folder), PROMPT)
    for spec, speculator in (("next-layer", None), ("next-layer:2+1,temporal", folder / SPECULATOR_FILE)):
        model = load(folder, cache=min_cache(folder) * 2, predictors=spec, speculator=speculator)
        assert model.speculator is not None and model.speculator.ahead == [1, 2]  # found in the folder by default
        assert_same(reference, logits_trace(model, PROMPT), spec)
        stats = model.pager.stats_snapshot()
        assert stats.prefetch_issued + stats.prefetch_cancelled + stats.prefetch_dropped > 0
        model.pager.close()
    plain = load(folder, cache=min_cache(folder) * 2, predictors="next-layer", speculator=False)
    assert plain.speculator is None
    plain.pager.close()
    assert find_speculator(tiny, None, [0, 1, 2, 3], 32, 8) is None  # no file: plain routers


def test_fitted_recall_on_calibration_text_beats_plain():
    """On the demo model's learned routing, a fit on 1,024 tokens recalls more of those tokens' experts one and
    two layers ahead than the plain routers."""
    model = AutoModelForCausalLM.from_pretrained(demo_model_path()).eval()
    ids = load_trace(HELDOUT).tokens[:1024]
    spec = calibrate(model, ids, ahead=2)
    actual, plain = speculation(model, ids, lookahead=2)
    fitted = speculation(model, ids, lookahead=2, speculator=spec)[1]
    plain_recall, fitted_recall = (np.nanmean(recall_precision(actual, p)[0], 0) for p in (plain, fitted))
    assert (fitted_recall > plain_recall + 0.03).all(), (plain_recall, fitted_recall)


def test_shipped_demo_speculator_beats_plain_on_heldout_text():
    """The demo model's speculator (fitted on its training split) is found in its folder and recalls more of the
    held-out code trace's experts one layer ahead than the plain routers."""
    model = AutoModelForCausalLM.from_pretrained(demo_model_path()).eval()
    spec = find_speculator(demo_model_path(), True, [l.index for l in moe_layers(model)], 128, 64)
    ids = load_trace(HELDOUT).tokens[:512]
    actual, plain = speculation(model, ids, lookahead=1)
    fitted = speculation(model, ids, lookahead=1, speculator=spec)[1]
    plain_recall, fitted_recall = (np.nanmean(recall_precision(actual, p)[0][:, 0]) for p in (plain, fitted))
    assert fitted_recall >= 0.85 and fitted_recall > plain_recall + 0.05, (plain_recall, fitted_recall)


def test_cli_calibrate_bad_input_is_one_line(tmp_path):
    cli = [sys.executable, "-m", "expertpager", "calibrate", str(demo_model_path())]
    missing = tmp_path / "missing.txt"
    out = subprocess.run(cli + ["--input", str(missing), "--output", str(tmp_path / "s.safetensors")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and str(missing) in out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = subprocess.run(cli + ["--input", str(empty), "--output", str(tmp_path / "s.safetensors")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and str(empty) in out.stderr and out.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == [empty]


def test_cli_calibrate_writes_a_speculator(tmp_path):
    text = tmp_path / "cal.txt"
    text.write_text(Path(__file__).read_text())
    out = subprocess.run([sys.executable, "-m", "expertpager", "calibrate", str(demo_model_path()), "--input", str(text),
                          "--output", str(tmp_path / "s.safetensors"), "--max-tokens", "512", "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["tokens"] == 512 and info["ahead"] == [1] and info["recall_fitted"] >= info["recall_plain"]
    assert load_speculator(tmp_path / "s.safetensors", list(range(8)), 128, 64).ahead == [1]


def test_statistics_fit_equals_a_float64_least_squares_fit(tiny):
    """The statistics (float32 products per batch of windows, float64 sums, Gram kept as its upper triangle) give
    the ridge fit a float64 solve of the same features gives; their size is what statistics_bytes plans for."""
    from expertpager.runtime.moe_layers import rms_normalize, routed_windows
    from expertpager.tools.calibrate import collect, plain_map, solve, statistics_bytes

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    ids = np.random.default_rng(1).integers(3, 96, 700)
    stats = collect(model, ids, ahead=2, chunk=64, batch_tokens=256)  # 3 batches of 4 windows, then 60 tokens
    assert stats.tokens == 700 and not stats.features
    feats, logits = {}, {}
    for n, hidden, router in routed_windows(model, ids, 64):
        for i, h in hidden.items():
            x = rms_normalize(h).double()
            feats.setdefault(i, []).append(torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1))
            logits.setdefault(i, []).append(router[i][0].reshape(n, -1).double())
    X, Z = ({i: torch.cat(v) for i, v in d.items()} for d in (feats, logits))
    for i in X:
        assert torch.allclose(stats.gram_matrix(i), X[i].T @ X[i], rtol=1e-5, atol=1e-3)
    fits = solve(stats, 1e-3)
    assert set(fits) == {(1, 1), (2, 1), (3, 1), (2, 2), (3, 2)}
    for (target, d), (w, b) in fits.items():
        i, t = target - d, target
        prior = torch.cat([plain_map(moe_layers(model)[t]).double().T, torch.zeros(1, 8, dtype=torch.float64)])
        penalty = torch.full((33,), 1e-3 * 700, dtype=torch.float64)
        penalty[32] = 0
        want = torch.linalg.solve(X[i].T @ X[i] + torch.diag(penalty), X[i].T @ Z[t] + penalty[:, None] * prior)
        assert torch.allclose(w.double(), want[:32].T, atol=1e-4) and torch.allclose(b.double(), want[32], atol=1e-4)
    held = stats.gram.nbytes + sum(c.nbytes for c in stats.cross.values())
    assert held < statistics_bytes(4, 32, 8, 2)


def test_calibration_statistics_count_against_max_memory(tiny):
    plain = load(tiny, max_memory="1200MB")
    with_stats = load(tiny, max_memory="1200MB", extra_resident=10_000_000)
    assert with_stats.memory_plan.resident_bytes == plain.memory_plan.resident_bytes + 10_000_000
    plain.pager.close()
    with_stats.pager.close()
    with pytest.raises(ExpertPagerError, match="max_memory is too small"):
        load(tiny, max_memory="1200MB", extra_resident=10**9)
