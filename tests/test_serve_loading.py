"""Loading behind the server: /health says 503 while the model loads and 200 after (an in-process uvicorn over the
real Engine, whose loader the test holds back), a failed load is reported, and `serve` exits 2 with one line."""

import socket
import threading
import time

import pytest
import uvicorn
from typer.testing import CliRunner

from expertpager.cli import app
from expertpager.errors import ExpertPagerError
from expertpager.model.demo import demo_model_path
from expertpager.runner import load_tokenizer, open_model
from expertpager.server.app import create_app
from expertpager.server.engine import Engine
from expertpager.server.serve import listen
from serve_helpers import Server, free_port


def serve_in_thread(engine: Engine):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "demo"), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, Server(None, f"http://127.0.0.1:{port}", None)


@pytest.fixture
def running():
    started = []

    def start(loader):
        engine = Engine(loader, max_queue=2)
        server, thread, client = serve_in_thread(engine)
        engine.start()
        started.append((engine, server, thread))
        return engine, client

    yield start
    for engine, server, thread in started:
        server.should_exit = True
        thread.join()
        engine.close()
        if engine.model is not None:
            engine.model.pager.close()


def test_health_is_503_while_loading_then_200(running):
    gate = threading.Event()
    path = str(demo_model_path())

    def loader():
        gate.wait()
        return open_model(path, False, cache="25%"), load_tokenizer(path)

    engine, http = running(loader)
    status, body = http.get("/health")
    assert status == 503 and b"loading" in body
    status, out = http.post("/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert status == 503 and out["error"]["code"] == "model_loading"
    assert http.metrics()[("expertpager_model_loaded", ())] == 0
    gate.set()
    assert engine.loading_done.wait(300)
    assert http.get("/health")[0] == 200
    status, out = http.post("/v1/completions", {"prompt": "def f(x):", "max_tokens": 2, "temperature": 0})
    assert status == 200 and out["usage"]["completion_tokens"] == 2


def test_failed_load_is_reported(running):
    def loader():
        raise ExpertPagerError("model.safetensors: truncated")

    engine, http = running(loader)
    assert engine.loading_done.wait(60)
    status, body = http.get("/health")
    assert status == 500 and b"truncated" in body
    status, out = http.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 500 and out["error"]["code"] == "load_failed" and "truncated" in out["error"]["message"]


def test_serve_stops_with_the_loading_error():
    """The command's own path: uvicorn starts, the model fails to load behind it, the server stops and the error
    comes out as the one ExpertPagerError that main() prints as one line with exit code 2."""
    result = CliRunner().invoke(app, ["serve", "--port", str(free_port()), "--cache", "1KB"])
    assert isinstance(result.exception, ExpertPagerError) and "too small" in str(result.exception)


def test_a_taken_port_is_one_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ExpertPagerError, match=f"cannot listen on 127.0.0.1:{port}"):
            listen("127.0.0.1", port)
