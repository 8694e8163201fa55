"""Start a real `expertpager serve` process on a free loopback port and wait until it is ready."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

LOAD_TIMEOUT = 300  # seconds a shared 2-core machine may need to import and load; a bound on waiting, not a check


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path | None

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def post(self, path: str, body) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample of /metrics: (name, sorted labels) -> value, parsed by prometheus_client's own parser."""
        status, text = self.get("/metrics")
        assert status == 200
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log: Path, *args: str) -> Server:
    """`python -m expertpager serve --port P *args`, polled on /health until 200 (fails if the process dies).
    One torch thread: the demo model's matmuls are tiny, and on a busy 2-core machine OpenMP workers spinning for
    a core made decoding 50x slower (measured 1 vs 53 tokens/s)."""
    port = free_port()
    out = log.open("wb")
    process = subprocess.Popen([sys.executable, "-m", "expertpager", "serve", "--port", str(port), *args],
                               stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + LOAD_TIMEOUT
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            status, _ = server.get("/health")
        except OSError:  # not listening yet
            status = None
        if status == 200:
            return server
        time.sleep(0.2)
    stop_server(server)
    raise AssertionError(f"the server did not get ready:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
