"""Model references: a local folder or .gguf file, or a Hugging Face repo id found in the local cache (no network)."""

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ExpertPagerError

REPO_ID = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+?))?(?::(?P<quant>[\w.-]+))?$")
SPLIT_GGUF = re.compile(r"^(?P<stem>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class ResolvedModel:
    """What a reference names on disk: an HF-layout folder, or a GGUF file list (several for a split GGUF)."""

    format: str  # "safetensors", "gguf" or "repacked"
    path: Path  # the folder, or the first .gguf
    files: tuple[Path, ...]  # safetensors shards or gguf parts, in order


def resolve(ref: str) -> ResolvedModel:
    """Find what `ref` points to: a folder, a .gguf file (or first part of a split), or org/name[@rev][:QUANT] in the HF cache."""
    path = Path(ref).expanduser()
    if path.exists():
        return _resolve_path(path)
    m = REPO_ID.match(ref)
    if m and not ref.startswith((".", "/", "~")):
        return _resolve_path(_cached_snapshot(m["repo"], m["revision"]), quant=m["quant"], repo=m["repo"])
    raise ExpertPagerError(f"{ref}: no such file or folder, and not a Hugging Face repo id (org/name)")


def _resolve_path(path: Path, quant: str | None = None, repo: str | None = None) -> ResolvedModel:
    if path.is_file():
        if path.suffix != ".gguf":
            raise ExpertPagerError(f"{path}: not a model; give a folder with config.json and *.safetensors, or a .gguf file")
        return ResolvedModel("gguf", path, gguf_parts(path))
    if (path / "expertpager.json").exists():
        return ResolvedModel("repacked", path, (path / "expertpager.json",))
    ggufs = sorted(path.rglob("*.gguf"))
    if quant is not None or (ggufs and not (path / "config.json").exists()):
        return _pick_gguf(path, ggufs, quant, repo)
    if not (path / "config.json").exists():
        raise ExpertPagerError(f"{path}: no config.json; a model folder needs config.json and *.safetensors (or a .gguf file)")
    return ResolvedModel("safetensors", path, safetensors_files(path))


def _pick_gguf(folder: Path, ggufs: list[Path], quant: str | None, repo: str | None) -> ResolvedModel:
    firsts = [p for p in ggufs if not (m := SPLIT_GGUF.match(p.name)) or int(m["index"]) == 1]
    if quant:
        firsts = [p for p in firsts if quant.lower() in p.name.lower()]
    if len(firsts) != 1:
        names = ", ".join(p.name for p in firsts) or "none"
        what = f"quant {quant!r}" if quant else "one .gguf file"
        raise ExpertPagerError(f"{repo or folder}: expected {what}, found {len(firsts)} ({names}); name the file or add :QUANT")
    return ResolvedModel("gguf", firsts[0], gguf_parts(firsts[0]))


def gguf_parts(first: Path) -> tuple[Path, ...]:
    """All parts of a split GGUF (name-00001-of-0000N.gguf), or just the file."""
    m = SPLIT_GGUF.match(first.name)
    if not m:
        return (first,)
    count = int(m["count"])
    parts = tuple(first.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1))
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise ExpertPagerError(f"{first}: split GGUF is missing part(s) {', '.join(missing)}")
    return parts


SIDECAR_FILES = ("speculator.safetensors",)  # files expertpager keeps beside a model's weights, not part of them


def safetensors_files(folder: Path) -> tuple[Path, ...]:
    """The shards named by model.safetensors.index.json, or the folder's *.safetensors files but SIDECAR_FILES."""
    import json

    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ExpertPagerError(f"{index}: corrupt index ({type(e).__name__}: {e})") from None
        missing = [s for s in shards if not (folder / s).exists()]
        if missing:
            raise ExpertPagerError(f"{index}: names shard {missing[0]} which does not exist in {folder}")
        return tuple(folder / s for s in shards)
    files = tuple(sorted(f for f in folder.glob("*.safetensors") if f.name not in SIDECAR_FILES))
    if not files:
        raise ExpertPagerError(f"{folder}: no *.safetensors files")
    return files


def _cached_snapshot(repo: str, revision: str | None) -> Path:
    """The snapshot folder of `repo` in the local HF cache (HF_HOME / HF_HUB_CACHE respected); never downloads."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        rev = f" --revision {revision}" if revision else ""
        raise ExpertPagerError(
            f"{repo}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); "
            f"download it first with: hf download {repo}{rev}") from None
