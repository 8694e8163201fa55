"""Remote model references: `hf://org/name[@rev][:QUANT]` through huggingface_hub (HF_ENDPOINT, tokens), a plain
`https://.../model.gguf`, or a folder URL (ending in /) of a safetensors or repacked checkpoint. Listing a reference
finds its files, their sizes and the version (the Hub's commit, or the files' ETags) without reading any weights."""

import os
import re
from dataclasses import asdict, dataclass, field
from urllib.parse import urljoin, urlsplit

from ..errors import ExpertPagerError
from ..model.manifest import MANIFEST
from ..model.refs import SIDECAR_FILES, SPLIT_GGUF
from .http import RangeClient

HF_REF = re.compile(r"^hf://(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+?))?(?::(?P<quant>[\w.-]+))?$")
SMALL_SUFFIXES = (".json", ".model", ".txt", ".jinja")  # config, tokenizer and generation files, fetched whole
FOLDER_PROBES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "tokenizer.model", "chat_template.jinja", *SIDECAR_FILES)


def is_remote(ref: str) -> bool:
    """Whether `ref` names a remote checkpoint (hf://, http:// or https://)."""
    return str(ref).startswith(("hf://", "http://", "https://"))


SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class RemoteFile:
    name: str  # path relative to the checkpoint folder
    url: str  # where range requests go (after the Hub's redirects)
    size: int
    etag: str | None = None
    sha256: str | None = None  # the content's SHA-256 as the server publishes it (see published_sha256)


def published_sha256(etag: str | None) -> str | None:
    """The SHA-256 an ETag publishes, when it is 64 hex digits: the Hub's ETag of an LFS file (X-Linked-Etag). Only
    that header counts for a plain URL: an arbitrary server's ETag may be 64 hex digits of something else."""
    bare = (etag or "").removeprefix("W/").strip('"').lower()
    return bare if SHA256.match(bare) else None


@dataclass
class RemoteModel:
    """A remote checkpoint's files. weights: files read by range (safetensors shards, GGUF parts, repacked expert
    and resident files); every other file is small and fetched whole. version: changes when any file does."""

    ref: str
    kind: str  # "safetensors", "gguf" or "repacked"
    version: str
    files: dict[str, RemoteFile]
    weights: list[str]
    headers: dict = field(default_factory=dict)  # sent with every request (the Hub's auth); never stored

    def to_json(self) -> dict:
        return {"ref": self.ref, "kind": self.kind, "version": self.version, "weights": self.weights,
                "files": {n: asdict(f) for n, f in self.files.items()}}

    @classmethod
    def from_json(cls, d: dict, headers: dict | None = None) -> "RemoteModel":
        return cls(d["ref"], d["kind"], d["version"], {n: RemoteFile(**f) for n, f in d["files"].items()},
                   list(d["weights"]), headers or {})


def list_remote(ref: str, client: RangeClient) -> RemoteModel:
    """The files of the remote checkpoint `ref` (network; no weights read)."""
    if ref.startswith("hf://"):
        return _list_hf(ref)
    path = urlsplit(ref).path
    if path.endswith(".gguf"):
        return _list_gguf_url(ref, client)
    if not path.endswith("/"):
        raise ExpertPagerError(f"{ref}: a remote model is a .gguf URL, a folder URL ending in / (config.json and "
                               "*.safetensors, or a repacked folder), or hf://org/name[@rev][:QUANT]")
    return _list_folder_url(ref, client)


def _list_gguf_url(ref: str, client: RangeClient) -> RemoteModel:
    name = urlsplit(ref).path.rsplit("/", 1)[-1]
    m = SPLIT_GGUF.match(name)
    names = [name] if not m else [f"{m['stem']}-{i:05d}-of-{int(m['count']):05d}.gguf" for i in range(1, int(m["count"]) + 1)]
    files = {n: _http_file(n, urljoin(ref, n), client) for n in names}
    return RemoteModel(ref, "gguf", _etags(files), files, names)


def _list_folder_url(ref: str, client: RangeClient) -> RemoteModel:
    found = {n: f for n in (MANIFEST, "model.safetensors.index.json", *FOLDER_PROBES)
             if (f := _http_file(n, urljoin(ref, n), client, missing_ok=True)) is not None}
    if MANIFEST in found:
        kind, weights = "repacked", _manifest_weights(client, found[MANIFEST], {})
    elif "config.json" in found:
        kind = "safetensors"
        index = found.get("model.safetensors.index.json")
        weights = _index_shards(client, index, {}) if index else ["model.safetensors"]
    else:
        raise ExpertPagerError(f"{ref}: no config.json or {MANIFEST} at this folder URL; a remote folder needs "
                               "config.json and *.safetensors, or a repacked checkpoint")
    for n in weights:
        if n not in found:
            found[n] = _http_file(n, urljoin(ref, n), client)
    return RemoteModel(ref, kind, _etags(found), found, weights)


def _http_file(name: str, url: str, client: RangeClient, missing_ok: bool = False) -> RemoteFile | None:
    try:
        size, etag, linked = client.head(url)
    except ExpertPagerError as e:
        if missing_ok and "HTTP 404" in str(e):
            return None
        raise
    return RemoteFile(name, url, size, etag, published_sha256(linked))


def _etags(files: dict[str, RemoteFile]) -> str:
    return ";".join(f"{n}={f.etag or ''}:{f.size}" for n, f in sorted(files.items()))


def _fetch_json(client: RangeClient, f: RemoteFile, headers: dict) -> dict:
    import json

    try:
        data = json.loads(client.read(f.url, 0, f.size, headers)) if f.size else None
    except ValueError as e:
        raise ExpertPagerError(f"{f.url}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ExpertPagerError(f"{f.url}: not a JSON object")
    return data


def _index_shards(client: RangeClient, index: RemoteFile, headers: dict) -> list[str]:
    try:
        return sorted(set(_fetch_json(client, index, headers)["weight_map"].values()))
    except (KeyError, AttributeError, TypeError):
        raise ExpertPagerError(f"{index.url}: corrupt safetensors index (no weight_map)") from None


def _manifest_weights(client: RangeClient, manifest: RemoteFile, headers: dict) -> list[str]:
    from ..model.manifest import RESIDENT_FILES

    m = _fetch_json(client, manifest, headers)
    try:
        return [RESIDENT_FILES[m["source_format"]], *sorted({s["file"] for s in m["slices"]})]
    except (KeyError, TypeError):
        raise ExpertPagerError(f"{manifest.url}: not an expertpager manifest") from None


def hf_endpoint() -> str:
    """The Hub endpoint: HF_ENDPOINT as set now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def _list_hf(ref: str) -> RemoteModel:
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    m = HF_REF.match(ref)
    if not m:
        raise ExpertPagerError(f"{ref}: not a Hugging Face reference; use hf://org/name[@revision][:QUANT]")
    repo, endpoint = m["repo"], hf_endpoint()
    try:
        info = HfApi(endpoint=endpoint).model_info(repo, revision=m["revision"])
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ExpertPagerError(f"{ref}: {type(e).__name__} at {endpoint} (a private or gated repo needs a token: "
                               "HF_TOKEN or `hf auth login`)") from None
    except (HfHubHTTPError, OSError) as e:
        raise ExpertPagerError(f"{ref}: cannot list the repo at {endpoint} ({e})") from None
    names = [s.rfilename for s in info.siblings or []]
    kind, weights = _hf_kind(ref, names, m["quant"])
    headers = build_hf_headers()

    def remote_file(name: str) -> RemoteFile:
        url = hf_hub_url(repo, name, revision=info.sha, endpoint=endpoint)
        try:
            meta = get_hf_file_metadata(url, retry_on_errors=True)
        except (HfHubHTTPError, OSError) as e:
            raise ExpertPagerError(f"{url}: cannot read the file's metadata ({e})") from None
        if meta.size is None:
            raise ExpertPagerError(f"{url}: the Hub gives no size for this file")
        # the commit pins the content (redirects are followed per read); meta.etag is X-Linked-Etag or the ETag
        return RemoteFile(name, url, meta.size, None, published_sha256(meta.etag))

    small = [n for n in names if "/" not in n and n.endswith(SMALL_SUFFIXES) or n in SIDECAR_FILES]
    files = {n: remote_file(n) for n in dict.fromkeys(small + weights)}
    if kind == "safetensors" and "model.safetensors.index.json" in files:
        weights = _index_shards(RangeClient(), files["model.safetensors.index.json"], headers)
    elif kind == "repacked":
        weights = _manifest_weights(RangeClient(), files[MANIFEST], headers)
    missing = [n for n in weights if n not in names]
    if missing:
        raise ExpertPagerError(f"{ref}: the checkpoint names {missing[0]}, which the repo does not have")
    files.update({n: remote_file(n) for n in weights if n not in files})
    return RemoteModel(ref, kind, info.sha, files, weights, headers)


def _hf_kind(ref: str, names: list[str], quant: str | None) -> tuple[str, list[str]]:
    """(kind, weight files) of a Hub repo from its file names; a GGUF repo's file is picked by :QUANT."""
    if MANIFEST in names and quant is None:
        return "repacked", []
    ggufs = sorted(n for n in names if n.endswith(".gguf"))
    if quant is not None or (ggufs and "config.json" not in names):
        firsts = [n for n in ggufs if not (s := SPLIT_GGUF.match(n.rsplit("/", 1)[-1])) or int(s["index"]) == 1]
        if quant:
            firsts = [n for n in firsts if quant.lower() in n.lower()]
        if len(firsts) != 1:
            what = f"quant {quant!r}" if quant else "one .gguf file"
            raise ExpertPagerError(f"{ref}: expected {what}, found {len(firsts)} ({', '.join(firsts) or 'none'}); add :QUANT")
        s = SPLIT_GGUF.match(firsts[0].rsplit("/", 1)[-1])
        if not s:
            return "gguf", firsts
        folder = firsts[0][: -len(s.group(0))]
        parts = [f"{folder}{s['stem']}-{i:05d}-of-{int(s['count']):05d}.gguf" for i in range(1, int(s["count"]) + 1)]
        missing = [p for p in parts if p not in names]
        if missing:
            raise ExpertPagerError(f"{ref}: split GGUF is missing part(s) {', '.join(missing)}")
        return "gguf", parts
    if "config.json" not in names:
        raise ExpertPagerError(f"{ref}: the repo has neither config.json nor a .gguf file")
    if "model.safetensors.index.json" in names:
        return "safetensors", []
    shards = [n for n in names if n.endswith(".safetensors") and "/" not in n and n not in SIDECAR_FILES]
    if not shards:
        raise ExpertPagerError(f"{ref}: the repo has config.json but no *.safetensors files")
    return "safetensors", shards
