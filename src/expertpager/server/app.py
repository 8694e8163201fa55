"""The HTTP side of `expertpager serve`: OpenAI's /v1 endpoints, /health, /metrics, and the page at / with its
live feed of the expert cache. Requests become Jobs for the Engine; its events come back through an asyncio queue."""

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..runner import chat_ids
from .cache_view import CacheView
from .engine import Busy, Engine, Job, Outcome
from .metrics import render
from .protocol import ChatRequest, CompletionRequest, Sampling, error_body, validation_error

PAGE = Path(__file__).with_name("page.html")
CACHE_EVENT_SECONDS = 0.5


class ApiError(Exception):
    """A request the server answers with an OpenAI error."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str = "invalid_value",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, kind, code, param)


def _endpoint(request: Request) -> str:
    return "chat" if request.url.path.endswith("/chat/completions") else "completions"


def create_app(engine: Engine, model_id: str, adapters: list[str] = ()) -> FastAPI:
    """The ASGI app over `engine` (started by the caller), answering for the model named `model_id` and for each of
    its loaded LoRA `adapters` by name (a request's `model` picks one; any other name gets the base model)."""
    app = FastAPI(title="expertpager", docs_url=None, redoc_url=None, openapi_url=None)
    views: list[CacheView] = []
    engine.on_loaded.append(lambda model: views.append(CacheView(model)))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        engine.count(_endpoint(request), {400: "invalid", 429: "rejected"}.get(e.status, "unavailable"))
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        engine.count(_endpoint(request), "invalid")
        return JSONResponse(validation_error(list(e.errors())), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), code=str(e.status_code)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, e: Exception) -> JSONResponse:  # uvicorn logs the traceback
        return JSONResponse(error_body(f"internal error: {e}", "server_error", "internal"), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.error is not None:
            return JSONResponse({"status": "error", "error": engine.error}, status_code=500)
        if not engine.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "expertpager",
                                            **({"parent": model_id} if name != model_id else {})}
                                           for name in [model_id, *adapters]]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        _check_ready(engine)
        if not getattr(engine.tokenizer, "chat_template", None):
            raise ApiError(400, f"{model_id} has no chat template; use /v1/completions", code="no_chat_template")
        try:
            ids = chat_ids(engine.tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages])
        except Exception as e:  # noqa: BLE001 - the template rejected the conversation (jinja raises its own errors)
            raise ApiError(400, f"the chat template rejected the messages: {e}", param="messages") from None
        return await _answer(engine, request, body, ids, "chat", model_id, adapters)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _check_ready(engine)
        if isinstance(body.prompt, str):
            ids = engine.tokenizer(body.prompt)["input_ids"]
        else:
            vocab = engine.model.config.vocab_size
            if any(not 0 <= t < vocab for t in body.prompt):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            ids = list(body.prompt)
        return await _answer(engine, request, body, ids, "completions", model_id, adapters)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render(engine), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/cache")
    async def cache() -> dict:
        return views[0].snapshot() if views else {"loading": True}

    @app.get("/cache/events")
    async def cache_events() -> StreamingResponse:
        async def feed() -> AsyncIterator[str]:
            while True:  # ends when the client goes: Starlette cancels the stream
                yield f"data: {json.dumps(views[0].snapshot() if views else {'loading': True})}\n\n"
                await asyncio.sleep(CACHE_EVENT_SECONDS)
        return StreamingResponse(feed(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    return app


def _check_ready(engine: Engine) -> None:
    if engine.error is not None:
        raise ApiError(500, engine.error, "server_error", "load_failed")
    if not engine.ready.is_set():
        raise ApiError(503, "the model is still loading; retry when GET /health answers 200", "server_error",
                       "model_loading")


async def _answer(engine: Engine, request: Request, body: Sampling, ids: list[int], endpoint: str,
                  model_id: str, adapters: list[str] = ()) -> Response:
    """Queue the request, then answer it whole or as a stream of SSE chunks (with the adapter its `model` names)."""
    adapter = body.model if body.model in adapters else None
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    context = engine.context
    if len(ids) >= context:
        raise ApiError(400, f"the prompt is {len(ids)} tokens; this model's context is {context} tokens",
                       code="context_length_exceeded", param="messages" if endpoint == "chat" else "prompt")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = Job(ids=ids, max_tokens=min(body.limit or context, context - len(ids)), temperature=body.temperature,
              top_p=body.top_p, top_k=body.top_k, seed=secrets.randbits(63) if body.seed is None else body.seed,
              stops=body.stops, emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
              endpoint=endpoint, adapter=adapter)
    try:
        engine.submit(job)
    except Busy as e:
        raise ApiError(429, str(e), "rate_limit_exceeded", "queue_full") from None
    shape = Shape(endpoint, adapter or model_id)
    if body.stream:
        return StreamingResponse(_stream(job, events, shape, body.include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await _whole(request, job, events, shape)


class Shape:
    """The JSON of one response, chat or completions."""

    def __init__(self, endpoint: str, model_id: str):
        self.chat = endpoint == "chat"
        self.head = {"id": ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                     "model": model_id}

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**self.head, "object": "chat.completion.chunk", "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self.head, "object": "text_completion", "choices": [choice]}

    def whole(self, text: str, outcome: Outcome) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": outcome.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": outcome.finish_reason}
        return {**self.head, "object": "chat.completion" if self.chat else "text_completion", "choices": [choice],
                "usage": usage(outcome), **extras(outcome)}


def usage(outcome: Outcome) -> dict:
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}


def extras(outcome: Outcome) -> dict:
    """What a response carries beyond OpenAI's fields: llama-server's `timings` and this request's paging."""
    return {"timings": outcome.timings(), "paging": outcome.paging_stats()}


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def _stream(job: Job, events: asyncio.Queue, shape: Shape, include_usage: bool) -> AsyncIterator[str]:
    """Role chunk, text chunks, a final chunk with finish_reason (and timings, paging), usage if asked, [DONE].
    A client that goes away cancels this generator, which cancels the job."""
    try:
        if shape.chat:
            yield _sse(shape.chunk(None, first=True))
        while True:
            kind, value = await events.get()
            if kind == "text":
                yield _sse(shape.chunk(value))
            elif kind == "error":
                yield _sse(error_body(value, "server_error"))
                break
            else:
                yield _sse({**shape.chunk(None, value.finish_reason), **extras(value)})
                if include_usage:
                    yield _sse({**shape.chunk(None), "choices": [], "usage": usage(value)})
                break
        yield _sse("[DONE]")
    finally:
        job.cancelled.set()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read, so only that message remains)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _whole(request: Request, job: Job, events: asyncio.Queue, shape: Shape) -> Response:
    watcher = asyncio.ensure_future(_disconnected(request))
    parts: list[str] = []
    try:
        while True:
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                job.cancelled.set()
                return Response(status_code=499)
            kind, value = getter.result()
            if kind == "text":
                parts.append(value)
            elif kind == "error":
                return JSONResponse(error_body(value, "server_error"), status_code=500)
            else:
                return JSONResponse(shape.whole("".join(parts), value))
    finally:
        watcher.cancel()
