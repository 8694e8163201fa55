"""Opening a remote reference's store: list the remote files (or, offline, read what the store recorded), fetch the
skeleton, read its layout with the model layer's own header readers, and hand back a Store."""

import json
import os
import re
import shutil
from pathlib import Path

from ..errors import ExpertPagerError
from ..model.layout import Layout
from ..model.read_layout import read_layout
from .http import RangeClient
from .lock import LOCK_FILE, store_locked
from .refs import RemoteModel, is_remote, list_remote
from .skeleton import fetch_skeleton, pwrite_all, write_atomic
from .store import STORE_FILE, Store


def default_store(ref: str) -> Path:
    """Where a reference's store lives by default: a folder under the Hugging Face cache (HF_HUB_CACHE)."""
    from huggingface_hub import constants

    slug = re.sub(r"[^\w.@-]+", "--", ref.split("://", 1)[-1]).strip("-")
    return Path(constants.HF_HUB_CACHE) / "expertpager" / slug


def is_offline() -> bool:
    """huggingface_hub's offline mode: HF_HUB_OFFLINE=1 (read now as well as at the Hub client's import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def open_store(ref: str, folder: str | Path | None = None, disk: int | None = None, offline: bool | None = None,
               client: RangeClient | None = None) -> Store:
    """The store of remote checkpoint `ref` in `folder` (default: default_store) under a disk budget of `disk`
    bytes (None: no limit); offline (default: huggingface_hub's offline mode) it uses only what the store holds."""
    folder = Path(folder) if folder is not None else default_store(ref)
    offline = is_offline() if offline is None else offline
    client = client or RangeClient()
    meta_path = folder / STORE_FILE
    if not meta_path.exists() and folder.exists() and any(p.name != LOCK_FILE for p in folder.iterdir()):
        raise ExpertPagerError(f"{folder}: not an expertpager store (no {STORE_FILE}) and not empty; give an empty "
                               "or new folder to --store")
    if offline and not meta_path.exists():
        raise ExpertPagerError(f"{ref}: offline, and there is no store for it at {folder}; "
                               f"run `expertpager pull {ref}` online first")
    model = None if offline else list_remote(ref, client)
    folder.mkdir(parents=True, exist_ok=True)
    with store_locked(folder):  # another process may be opening or using the same store
        old = json.loads(meta_path.read_text()) if meta_path.exists() else None
        if model is None:
            model = RemoteModel.from_json(old["model"])
        elif old is not None and (old["model"]["ref"] != ref or old["model"]["version"] != model.version):
            _clear(folder)  # another checkpoint, or the remote changed: slices must not be mixed
            old = None
        fixed = fetch_skeleton(folder, model, client)
        if old is None:
            raw = json.dumps({"model": model.to_json(), "resident": False}, indent=1).encode()
            write_atomic(meta_path, len(raw), lambda fd: pwrite_all(fd, raw, 0))
    return Store(folder, model, _layout(folder, model), fixed, disk, client, offline)


def _clear(folder: Path) -> None:
    """Everything in the store folder but its lock file (which other processes may be waiting on)."""
    for p in folder.iterdir():
        if p.name == LOCK_FILE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _layout(folder: Path, model: RemoteModel) -> Layout:
    """The skeleton's layout; errors name the remote URL rather than the skeleton's path."""
    try:
        return read_layout(folder / model.weights[0] if model.kind == "gguf" else folder)
    except ExpertPagerError as e:
        message = str(e)
        for name, f in model.files.items():
            message = message.replace(str(folder / name), f.url)
        raise ExpertPagerError(message) from None


def resolve_layout(ref: str, store: str | Path | None = None, disk: int | None = None,
                   offline: bool | None = None) -> tuple[Layout, Store | None]:
    """The layout of a local or remote reference, and for a remote one its Store (headers only so far)."""
    if not is_remote(ref):
        return read_layout(ref), None
    s = open_store(ref, store, disk, offline)
    return s.layout, s
