"""`expertpager trace` and `expertpager eval` on the bundled demo model."""

import json
from pathlib import Path

from typer.testing import CliRunner

from expertpager.cli import app
from expertpager.tools.trace import load_trace

PROSE = Path(__file__).parent / "data" / "heldout_prose.txt"


def test_eval_paged_equals_resident(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text(PROSE.read_text()[:3000])
    runner = CliRunner()
    resident = json.loads(runner.invoke(app, ["eval", "--input", str(text), "--json"]).stdout)
    paged = json.loads(runner.invoke(app, ["eval", "--input", str(text), "--cache", "25%", "--json"]).stdout)
    assert resident == paged and resident["tokens"] > 300 and 2 < resident["loss"] < 7


def test_trace_cli_writes_a_trace(tmp_path):
    out = tmp_path / "t.npz"
    result = CliRunner().invoke(app, ["trace", "--prompt", "def add(a, b):\n    return a + b\n", "--out", str(out), "--domain", "code"])
    assert result.exit_code == 0, result.output
    t = load_trace(out)
    assert t.domain == "code" and t.experts.shape[1:] == (8, 8) and t.num_experts == 64
    assert not list(tmp_path.glob(".*partial"))
    bad = CliRunner().invoke(app, ["trace", "--out", str(out)])
    assert bad.exit_code != 0
