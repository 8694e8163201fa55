"""The model behind the server: loaded once in a background thread, then fed by one worker thread that serves
requests one at a time, in the order they came, from a bounded queue. Each request's paging stats are the pager's
counters before and after it (exact, since nothing else runs meanwhile)."""

import contextlib
import copy
import queue
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ExpertPagerError
from ..pager.stats import Counts
from ..runtime.generate import generate
from .text_stream import TextStream


@dataclass
class Job:
    """One request: prompt ids, sampling, and where its events go (`emit` is called from the worker thread)."""

    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stops: list[str]
    emit: Callable[[tuple], None]
    endpoint: str = "completions"
    adapter: str | None = None  # a loaded LoRA adapter's name; None: the base model
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Outcome:
    """What a finished request reports: its tokens, why it ended, its timings and its paging counters."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    prefill_seconds: float
    decode_seconds: float
    paging: Counts

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.completion_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds else 0.0

    def timings(self) -> dict:
        """llama-server's `timings` fields."""
        prompt_ms, predicted_ms = 1000 * self.prefill_seconds, 1000 * self.decode_seconds
        return {"prompt_n": self.prompt_tokens, "prompt_ms": prompt_ms,
                "prompt_per_second": self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0,
                "predicted_n": self.completion_tokens, "predicted_ms": predicted_ms,
                "predicted_per_second": self.decode_tokens_per_s}

    def paging_stats(self) -> dict:
        """The pager's counters over this request."""
        p = self.paging
        return {"hits": p.hits, "joins": p.joins, "misses": p.misses, "hit_rate": p.hit_rate,
                "prefetch_issued": p.prefetch_issued, "prefetch_hit_rate": p.prefetch_hit_rate,
                "evictions": p.evictions, "bytes_read": p.bytes_read, "stall_seconds": p.stall_seconds}


@dataclass
class Totals:
    """Server-wide counters for /metrics."""

    requests: dict[tuple[str, str], int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    decode_tokens: int = 0  # completion tokens after each request's first (which its prefill made)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    last_decode_tokens_per_s: float = 0.0

    def count(self, endpoint: str, outcome: str) -> None:
        self.requests[(endpoint, outcome)] = self.requests.get((endpoint, outcome), 0) + 1


class Busy(Exception):
    """The queue is full."""


class Engine:
    """Owns the model: `start()` loads it in a thread (`ready` is set when done, `error` says why it failed);
    `submit(job)` queues a request or raises Busy. `tokenizer` is the HTTP side's to encode prompts with; the
    worker decodes with its own copy."""

    def __init__(self, load_model: Callable[[], tuple], max_queue: int):
        self._load_model = load_model
        self.model = self.tokenizer = self._decoder = None
        self.ready = threading.Event()
        self.loading_done = threading.Event()
        self.error: str | None = None
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.running: Job | None = None
        self.totals = Totals()
        self.lock = threading.Lock()
        self.on_loaded: list[Callable[[object], None]] = []
        self._worker = threading.Thread(target=self._serve, name="expertpager-serve", daemon=True)

    def start(self) -> None:
        self._worker.start()

    @property
    def context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise Busy(f"{self.jobs.maxsize} requests are already waiting; try again later") from None

    def close(self) -> None:
        """Let the worker finish once the queue is empty (it is a daemon thread: a process that exits ends it)."""
        with contextlib.suppress(queue.Full):
            self.jobs.put_nowait(None)

    def _serve(self) -> None:
        try:
            self.model, self.tokenizer = self._load_model()
            self._decoder = copy.deepcopy(self.tokenizer)  # a Rust tokenizer must not be used by two threads at once
            for hook in self.on_loaded:
                hook(self.model)
        except ExpertPagerError as e:
            self.error = str(e)
        except Exception as e:  # noqa: BLE001 - the server reports it on /health and in its log
            traceback.print_exc(file=sys.stderr)
            self.error = f"loading the model failed: {e}"
        else:
            self.ready.set()
        self.loading_done.set()
        if self.error is not None:
            return
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
                self._record(job, "cancelled", None)
                continue
            self.running = job
            try:
                outcome = self._run(job)
            except Exception as e:  # noqa: BLE001 - one failed request must not stop the server
                traceback.print_exc(file=sys.stderr)
                self._record(job, "error", None)
                job.emit(("error", f"generation failed: {e}"))
                continue
            finally:
                self.running = None
            self._record(job, "cancelled" if job.cancelled.is_set() else outcome.finish_reason, outcome)
            job.emit(("done", outcome))

    def _run(self, job: Job) -> Outcome:
        pager = self.model.pager
        before = pager.stats_snapshot()
        text = TextStream(self._decoder, job.stops)
        eos = self._decoder.eos_token_id

        def on_token(token: int) -> bool:
            if token != eos:
                delta = text.push(token)
                if delta:
                    job.emit(("text", delta))
            return text.stopped or job.cancelled.is_set()

        adapters = getattr(self.model, "adapters", None)
        with adapters.use(job.adapter) if adapters is not None else contextlib.nullcontext():
            gen = generate(self.model, job.ids, job.max_tokens, job.temperature, job.seed, eos, on_token,
                           top_k=job.top_k, top_p=job.top_p)
        rest = text.finish()
        if rest:
            job.emit(("text", rest))
        stopped = text.stopped or (gen.tokens and gen.tokens[-1] == eos)
        return Outcome(len(job.ids), len(gen.tokens), "stop" if stopped else "length", gen.prefill_seconds,
                       gen.decode_seconds, pager.stats_snapshot().since(before))

    def count(self, endpoint: str, outcome: str) -> None:
        """Count a request the worker never saw (refused: invalid or over the queue)."""
        with self.lock:
            self.totals.count(endpoint, outcome)

    def _record(self, job: Job, outcome: str, result: Outcome | None) -> None:
        with self.lock:
            t = self.totals
            t.count(job.endpoint, outcome)
            if result is not None:
                t.prompt_tokens += result.prompt_tokens
                t.completion_tokens += result.completion_tokens
                t.decode_tokens += max(0, result.completion_tokens - 1)
                t.prefill_seconds += result.prefill_seconds
                t.decode_seconds += result.decode_seconds
                t.last_decode_tokens_per_s = result.decode_tokens_per_s
