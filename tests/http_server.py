"""A real HTTP server on loopback for remote-checkpoint tests: static folders with byte ranges (ETag,
Content-Range), the few Hugging Face Hub routes huggingface_hub's client uses (/api/models/{repo}[/revision/{rev}],
/{repo}/resolve/{rev}/{file} with HEAD and Range, X-Repo-Commit, ETag, Content-Length), and faults injected on
request: 5xx answers, bodies cut short, connections dropped, Range ignored, slow answers, flipped bytes. As on the Hub,
a resolve answer for an LFS file (weights) carries the content's SHA-256 as its ETag and X-Linked-Etag."""

import functools
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")


@dataclass
class Faults:
    """Faults for the next range GETs (each count is used up one request at a time)."""

    status: int = 0  # answer 503
    cut: int = 0  # send half the body, then close (Content-Length promised the whole)
    short: int = 0  # send half the body with a Content-Length that matches it (a lying server)
    drop: int = 0  # close the connection without answering
    corrupt: int = 0  # flip one byte of the body
    slow: int = 0  # sleep `delay` seconds before answering
    delay: float = 2.0
    ignore_range: bool = False  # answer 200 with the whole file
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, name: str) -> bool:
        with self.lock:
            if getattr(self, name) > 0:
                setattr(self, name, getattr(self, name) - 1)
                return True
            return False


@dataclass
class Served:
    folders: dict[str, Path] = field(default_factory=dict)  # "/files/NAME/" prefix -> folder
    repos: dict[str, Path] = field(default_factory=dict)  # "org/name" -> folder
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    latency: float = 0.0  # seconds every range GET waits before answering (a far server, for benchmarks)
    faults: Faults = field(default_factory=Faults)
    range_bytes: int = 0  # body bytes sent for range GETs
    requests: list = field(default_factory=list)  # (method, path, Range header)
    auth: list = field(default_factory=list)  # the Authorization header of each request (None when absent)


class Handler(BaseHTTPRequestHandler):
    served: Served
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _answer(self, head: bool) -> None:
        s = self.served
        path = unquote(urlsplit(self.path).path)
        s.requests.append((self.command, path, self.headers.get("Range")))
        s.auth.append(self.headers.get("Authorization"))
        m = API.match(path)
        if m and m["repo"] in s.repos:
            folder = s.repos[m["repo"]]
            names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
            body = json.dumps({"id": m["repo"], "sha": s.commit, "siblings": [{"rfilename": n} for n in names]}).encode()
            return self._send(200, {"Content-Type": "application/json"}, body, head)
        m = RESOLVE.match(path)
        extra = {}
        if m and m["repo"] in s.repos:
            file, extra = s.repos[m["repo"]] / m["file"], {"X-Repo-Commit": s.commit}
        else:
            file = next((f / path[len(p):] for p, f in s.folders.items() if path.startswith(p)), None)
        if file is None or not file.is_file():
            return self._send(404, {}, b"not found", head, extra)
        st = file.stat()
        etag = '"' + hashlib.sha256(f"{st.st_size}-{st.st_mtime_ns}".encode()).hexdigest()[:32] + '"'
        if extra and file.suffix in LFS_SUFFIXES:
            etag = extra["X-Linked-Etag"] = f'"{_sha256(file, st.st_size, st.st_mtime_ns)}"'
        headers = {"ETag": etag, "Accept-Ranges": "bytes", **extra}
        rng = re.match(r"bytes=(\d+)-(\d+)$", self.headers.get("Range") or "")
        if head:
            return self._send(200, {**headers, "Content-Length": str(st.st_size)}, b"", head)
        if rng is None or s.faults.ignore_range:
            return self._send(200, headers, file.read_bytes(), head)
        start, end = int(rng[1]), min(int(rng[2]), st.st_size - 1)
        with open(file, "rb") as f:
            f.seek(start)
            body = f.read(end + 1 - start)
        s.range_bytes += len(body)
        headers["Content-Range"] = f"bytes {start}-{end}/{st.st_size}"
        if s.latency:
            time.sleep(s.latency)
        f = s.faults
        if f.take("drop"):
            self.close_connection = True
            return
        if f.take("slow"):
            time.sleep(f.delay)
        if f.take("status"):
            return self._send(503, {}, b"try later", head)
        if f.take("corrupt"):
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        if f.take("cut"):
            self.send_response(206)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        if f.take("short"):
            body = body[: len(body) // 2]
        self._send(206, headers, body, head)

    def _send(self, status: int, headers: dict, body: bytes, head: bool, extra: dict | None = None) -> None:
        self.send_response(status)
        for k, v in {"Content-Length": str(len(body)), **headers, **(extra or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)


@functools.lru_cache(maxsize=None)
def _sha256(file: Path, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """A client that hung up mid-answer (timeouts, faults) is expected here, not worth a traceback."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Server:
    """`with Server() as srv:` a threaded server on 127.0.0.1; srv.url; srv.served to add folders and faults."""

    def __init__(self):
        self.served = Served()
        handler = type("BoundHandler", (Handler,), {"served": self.served})
        self.httpd = _Quiet(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def folder(self, name: str, path: Path) -> str:
        """Serve `path` at /files/NAME/; returns the folder URL."""
        self.served.folders[f"/files/{name}/"] = Path(path)
        return f"{self.url}/files/{name}/"

    def __enter__(self) -> "Server":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
