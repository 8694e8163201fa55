"""Remote checkpoints over real HTTP on loopback: folder URLs, hf:// through huggingface_hub's own client against a
Hub-style server, repacked checkpoints with per-slice SHA-256; the same logits as the local checkpoint; a disk budget;
faults injected in the server; offline runs from the store."""

import json
import os

import pytest
from typer.testing import CliRunner

from expertpager.cli import app
from expertpager.errors import ExpertPagerError
from expertpager.model.read_layout import read_layout
from expertpager.remote import RangeClient, open_store
from expertpager.runtime.load import load
from expertpager.runtime.profiles import Profile, save_profile
from expertpager.tools.export_gguf import export_gguf
from expertpager.tools.repack import repack
from http_server import Server
from test_paged_inference import PROMPT, assert_same, logits_trace, min_cache
from tiny_models import save_tiny

STEPS = 4


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote-sources")
    hf = save_tiny("qwen3_moe", root / "hf")
    gguf_repo = root / "gguf-repo"
    gguf_repo.mkdir()
    export_gguf(hf, gguf_repo / "tiny-Q8_0.gguf", "q8_0", progress=False)
    export_gguf(hf, gguf_repo / "tiny-F16.gguf", "f16", progress=False)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(hf).save_pretrained(root / "sharded", max_shard_size="40KB")
    assert len(list((root / "sharded").glob("*.safetensors"))) > 2
    return {"hf": hf, "gguf": gguf_repo, "sharded": root / "sharded",
            "repacked": repack(hf, root / "repacked", "per-layer", progress=False)}


@pytest.fixture()
def server(sources, monkeypatch):
    with Server() as srv:
        srv.served.repos["org/tiny"] = sources["hf"]
        srv.served.repos["org/tiny-gguf"] = sources["gguf"]
        srv.served.repos["org/tiny-sharded"] = sources["sharded"]
        srv.served.repos["org/tiny-packed"] = sources["repacked"]
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        yield srv


def fast_client(**kw) -> RangeClient:
    return RangeClient(**{"timeout": 5.0, "backoff": 0.01, **kw})


def assert_slices_equal_local(store, layout, keys) -> None:
    """Every byte the pager will read from the store's files for `keys` equals the local checkpoint's."""
    for k in keys:
        data = store.slice_path(k).read_bytes()
        for local, remote in zip(sorted(layout.slices[k].parts, key=lambda p: p.role),
                                 sorted(store.layout.slices[k].parts, key=lambda p: p.role)):
            with open(local.file, "rb") as fh:
                fh.seek(local.offset)
                assert data[remote.offset: remote.offset + remote.length] == fh.read(local.length), (k, local.role)


def range_gets(server, since: int) -> int:
    return sum(1 for m, _, r in server.served.requests[since:] if m == "GET" and r)


def no_partials(folder) -> bool:
    return not [p for p in folder.rglob(".*") if p.name.endswith(".partial")]


@pytest.mark.parametrize("kind", ["folder", "hf", "hf-gguf", "repacked", "hf-sharded", "hf-repacked", "sharded"])
def test_remote_runs_with_the_logits_of_the_local_checkpoint(sources, server, tmp_path, kind):
    ref, local = {"folder": (server.folder("tiny", sources["hf"]), sources["hf"]),
                  "hf": ("hf://org/tiny", sources["hf"]),
                  "hf-gguf": ("hf://org/tiny-gguf:Q8_0", sources["gguf"] / "tiny-Q8_0.gguf"),
                  "repacked": (server.folder("packed", sources["repacked"]), sources["repacked"]),
                  "hf-sharded": ("hf://org/tiny-sharded", sources["sharded"]),
                  "sharded": (server.folder("sharded", sources["sharded"]), sources["sharded"]),
                  "hf-repacked": ("hf://org/tiny-packed", sources["repacked"])}[kind]
    cache = min_cache(local)
    expected = logits_trace(load(local, cache=cache), PROMPT, STEPS)
    model = load(ref, cache=cache, store=tmp_path / "store")
    assert_same(expected, logits_trace(model, PROMPT, STEPS), f"{kind} remote")
    stats = model.store.stats()
    assert stats.misses > 0 and stats.remote_bytes > 0 and stats.remote_requests > 0
    assert len(model.store.present()) == stats.misses and no_partials(tmp_path / "store")
    if kind.startswith("hf"):  # huggingface_hub's headers, token included, go with every range request
        assert any(m == "GET" and "/resolve/" in p and r for m, p, r in server.served.requests)
        assert all(a == "Bearer hf_test_token" for a in server.served.auth if a is not None) and server.served.auth
    model.pager.close()


def test_headers_only_inspect_matches_local(sources, server, tmp_path):
    local = json.loads(CliRunner().invoke(app, ["inspect", str(sources["hf"]), "--json"]).stdout)
    result = CliRunner().invoke(app, ["inspect", "hf://org/tiny", "--json", "--store", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    remote = json.loads(result.stdout)
    for key in ("architecture", "num_experts", "experts_per_token", "slice_bytes", "expert_bytes", "resident_bytes"):
        assert remote[key] == local[key]
    total = sum(f.stat().st_size for f in sources["hf"].iterdir())
    assert server.served.range_bytes < total / 4  # headers and small files, not the weights
    assert remote["slices_in_store"] == 0


def test_disk_budget_evicts_least_recently_used_but_never_a_held_slice(sources, server, tmp_path):
    probe = open_store(server.folder("tiny", sources["hf"]), tmp_path / "probe", client=fast_client())
    probe.fetch_resident()
    size = max(probe.slice_size(k) for k in probe.layout.slices)
    budget = probe.used_bytes + 3 * size
    store = open_store(probe.model.ref, tmp_path / "probe", disk=budget, client=fast_client())
    keys = sorted(store.layout.slices)[:8]
    with store.hold(keys[0]):
        for k in keys[1:]:
            store.ensure(k)
            assert store.used_bytes <= budget and keys[0] in store.present()
            on_disk = sum(p.stat().st_size for p in (tmp_path / "probe" / "slices").iterdir())
            assert on_disk == sum(store.slice_size(k) for k in store.present())
    assert store.stats().evictions >= len(keys) - 3
    assert store.present()[-1] == keys[-1] and keys[1] not in store.present()
    tiny = open_store(probe.model.ref, tmp_path / "probe", disk=store.used_bytes - 3 * size + size // 2, client=fast_client())
    with pytest.raises(ExpertPagerError, match="too small"):
        tiny.ensure(keys[1])


def test_coalesce_joins_near_ranges_within_the_request_limit():
    from expertpager.remote.http import COALESCE_GAP, MAX_REQUEST, coalesce

    gap = COALESCE_GAP
    assert coalesce([(100, 200), (0, 50), (200 + gap - 1, 300 + gap)]) == [(0, 300 + gap)]
    assert coalesce([(0, 10), (10 + gap, 20 + gap)]) == [(0, 10), (10 + gap, 20 + gap)]  # a gap of COALESCE_GAP: two
    half = MAX_REQUEST // 2
    assert coalesce([(0, half), (half, 2 * half), (2 * half, 2 * half + 1)]) == [(0, 2 * half), (2 * half, 2 * half + 1)]
    assert coalesce([(0, 3 * MAX_REQUEST)]) == [(0, 3 * MAX_REQUEST)]


@pytest.mark.parametrize("kind", ["folder", "gguf"])
def test_neighbouring_slices_are_fetched_in_one_request_and_split(sources, server, tmp_path, kind):
    """A layer's slices pulled together come in one range request and are split into their files (the tiny model's
    layer is well under COALESCE_GAP apart, GGUF's gate, up and down tensors included); a run's misses of a layer
    arrive together too, so it makes fewer requests than misses. Every stored byte equals the local file's."""
    url, local = {"folder": (server.folder("tiny", sources["hf"]), sources["hf"]),
                  "gguf": (server.folder("g", sources["gguf"]) + "tiny-Q8_0.gguf", sources["gguf"] / "tiny-Q8_0.gguf")}[kind]
    store = open_store(url, tmp_path / "s", client=fast_client())
    layer = min(k[0] for k in store.layout.slices)
    keys = [k for k in sorted(store.layout.slices) if k[0] == layer]
    since = len(server.served.requests)
    assert store.fetch_many(keys) == len(keys) > 3
    assert range_gets(server, since) == 1
    assert_slices_equal_local(store, read_layout(local), keys)
    assert store.stats().misses == len(keys) and sorted(store.present()) == keys and no_partials(tmp_path / "s")
    assert store.fetch_many(keys) == 0 and range_gets(server, since) == 1

    cache = min_cache(local)
    expected = logits_trace(load(local, cache=cache), PROMPT, STEPS)
    model = load(url, cache=cache, store=tmp_path / "run")
    since = len(server.served.requests)
    assert_same(expected, logits_trace(model, PROMPT, STEPS), f"{kind} remote, coalesced")
    stats = model.store.stats()
    assert range_gets(server, since) < stats.misses / 2 and len(model.store.present()) >= stats.misses
    assert_slices_equal_local(model.store, read_layout(local), model.store.present())
    model.pager.close()


def test_faults_are_retried_and_never_leave_a_corrupt_slice(sources, server, tmp_path):
    url = server.folder("tiny", sources["hf"])
    store = open_store(url, tmp_path / "s", client=fast_client(timeout=0.5, retries=7))
    layout = read_layout(sources["hf"])
    f = server.served.faults
    f.status, f.cut, f.short, f.drop, f.slow, f.delay = 2, 1, 1, 1, 1, 1.5
    keys = sorted(store.layout.slices)[:3]
    for k in keys:
        store.ensure(k)
    assert store.stats().remote_retries >= 6
    assert_slices_equal_local(store, layout, keys)
    f.status = 10
    with pytest.raises(ExpertPagerError, match="gave up after 8 attempts"):
        store.ensure(keys[-1][:1] + (keys[-1][1] + 1,))
    f.status, f.ignore_range = 0, True
    with pytest.raises(ExpertPagerError, match="ignored the Range header"):
        store.ensure((keys[0][0], keys[0][1] + 5))
    assert len(store.present()) == 3 and no_partials(tmp_path / "s")


def test_repacked_slice_with_wrong_sha256_is_refused_then_refetched(sources, server, tmp_path):
    store = open_store(server.folder("packed", sources["repacked"]), tmp_path / "s", client=fast_client())
    key = sorted(store.layout.slices)[0]
    server.served.faults.corrupt = 1
    with pytest.raises(ExpertPagerError, match="SHA-256"):
        store.ensure(key)
    assert store.present() == [] and not (tmp_path / "s" / "slices").exists() or not any((tmp_path / "s" / "slices").iterdir())
    store.ensure(key)
    assert store.present() == [key]
    near, asked = sorted(store.layout.slices)[1:3]  # neighbours: one request, `near`'s bytes first in its body
    store.announce([near, asked])
    server.served.faults.corrupt = 1
    since = len(server.served.requests)
    assert store.ensure(asked) and range_gets(server, since) == 1
    assert sorted(store.present()) == [key, asked]  # the bad neighbour is left out, the slice asked for stored
    store.ensure(near)
    assert sorted(store.present()) == [key, near, asked] and store.stats().misses == 4


def test_offline_runs_from_the_store_and_names_what_is_missing(sources, server, tmp_path):
    url = server.folder("tiny", sources["hf"])
    cache = min_cache(sources["hf"])
    expected = logits_trace(load(sources["hf"], cache=cache), PROMPT, STEPS)
    online = load(url, cache=cache, store=tmp_path / "s")
    logits_trace(online, PROMPT, STEPS)
    online.pager.close()
    server.__exit__(None, None, None)  # the server is gone
    offline = load(url, cache=cache, store=tmp_path / "s", offline=True)
    assert_same(expected, logits_trace(offline, PROMPT, STEPS), "offline from the store")
    missing = offline.store.missing()
    assert missing
    with pytest.raises(ExpertPagerError, match=rf"offline, and expert slice \({missing[0][0]}, {missing[0][1]}\).*pull"):
        offline.store.ensure(missing[0])
    with pytest.raises(ExpertPagerError, match="no store for it"):
        open_store(url, tmp_path / "elsewhere", offline=True)


def test_cli_pull_profile_then_offline_run_and_plan(sources, server, tmp_path):
    url = "hf://org/tiny"
    layout = read_layout(sources["hf"])
    import numpy as np

    counts = np.zeros((len(layout.moe_layers), layout.num_experts), dtype=np.int64)
    counts[:, :3] = [[5, 3, 1]]
    save_profile(Profile("code", list(layout.moe_layers), counts, 10), tmp_path / "code.json")
    store = str(tmp_path / "s")
    result = CliRunner().invoke(app, ["pull", url, "--profile", str(tmp_path / "code.json"), "--store", store, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["slices_in_store"] == 3 * len(layout.moe_layers) and info["remote_bytes"] > 0
    probe = open_store(url, tmp_path / "small")
    probe.fetch_resident()
    disk = probe.used_bytes + 2 * max(probe.slice_size(k) for k in probe.layout.slices)
    small = CliRunner().invoke(app, ["pull", url, "--profile", str(tmp_path / "code.json"), "--store",
                                     str(tmp_path / "small"), "--disk", str(disk), "--json"])
    assert small.exit_code == 0, small.output
    hottest = Profile("code", list(layout.moe_layers), counts, 10).hottest(2)
    assert json.loads(small.stdout)["store_evictions"] == 0
    assert sorted(open_store(url, tmp_path / "small", disk=disk).present()) == sorted(hottest)
    run = CliRunner().invoke(app, ["run", url, "--prompt-ids", "5,6,7", "-n", "3", "--cache", "100%", "--store", store,
                                   "--json"])
    assert run.exit_code == 0, run.output
    stats = json.loads(run.stdout)["stats"]
    for key in ("store_hit_rate", "remote_bytes", "remote_seconds", "store_bytes"):
        assert key in stats
    local = CliRunner().invoke(app, ["run", str(sources["hf"]), "--prompt-ids", "5,6,7", "-n", "3", "--cache", "100%", "--json"])
    assert json.loads(run.stdout)["tokens"] == json.loads(local.stdout)["tokens"]
    plan = CliRunner().invoke(app, ["plan", url, "--cache", "25%", "--disk", "1GB", "--store", store, "--offline",
                                    "--profile", str(tmp_path / "code.json"), "--disk-gbps", "1", "--net-gbps", "0.1",
                                    "--latency-ms", "5", "--json"])
    assert plan.exit_code == 0, plan.output
    p = json.loads(plan.stdout)
    assert p["routing"] == "profile" and p["store_slices"] == len(layout.slices) and p["network_bytes_per_token"] == 0
    hot = np.sort(counts.reshape(-1))[::-1]  # a cache of C slices holds the C hottest: their share of all uses
    assert 0 < p["cache_slices"] < 9 and p["hit_rate"] == pytest.approx(hot[: p["cache_slices"]].sum() / hot.sum())


def test_gguf_url_header_read_in_growing_ranges_gives_the_local_layout(sources, server, tmp_path, monkeypatch):
    import expertpager.remote.skeleton as skeleton

    monkeypatch.setattr(skeleton, "GGUF_FIRST_READ", 256)  # the header is several KiB: parse, read twice as much, ...
    local = read_layout(sources["gguf"] / "tiny-Q8_0.gguf")
    store = open_store(server.folder("g", sources["gguf"]) + "tiny-Q8_0.gguf", tmp_path / "s", client=fast_client())
    remote = store.remote_layout
    assert (remote.architecture, remote.num_experts, remote.config) == (local.architecture, local.num_experts, local.config)
    assert [(t.name, t.offset, t.length, t.dtype) for t in remote.resident] == [(t.name, t.offset, t.length, t.dtype) for t in local.resident]
    assert {k: [(p.role, p.offset, p.length) for p in s.parts] for k, s in remote.slices.items()} == \
        {k: [(p.role, p.offset, p.length) for p in s.parts] for k, s in local.slices.items()}
    size = (sources["gguf"] / "tiny-Q8_0.gguf").stat().st_size
    ranges = [r for m, p, r in server.served.requests if m == "GET" and p.endswith("tiny-Q8_0.gguf")]
    assert len(ranges) >= 3 and server.served.range_bytes < size / 2


def test_bad_remote_input_is_one_clear_error_naming_the_url(sources, server, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((sources["hf"] / "config.json").read_text())
    (broken / "model.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    url = server.folder("broken", broken)
    with pytest.raises(ExpertPagerError, match=rf"{url}model.safetensors: truncated or corrupt safetensors"):
        open_store(url, tmp_path / "s1", client=fast_client())
    with pytest.raises(ExpertPagerError, match="HTTP 404"):
        open_store(server.folder("none", tmp_path / "missing") + "x.gguf", tmp_path / "s2", client=fast_client())
    with pytest.raises(ExpertPagerError, match="no config.json"):
        open_store(server.folder("empty", tmp_path), tmp_path / "s3", client=fast_client())
    result = CliRunner().invoke(app, ["run", "hf://org/nope", "--store", str(tmp_path / "s4"), "--prompt-ids", "1,2"])
    assert isinstance(result.exception, ExpertPagerError) and "hf://org/nope" in str(result.exception)
    (tmp_path / "user-folder").mkdir()
    (tmp_path / "user-folder" / "notes.txt").write_text("mine")
    with pytest.raises(ExpertPagerError, match="not an expertpager store"):
        open_store("hf://org/tiny", tmp_path / "user-folder")


def test_serve_a_remote_model_and_show_its_store_on_metrics(server, tmp_path, monkeypatch):
    """`expertpager serve hf://... --adapter` as a real process against the loopback Hub: the completion equals the
    local resident model's greedy text, one naming the adapter the local paged model's with that adapter, and
    /metrics carries the store's figures."""
    import openai
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expertpager.model.demo import demo_model_path
    from expertpager.runtime.generate import generate
    from serve_helpers import start_server, stop_server

    monkeypatch.setenv("EXPERTPAGER_CACHE", str(tmp_path / "cache"))
    server.served.repos["org/demo"] = demo_model_path()
    code = demo_model_path() / "adapters" / "code"
    tokenizer = AutoTokenizer.from_pretrained(demo_model_path())
    ids = tokenizer("def main(args):")["input_ids"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server runs
    try:
        want = generate(AutoModelForCausalLM.from_pretrained(demo_model_path()).eval(), ids, 6).tokens
        adapted = load(demo_model_path(), cache="25%", adapters={"code": code}, adapter="code")
        want_code = generate(adapted, ids, 6).tokens
        adapted.pager.close()
        assert want_code != want  # the adapter changes these tokens
    finally:
        torch.set_num_threads(threads)
    srv = start_server(tmp_path / "serve.log", "hf://org/demo", "--store", str(tmp_path / "store"), "--cache", "25%",
                       "--disk", "100MB", "--adapter", f"code={code}")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        r = client.completions.create(model="hf://org/demo", prompt=ids, max_tokens=6, temperature=0)
        r_code = client.completions.create(model="code", prompt=ids, max_tokens=6, temperature=0)
        m = srv.metrics()
    finally:
        stop_server(srv)
    assert r.choices[0].text == tokenizer.decode(want, skip_special_tokens=True)
    assert r_code.choices[0].text == tokenizer.decode(want_code, skip_special_tokens=True)
    assert m[("expertpager_remote_fetched_bytes_total", ())] > 0 and m[("expertpager_remote_requests_total", ())] > 0
    misses = m[("expertpager_store_lookups_total", (("result", "miss"),))]
    hits = m[("expertpager_store_lookups_total", (("result", "hit"),))]
    assert misses > 0 and hits > 0  # a 25% cache reads some slices again: from the store this time
    assert m[("expertpager_store_hit_rate", ())] == pytest.approx(hits / (hits + misses))
    assert 0 < m[("expertpager_store_bytes", ())] <= m[("expertpager_store_budget_bytes", ())] == 100e6
    assert m[("expertpager_remote_fetch_seconds_total", ())] > 0
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


HOLDER = """
import random, sys
sys.path.insert(0, sys.argv[5])
from expertpager.model.read_layout import read_layout
from expertpager.remote import RangeClient, open_store
from test_remote import assert_slices_equal_local

url, folder, disk, local = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
store = open_store(url, folder, disk=disk, client=RangeClient(timeout=5.0, backoff=0.01))
layout = read_layout(local)
keys = sorted(store.layout.slices) * 3
random.Random(sys.argv[6]).shuffle(keys)
for key in keys:
    with store.hold(key):  # another process is fetching and evicting meanwhile: what is held stays whole
        assert_slices_equal_local(store, layout, [key])
print("ok", store.stats().evictions)
"""


def test_two_processes_share_one_store(sources, server, tmp_path):
    """Two processes fetching, holding and checking slices one by one under a disk budget, and `expertpager pull` of
    the whole model into the same store at the same time: all finish, the budget holds, every slice on disk is whole.
    (Without the store's lock this failed: a holder's slice was deleted under it by another process.)"""
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    url, folder = server.folder("tiny", sources["hf"]), tmp_path / "shared"
    probe = open_store(url, tmp_path / "probe", client=fast_client())
    probe.fetch_resident()
    layout = read_layout(sources["hf"])
    disk = probe.used_bytes + (len(layout.slices) // 2) * max(probe.slice_size(k) for k in probe.layout.slices)
    counts = np.ones((len(layout.moe_layers), layout.num_experts), dtype=np.int64)
    save_profile(Profile("all", list(layout.moe_layers), counts, 1), tmp_path / "all.json")
    open_store(url, folder, client=fast_client()).fetch_resident()
    server.served.latency = 0.005
    tests = str(Path(__file__).parent)
    holders = [subprocess.Popen([sys.executable, "-c", HOLDER, url, str(folder), str(disk), str(sources["hf"]), tests,
                                 seed], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in "ab"]
    pull = subprocess.Popen([sys.executable, "-m", "expertpager", "pull", url, "--store", str(folder), "--disk", str(disk),
                             "--profile", str(tmp_path / "all.json"), "--threads", "2", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for holder in holders:
        out, err = holder.communicate(timeout=120)
        assert holder.returncode == 0 and out.startswith("ok"), err
    pulled, err = pull.communicate(timeout=120)
    assert pull.returncode == 0, err
    store = open_store(url, folder, disk=disk, offline=True)
    assert 0 < len(store.present()) < len(layout.slices) and store.used_bytes <= disk
    assert_slices_equal_local(store, layout, store.present())
    on_disk = sorted(p.name for p in (folder / "slices").iterdir())
    assert on_disk == sorted(store.slice_path(k).name for k in store.present()) and no_partials(folder)


def test_remote_model_with_a_local_adapter_equals_the_local_model_with_it(server, tmp_path, monkeypatch):
    """A remote model with a LoRA adapter: the slices come from the store, the adapter's pieces from their local
    piece file; the logits equal the local model's with the same adapter, and so do `run --adapter`'s tokens."""
    from expertpager.model.demo import demo_model_path

    monkeypatch.setenv("EXPERTPAGER_CACHE", str(tmp_path / "cache"))
    server.served.repos["org/demo"] = demo_model_path()
    adapters = {"code": demo_model_path() / "adapters" / "code"}
    expected = logits_trace(load(demo_model_path(), cache="25%", adapters=adapters, adapter="code"), PROMPT, STEPS)
    model = load("hf://org/demo", cache="25%", store=tmp_path / "store", adapters=adapters, adapter="code")
    assert_same(expected, logits_trace(model, PROMPT, STEPS), "remote model with an adapter")
    assert model.store.stats().misses > 0 and model.pager.stats_snapshot().adapters.bytes_read > 0
    model.pager.close()
    run = ["--prompt-ids", "5,6,7,8", "-n", "4", "--cache", "25%", "--adapter", f"code={adapters['code']}", "--json"]
    local = CliRunner().invoke(app, ["run", str(demo_model_path()), *run])
    remote = CliRunner().invoke(app, ["run", "hf://org/demo", "--store", str(tmp_path / "store"), *run])
    assert local.exit_code == 0 and remote.exit_code == 0, local.output + remote.output
    assert json.loads(remote.stdout)["tokens"] == json.loads(local.stdout)["tokens"]


def local_file(sources, kind: str, name: str):
    return sources[{"hf": "hf", "hf-gguf": "gguf", "hf-sharded": "sharded", "hf-repacked": "repacked"}[kind]] / name


@pytest.mark.parametrize("kind", ["hf", "hf-gguf", "hf-sharded", "hf-repacked", "gguf-resolve-url", "folder"])
def test_pull_all_checks_each_whole_file_against_its_published_sha256(sources, server, tmp_path, kind):
    """`pull --all` fetches every slice, then hashes each weight file from the store's pieces (the bytes no piece
    holds, such as GGUF alignment padding, read by range) and records the match in store.json; a second pull neither
    hashes nor fetches. The Hub's LFS ETag is the SHA-256; a plain URL publishes one only as X-Linked-Etag (a direct
    resolve URL), so a plain folder's files are not checked."""
    import hashlib

    ref = {"hf": "hf://org/tiny", "hf-gguf": "hf://org/tiny-gguf:Q8_0", "hf-sharded": "hf://org/tiny-sharded",
           "hf-repacked": "hf://org/tiny-packed", "gguf-resolve-url": f"{server.url}/org/tiny-gguf/resolve/main/tiny-Q8_0.gguf",
           "folder": server.folder("tiny", sources["hf"])}[kind]
    store = tmp_path / "s"
    result = CliRunner().invoke(app, ["pull", ref, "--all", "--store", str(store), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["slices_in_store"] == info["num_slices"] == info["slices_fetched"]
    weights = json.loads((store / "store.json").read_text())["model"]["weights"]
    verified = json.loads((store / "store.json").read_text()).get("verified", {})
    if kind == "folder":
        assert info["files_verified"] == [] and verified == {}
        return
    local = sources["gguf"] if kind == "gguf-resolve-url" else local_file(sources, kind, "")
    assert info["files_verified"] == weights and len(weights) >= (3 if kind.endswith(("sharded", "repacked")) else 1)
    assert verified == {n: hashlib.sha256((local / n).read_bytes()).hexdigest() for n in weights}
    since = len(server.served.requests)
    again = CliRunner().invoke(app, ["pull", ref, "--all", "--store", str(store), "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["files_verified"] == []
    assert not [p for m, p, r in server.served.requests[since:] if m == "GET" and r and p.endswith(tuple(weights))]


def test_a_flipped_byte_in_a_slice_fails_its_files_sha256_and_drops_that_files_slices(sources, server, tmp_path):
    """The server flips one byte of one slice on the wire (no per-slice hash to catch it in a plain checkpoint) while
    publishing the true file's SHA-256: the whole-file check catches it, names the file's URL, drops that file's
    slices only (the other shards are verified and kept), and a second pull fetches them again and verifies."""
    ref, layout = "hf://org/tiny-sharded", read_layout(sources["sharded"])
    store = open_store(ref, tmp_path / "s", client=fast_client())
    store.fetch_resident()
    key = sorted(layout.slices)[len(layout.slices) // 2]
    files = {os.path.basename(min((p.file, p.offset) for p in layout.slices[key].parts)[0])}  # its first request's
    server.served.faults.corrupt = 1
    store.ensure(key)
    store.fetch_many(store.layout.slices)
    with pytest.raises(ExpertPagerError) as e:
        store.verify_files()
    message = str(e.value)
    assert "\n" not in message and message.count("SHA-256 is") == 1
    assert message.startswith(f"{server.url}/org/tiny-sharded/resolve/") and f"/{min(files)}: the file's SHA-256 is" in message
    assert "but the server publishes" in message and "dropped" in message
    kept = {k for k, s in layout.slices.items() if not files & {os.path.basename(p.file) for p in s.parts}}
    assert set(store.present()) == kept and key not in store.present() and kept
    meta = json.loads((tmp_path / "s" / "store.json").read_text())
    assert meta["resident"] is False and not files & set(meta["verified"]) and meta["verified"]
    assert sorted(p.name for p in (tmp_path / "s" / "slices").iterdir()) == sorted(store.slice_path(k).name for k in kept)
    result = CliRunner().invoke(app, ["pull", ref, "--all", "--store", str(tmp_path / "s"), "--json"])
    assert result.exit_code == 0, result.output
    again = set(meta["model"]["weights"]) - set(meta["verified"])  # the bad file, and those sharing its dropped slices
    assert files <= again and sorted(json.loads(result.stdout)["files_verified"]) == sorted(again)
    assert_slices_equal_local(open_store(ref, tmp_path / "s", offline=True), layout, layout.slices)
