"""Memory is a promise: a model whose experts are 5x the cache runs in a subprocess within resident + cache +
the stated reserve, and the page cache does not silently hold the experts."""

import json
import os
import subprocess
import sys

import pytest

from expertpager.model.plan import reserve_bytes
from expertpager.model.read_layout import read_layout
from expertpager.tools.synthetic import write_synthetic_moe
from expertpager.pager import drop_page_cache
from test_layout import resident_pages


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return write_synthetic_moe(tmp_path_factory.mktemp("big") / "moe")


def test_peak_rss_within_promise_and_no_page_cache_copy(big):
    layout = read_layout(big)
    assert layout.expert_bytes >= 1.1e9
    files = sorted(big.glob("*.safetensors"))
    for f in files:
        drop_page_cache(f)
    if any(resident_pages(f) for f in files):
        pytest.skip("posix_fadvise(DONTNEED) does not drop pages here")
    cmd = [sys.executable, "-m", "expertpager", "run", str(big), "--prompt-ids", ",".join(map(str, range(3, 40))),
           "-n", "16", "--cache", "20%", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert out.returncode == 0, out.stderr[-2000:]
    stats = json.loads(out.stdout)["stats"]
    assert layout.expert_bytes >= 4.9 * stats["cache_bytes"]
    assert stats["bytes_read"] > stats["cache_bytes"], "the run should have evicted and re-read slices"
    promise = stats["resident_bytes"] + stats["cache_bytes"] + reserve_bytes(layout)
    assert stats["peak_rss_bytes"] <= promise, (stats, promise)
    cached = sum(resident_pages(f) for f in files) * os.sysconf("SC_PAGE_SIZE")
    # Only resident tensors (and the kernel's readahead around them) may be in the page cache, not the experts.
    assert cached <= layout.resident_bytes + 0.10 * layout.expert_bytes, (cached, layout.resident_bytes, layout.expert_bytes)
