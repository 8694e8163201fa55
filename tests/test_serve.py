"""`expertpager serve` as a real process on loopback, driven by the real `openai` client: listing, chat and
completions whole and streamed, sampling, errors, /metrics, queueing, a client that goes away, and a soak."""

import http.client
import json
import threading
import time
import urllib.parse

import openai
import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from expertpager.model.demo import demo_model_path
from expertpager.runner import chat_ids
from expertpager.runtime.generate import generate

MODEL = "expertpager-demo"
QUEUE = 4  # the demo_server's --max-queue (conftest.py)
CHAT = [{"role": "user", "content": "What does the for statement do?"}]
CODE = "def main(args):"


@pytest.fixture(scope="module")
def server(demo_server):
    return demo_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(demo_model_path())


@pytest.fixture(scope="module")
def greedy(tokenizer):
    """The fully resident model's greedy text for prompt ids: what the paged server must answer. One torch thread,
    as the server runs (start_server)."""
    model = AutoModelForCausalLM.from_pretrained(demo_model_path()).eval()
    threads = torch.get_num_threads()

    def run(ids: list[int], n: int) -> str:
        torch.set_num_threads(1)
        try:
            tokens = generate(model, ids, n, eos_token_id=tokenizer.eos_token_id).tokens
        finally:
            torch.set_num_threads(threads)
        return tokenizer.decode(tokens, skip_special_tokens=True)
    return run


def test_models_lists_the_model_and_its_adapter(client):
    assert [m.id for m in client.models.list().data] == [MODEL, "code"]


def test_model_field_picks_the_adapter_per_request(client, tokenizer):
    """`model: "code"` runs with the code LoRA, as peft's own model generates; the base model before and after."""
    from peft import PeftModel

    ids = tokenizer(CODE)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(demo_model_path()).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want_base = tokenizer.decode(generate(base, ids, 12).tokens, skip_special_tokens=True)
        adapted = PeftModel.from_pretrained(base, str(demo_model_path() / "adapters" / "code")).eval()
        want_code = tokenizer.decode(generate(adapted, ids, 12).tokens, skip_special_tokens=True)
    finally:
        torch.set_num_threads(threads)
    assert want_code != want_base  # the adapter changes this continuation: the check below can tell them apart
    got = [client.completions.create(model=name, prompt=CODE, max_tokens=12, temperature=0)
           for name in (MODEL, "code", MODEL)]
    assert [r.choices[0].text for r in got] == [want_base, want_code, want_base]
    assert got[1].model == "code"


def test_chat_equals_the_resident_model_and_reports_paging(client, tokenizer, greedy):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    ids = chat_ids(tokenizer, CHAT)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == greedy(ids, 8)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    paging, timings = r.model_extra["paging"], r.model_extra["timings"]
    assert paging["hits"] + paging["joins"] + paging["misses"] > 0 and 0 <= paging["hit_rate"] <= 1
    assert paging["bytes_read"] > 0  # a 25% cache cannot hold 8 tokens' experts from the start
    assert timings["prompt_n"] == len(ids) and timings["predicted_n"] == 8


def test_chat_stream_matches_whole_answer(client):
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].finish_reason == "length" and "paging" in final[0].model_extra
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completions_text_and_token_ids(client, tokenizer, greedy):
    ids = tokenizer(CODE)["input_ids"]
    text = client.completions.create(model=MODEL, prompt=CODE, max_tokens=6, temperature=0)
    assert text.choices[0].text == greedy(ids, 6) and text.usage.prompt_tokens == len(ids)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == text.choices[0].text
    streamed = client.completions.create(model=MODEL, prompt=CODE, max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text


def test_raw_stream_ends_with_done(server):
    body = json.dumps({"prompt": CODE, "max_tokens": 2, "temperature": 0, "stream": True}).encode()
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(server.url).netloc, timeout=120)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    events = [e for e in r.read().decode().split("\n\n") if e]
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_stop_string_cuts_the_text(client):
    full = client.completions.create(model=MODEL, prompt=CODE, max_tokens=12, temperature=0).choices[0].text
    stop = full.strip()[4:8]  # a piece from the middle of the greedy answer
    assert stop.strip()
    cut = client.completions.create(model=MODEL, prompt=CODE, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=CODE, max_tokens=12, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_sampling_seed_top_k_top_p(client):
    def text(**kw):
        return client.completions.create(model=MODEL, prompt=CODE, max_tokens=8, **kw).choices[0].text

    greedy = text(temperature=0)
    assert text(temperature=1.0, seed=7) == text(temperature=1.0, seed=7)
    samples = {text(temperature=2.0, seed=s) for s in range(4)}
    assert len(samples) > 1  # four seeds at temperature 2 over a 6,144-token vocabulary
    assert text(temperature=1.5, seed=3, extra_body={"top_k": 1}) == greedy
    assert text(temperature=1.5, seed=3, top_p=1e-6) == greedy


@pytest.mark.parametrize("body,param,code", [
    ({"model": MODEL, "max_tokens": 4}, "messages", "missing_required_parameter"),
    ({"model": MODEL, "messages": []}, "messages", "invalid_value"),
    ({"model": MODEL, "messages": CHAT, "max_tokens": -1}, "max_tokens", "invalid_value"),
    ({"model": MODEL, "messages": CHAT, "max_tokens": "4"}, "max_tokens", "invalid_type"),
    ({"model": MODEL, "messages": CHAT, "temperature": "hot"}, "temperature", "invalid_type"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "invalid_value"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "long " * 2000}]}, "messages", "context_length_exceeded"),
])
def test_bad_requests_get_400_in_openai_shape(server, body, param, code):
    status, out = server.post("/v1/chat/completions", body)
    assert status == 400 and set(out["error"]) >= {"message", "type", "code"}
    assert out["error"]["type"] == "invalid_request_error" and out["error"]["code"] == code
    assert out["error"]["param"] == param and "Traceback" not in out["error"]["message"]


def test_null_parameters_take_their_defaults(server):
    body = {"prompt": CODE, "max_tokens": 3, "temperature": None, "top_p": None, "stop": None, "seed": None, "stream": None}
    status, out = server.post("/v1/completions", {**body, "temperature": 0})
    assert status == 200 and out["usage"]["completion_tokens"] == 3
    status, out = server.post("/v1/completions", body)
    assert status == 200
    status, out = server.post("/v1/completions", {**body, "prompt": None})
    assert status == 400 and out["error"]["code"] == "missing_required_parameter"


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=CODE, max_tokens=0)
    assert e.value.status_code == 400 and "max_tokens" in e.value.body["message"]


def test_metrics_count_requests_tokens_and_pager(server, client):
    before = server.metrics()
    r = client.completions.create(model=MODEL, prompt=CODE, max_tokens=5, temperature=0)
    after = server.metrics()
    done = ("expertpager_requests_total", (("endpoint", "completions"), ("outcome", "length")))
    assert after[done] == before.get(done, 0) + 1
    for name, used in (("expertpager_generated_tokens_total", r.usage.completion_tokens),
                       ("expertpager_prompt_tokens_total", r.usage.prompt_tokens)):
        assert after[(name, ())] - before[(name, ())] == used
    pins = sum(after[("expertpager_cache_pins_total", (("result", k),))] for k in ("hit", "join", "miss"))
    assert pins > 0 and 0 < after[("expertpager_cache_hit_rate", ())] < 1
    assert 0 < after[("expertpager_cache_used_bytes", ())] <= after[("expertpager_cache_budget_bytes", ())]
    assert after[("expertpager_cache_pool_bytes", ())] <= after[("expertpager_cache_budget_bytes", ())]
    assert after[("expertpager_cache_read_bytes_total", ())] > 0 and after[("expertpager_cache_evictions_total", ())] > 0
    layers = {k[1][0][1] for k in after if k[0] == "expertpager_cache_layer_hit_rate"}
    assert layers == {str(i) for i in range(8)}
    assert after[("expertpager_decode_tokens_per_second", ())] > 0 and after[("expertpager_model_loaded", ())] == 1


def test_concurrent_requests_each_get_their_own_answer(client):
    prompts = [CODE, "import os\n", "The for statement", "class Parser:"]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=0).choices[0].text for p in prompts]
    together: dict[int, str] = {}

    def ask(i: int) -> None:
        together[i] = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=5, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [together[i] for i in range(len(prompts))] == alone


def test_full_queue_gets_429_and_a_gone_client_stops_its_generation(server, client):
    before = server.metrics()
    long = client.completions.create(model=MODEL, prompt=CODE, max_tokens=400, temperature=0, stream=True)
    first = next(iter(long))  # generating now: the worker is busy with it
    assert first.choices[0].text
    answers: list = []
    waiting = [threading.Thread(target=lambda: answers.append(
        client.completions.create(model=MODEL, prompt=CODE, max_tokens=2, temperature=0))) for _ in range(QUEUE)]
    for t in waiting:
        t.start()
    while server.metrics()[("expertpager_queue_waiting", ())] < QUEUE:  # all queued behind the long one
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model=MODEL, prompt=CODE, max_tokens=2)
    assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
    long.close()  # the client goes away mid-stream
    for t in waiting:
        t.join()
    assert len(answers) == QUEUE and all(a.choices[0].finish_reason == "length" for a in answers)
    after = server.metrics()
    cancelled = ("expertpager_requests_total", (("endpoint", "completions"), ("outcome", "cancelled")))
    rejected = ("expertpager_requests_total", (("endpoint", "completions"), ("outcome", "rejected")))
    assert after[cancelled] == before.get(cancelled, 0) + 1 and after[rejected] == before.get(rejected, 0) + 1
    generated = after[("expertpager_generated_tokens_total", ())] - before[("expertpager_generated_tokens_total", ())]
    assert generated - 2 * QUEUE < 400  # the long request stopped early


def test_a_gone_client_stops_a_whole_answer_too(server):
    before = server.metrics()
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(server.url).netloc, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": CODE, "max_tokens": 400, "temperature": 0}).encode(),
                 {"Content-Type": "application/json"})
    while server.metrics()[("expertpager_requests_running", ())] == 0:
        time.sleep(0.05)
    conn.close()  # gone before the answer
    cancelled = ("expertpager_requests_total", (("endpoint", "completions"), ("outcome", "cancelled")))
    while (after := server.metrics()).get(cancelled, 0) == before.get(cancelled, 0):
        time.sleep(0.05)
    assert after[("expertpager_generated_tokens_total", ())] - before[("expertpager_generated_tokens_total", ())] < 400
    assert after[("expertpager_requests_running", ())] == 0


def test_soak_memory_and_budget_hold(server):
    """200 short requests: the server's RSS stays within a small margin of where it was after a warm-up, and the
    cache never holds more than its budget."""
    process = psutil.Process(server.process.pid)
    prompts = [CODE, "import os\n", "The for statement", "x = [i for i in"]
    for i in range(20):
        assert server.post("/v1/completions", {"prompt": prompts[i % 4], "max_tokens": 2, "temperature": 0})[0] == 200
    warm = process.memory_info().rss
    peak = warm
    for i in range(200):
        status, out = server.post("/v1/completions", {"prompt": prompts[i % 4] + str(i), "max_tokens": 1,
                                                      "temperature": 0.5, "seed": i})
        assert status == 200 and out["usage"]["completion_tokens"] >= 1
        peak = max(peak, process.memory_info().rss)
        if i % 50 == 0:
            m = server.metrics()
            assert m[("expertpager_cache_used_bytes", ())] <= m[("expertpager_cache_budget_bytes", ())]
    assert peak - warm < 32 << 20, f"RSS grew by {(peak - warm) / 2**20:.1f} MiB over 200 requests"
