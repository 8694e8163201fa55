"""HTTP range reads through huggingface_hub's session (proxies, SSL and the Hub's headers as the Hub client has
them), with timeouts, retries with backoff, resumption of a body cut short, and refusal of a server that ignores
Range. A read returns exactly the bytes asked for or raises ExpertPagerError naming the URL; it never returns a
short or misplaced body."""

import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import httpx2
from huggingface_hub import get_session

from ..errors import ExpertPagerError

RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
CHUNK = 1 << 20
COALESCE_GAP = 1 << 20  # ranges of one file closer than this are fetched in one request (the gap is read and dropped)
MAX_REQUEST = 64 << 20  # ... as long as the request stays within this many bytes


def coalesce(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, end) ranges of one file merged into the spans to request: sorted, neighbours closer than COALESCE_GAP
    joined while the span stays within MAX_REQUEST bytes (a single longer range stays one span)."""
    spans: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if spans and start - spans[-1][1] < COALESCE_GAP and max(end, spans[-1][1]) - spans[-1][0] <= MAX_REQUEST:
            spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
        else:
            spans.append((start, end))
    return spans


@dataclass
class Transfer:
    """Counters of one client, summed over threads: bytes received, seconds in requests, requests, retries."""

    bytes: int = 0
    seconds: float = 0.0
    requests: int = 0
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, nbytes: int, seconds: float, retries: int) -> None:
        with self.lock:
            self.bytes += nbytes
            self.seconds += seconds
            self.requests += 1
            self.retries += retries


@dataclass
class RangeClient:
    """Range GETs with `retries` further attempts after a timeout, a 5xx/429, a dropped connection or a short body;
    waits backoff * 2^attempt seconds (with jitter, at most max_backoff) between attempts. `headers` go with every
    request (the Hub's auth and user agent for hf://)."""

    timeout: float = 30.0
    retries: int = 5
    backoff: float = 0.25
    max_backoff: float = 8.0
    transfer: Transfer = field(default_factory=Transfer)

    def read(self, url: str, start: int, length: int, headers: dict | None = None, etag: str | None = None) -> bytes:
        """Bytes [start, start + length) of `url`. `etag`: the file's known ETag; a response with another one means
        the file changed on the server, which is an error, not a retry."""
        out = bytearray()
        attempt, t0 = 0, time.perf_counter()
        while len(out) < length:
            try:
                self._get(url, start + len(out), length - len(out), headers or {}, etag, out)
            except _Retry as e:
                attempt += 1
                if attempt > self.retries:
                    raise ExpertPagerError(f"{url}: bytes {start}-{start + length - 1}: {e} "
                                           f"(gave up after {attempt} attempts)") from None
                time.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * (0.5 + random.random() / 2))
        self.transfer.add(len(out), time.perf_counter() - t0, attempt)
        return bytes(out)

    def _get(self, url: str, start: int, length: int, headers: dict, etag: str | None, out: bytearray) -> None:
        """One attempt: append what arrives to `out` (a body cut short leaves what came, and the next attempt asks
        for the rest); raise _Retry for what another attempt may cure."""
        want = {**headers, "Range": f"bytes={start}-{start + length - 1}", "Accept-Encoding": "identity"}
        try:
            with get_session().stream("GET", url, headers=want, timeout=self.timeout, follow_redirects=True) as r:
                _check_response(url, r, start, length, etag)
                end = len(out) + length
                for chunk in r.iter_bytes(CHUNK):
                    out += chunk[: end - len(out)]
                    if len(out) >= end:
                        break
                if len(out) < end:
                    raise _Retry(f"the body ended after {length - (end - len(out))} of {length} bytes")
        except httpx2.TimeoutException:
            raise _Retry(f"timed out after {self.timeout:g} s") from None
        except httpx2.TransportError as e:
            raise _Retry(f"connection failed ({type(e).__name__}: {e})") from None

    def head(self, url: str, headers: dict | None = None) -> tuple[int, str | None, str | None]:
        """(size, ETag, X-Linked-Etag) of `url` from a HEAD request, retried like a read. The Hub sends X-Linked-Etag
        (an LFS file's SHA-256) on its resolve answer, which may redirect elsewhere: it is taken from any hop."""
        attempt = 0
        while True:
            try:
                r = get_session().head(url, headers={**(headers or {}), "Accept-Encoding": "identity"},
                                       timeout=self.timeout, follow_redirects=True)
                if r.status_code in RETRY_STATUS:
                    raise _Retry(f"HTTP {r.status_code}")
                if r.status_code >= 400:
                    raise ExpertPagerError(_status_error(url, r.status_code))
                if "content-length" not in r.headers:
                    raise ExpertPagerError(f"{url}: the server gives no Content-Length, so the file's size is unknown")
                linked = next((h.headers["x-linked-etag"] for h in (r, *reversed(r.history)) if "x-linked-etag" in h.headers), None)
                return int(r.headers["content-length"]), r.headers.get("etag"), linked
            except (_Retry, httpx2.TransportError) as e:
                attempt += 1
                if attempt > self.retries:
                    raise ExpertPagerError(f"{url}: HEAD failed: {e} (gave up after {attempt} attempts)") from None
                time.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))


class _Retry(Exception):
    """A failure another attempt may cure."""


def _check_response(url: str, r, start: int, length: int, etag: str | None) -> None:
    if r.status_code in RETRY_STATUS:
        raise _Retry(f"HTTP {r.status_code}")
    if r.status_code == 200:
        raise ExpertPagerError(f"{url}: the server ignored the Range header (answered 200 with the whole file); "
                               "remote experts need a server that answers byte-range requests (HTTP 206)")
    if r.status_code != 206:
        raise ExpertPagerError(_status_error(url, r.status_code))
    got = r.headers.get("content-range", "")
    if not got.startswith(f"bytes {start}-{start + length - 1}/"):
        raise ExpertPagerError(f"{url}: asked for bytes {start}-{start + length - 1}, the server sent {got!r}")
    their = r.headers.get("etag")
    if etag and their and _bare(their) != _bare(etag):
        raise ExpertPagerError(f"{url}: the file changed on the server (ETag {their}, the store has {etag}); "
                               "remove the store folder or run online again to start over")


def _bare(etag: str) -> str:
    return etag.removeprefix("W/").strip('"')


def _status_error(url: str, status: int) -> str:
    hint = {401: " (a private or gated repo needs a token: HF_TOKEN or `hf auth login`)", 403: " (access denied)",
            404: " (no such file)", 416: " (range past the end of the file)"}.get(status, "")
    return f"{url}: HTTP {status}{hint}"
