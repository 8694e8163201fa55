"""`expertpager run`: JSON output, compare mode, and one-line errors."""

import json

import pytest
from typer.testing import CliRunner

from expertpager.cli import app
from tiny_models import save_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny("qwen3_moe", tmp_path_factory.mktemp("m") / "qwen3_moe")


def invoke(*args):
    return CliRunner().invoke(app, ["run", *map(str, args)])


def test_run_json_has_tokens_and_stats(tiny):
    result = invoke(tiny, "--prompt-ids", "5,6,7,8", "-n", "6", "--cache", "30%", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert len(out["tokens"]) == 6 and out["text"] is None
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "hit_rate", "bytes_read", "stall_seconds",
                "peak_rss_bytes", "cache_bytes", "resident_bytes"):
        assert key in out["stats"]
    assert out["stats"]["bytes_read"] > 0 and 0 < out["stats"]["hit_rate"] < 1


def test_compare_reports_identical_tokens(tiny):
    result = invoke(tiny, "--prompt-ids", "5,6,7,8", "-n", "8", "--cache", "30%", "--policy", "cycle", "--compare", "--json")
    out = json.loads(result.stdout)
    assert out["identical"] and out["resident"]["tokens"] == out["paged"]["tokens"]
    table = invoke(tiny, "--prompt-ids", "5,6,7,8", "-n", "4", "--compare")
    assert table.exit_code == 0 and "identical" in table.output and "hit rate" in table.output


@pytest.mark.parametrize("args,message", [
    (["--prompt", "hello"], "no tokenizer"),
    (["--prompt-ids", "1,x"], "comma-separated"),
    (["--prompt-ids", "1,2", "--cache", "1KB"], "too small"),
])
def test_errors_exit_2(tiny, args, message):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "expertpager", "run", str(tiny), *args], capture_output=True, text=True)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_expert_cache_tiers_give_the_same_tokens(tmp_path):
    from tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "m.gguf", "llama")
    runs = {tier: invoke(path, "--prompt-ids", "5,6,7,8", "-n", "6", "--cache", "60%", "--expert-cache", tier, "--json")
            for tier in ("raw", "dequantized")}
    assert all(r.exit_code == 0 for r in runs.values()), [r.output for r in runs.values()]
    tokens = {tier: json.loads(r.stdout)["tokens"] for tier, r in runs.items()}
    assert tokens["raw"] == tokens["dequantized"] and len(tokens["raw"]) == 6


def test_compare_on_a_gguf_runs_it_all_cached(tmp_path):
    """--resident on a GGUF: the same file through the same code with every slice loaded before the run, so the
    run reads nothing; --compare then says whether paging at a small cache changed the tokens."""
    from tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "m.gguf", "llama")
    result = invoke(path, "--prompt-ids", "5,6,7,8", "-n", "8", "--cache", "40%", "--expert-cache", "raw", "--compare",
                    "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["identical"] and len(out["resident"]["tokens"]) == 8
    resident, paged = out["resident"]["stats"], out["paged"]["stats"]
    assert resident["bytes_read"] == 0 and resident["hit_rate"] == 1.0 and resident["hits"] > 0
    assert paged["bytes_read"] > 0 and paged["hit_rate"] < 1.0
    assert resident["cache_bytes"] > paged["cache_bytes"]


def test_stats_name_the_compact_tiers_kernels(tmp_path, tiny):
    from tiny_gguf import write_tiny_gguf

    from expertpager.runtime import native

    path = write_tiny_gguf(tmp_path / "m.gguf", "llama")
    result = invoke(path, "--prompt-ids", "5,6,7,8", "-n", "3", "--expert-cache", "compact", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["stats"]["kernels"] == native.describe()
    plain = invoke(tiny, "--prompt-ids", "5,6,7,8", "-n", "3", "--json")  # a float checkpoint: no compact matrices
    assert "kernels" not in json.loads(plain.stdout)["stats"]
