"""The command line shows the project's own progress only: none of transformers' "Loading weights" bars, on the
paths that load a model with transformers (paged, fully resident, simulate's routers)."""

import subprocess
import sys

import torch

from expertpager.runtime.load import load
from expertpager.tools.trace import record_trace, save_trace
from tiny_models import save_tiny


def expertpager(*args) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "expertpager", *map(str, args)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out


def test_no_transformers_bars(tmp_path):
    folder = save_tiny("qwen3_moe", tmp_path / "q", num_hidden_layers=4)
    model = load(folder)
    save_trace(record_trace(model, torch.arange(3, 40)), tmp_path / "t.npz")
    model.pager.close()
    runs = [expertpager("run", folder, "--prompt-ids", "5,6,7", "-n", "2", "--compare"),
            expertpager("simulate", tmp_path / "t.npz", "--model", folder, "--prefetch", "next-layer", "--cache", "50%",
                        "--policy", "lru")]
    for out in runs:
        assert "Loading weights" not in out.stderr and "it/s]" not in out.stderr, out.stderr
    assert "identical" in runs[0].stdout and "lru" in runs[1].stdout
