"""Start the server: check the model reference and the address, load the model in the background while uvicorn
already answers (/health says 503 until it is ready), and stop with the loading error if there is one."""

import socket
import sys
import threading
from pathlib import Path

import uvicorn

from ..errors import ExpertPagerError
from ..model.demo import demo_model_path
from ..model.layout import Layout
from ..runner import load_tokenizer, open_model
from .app import create_app
from .engine import Engine


def model_id(ref: str) -> str:
    """The name /v1/models lists: a repo id as given, a local checkpoint's file or folder name."""
    if Path(ref).resolve() == demo_model_path():
        return "expertpager-demo"
    return Path(ref).name if Path(ref).exists() else ref


def listen(host: str, port: int) -> socket.socket:
    """A bound socket, or one clear error when the address is taken or not this machine's."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ExpertPagerError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(ref: str, layout: Layout, host: str, port: int, max_queue: int, load_options: dict) -> None:
    """Serve `ref` (whose layout is `layout`; a remote one's open Store in load_options["store"]) until interrupted;
    raises ExpertPagerError when the model cannot be loaded."""
    tokenizer = load_tokenizer(layout.path)
    if tokenizer is None:
        raise ExpertPagerError(f"{layout.path}: serve needs a checkpoint with a tokenizer")
    engine = Engine(lambda: (open_model(ref, False, **load_options), tokenizer), max_queue)
    name = model_id(ref)
    sock = listen(host, port)
    app = create_app(engine, name, list(load_options.get("adapters") or {}))
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=2))

    def watch_loading() -> None:
        engine.loading_done.wait()
        if engine.error is not None:
            server.should_exit = True
        else:
            print(f"expertpager: {name} is ready on http://{host}:{sock.getsockname()[1]}", file=sys.stderr, flush=True)

    print(f"expertpager: loading {name} ...", file=sys.stderr, flush=True)
    engine.start()
    threading.Thread(target=watch_loading, daemon=True).start()
    server.run(sockets=[sock])
    engine.close()
    if engine.error is not None:
        raise ExpertPagerError(engine.error)
