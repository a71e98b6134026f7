"""A preflight plan -> files on local disk, downloading what the plan needs and nothing else.

hf:org/name[@revision]    Hugging Face hub, through huggingface_hub's cache
                          (HF_HUB_OFFLINE=1 or `offline = true` reads the cache only)
file:/path                a model folder (config.json + weights) or one .gguf file
pkg:<package>/<file>      a file inside an installed Python package (the package is
                          located, never imported)
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from neuron.sources.inspect import hub_repo, package_path
from neuron.sources.preflight import Plan

# What a dense (safetensors) model needs besides its weights; .bin only as a last resort.
_HF_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


class SourceError(ValueError):
    """Files the plan needs cannot be fetched: a failed download, offline without a cache."""


@dataclass(frozen=True)
class ResolvedSource:
    directory: Path
    gguf_file: str | None = None
    identity: str = ""  # what the files are, for caches keyed on them


def resolve(
    plan: Plan,
    *,
    cache_dir: Path | None = None,
    offline: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ResolvedSource:
    spec = plan.spec
    scheme, _, rest = spec.source.partition(":")
    if scheme == "file":
        return _local(Path(rest).expanduser(), plan)
    if scheme == "pkg":
        return _local(package_path(rest, spec), plan)
    return _from_hub(rest, plan, cache_dir, offline, progress)


def _local(path: Path, plan: Plan) -> ResolvedSource:
    directory = path.parent if path.is_file() else path
    if plan.gguf_file is None and not (directory / "config.json").exists():
        raise SourceError(f"model {plan.spec.id}: {directory} has weights but no config.json")
    weights = directory / plan.gguf_file if plan.gguf_file else directory / "config.json"
    stat = weights.stat()
    return ResolvedSource(directory, plan.gguf_file, f"{weights.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")


def _from_hub(
    ref: str, plan: Plan, cache_dir: Path | None, offline: bool, progress: Callable[[int, int], None] | None
) -> ResolvedSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, revision = hub_repo(ref, plan.spec)
    patterns = ["*.json", plan.gguf_file] if plan.gguf_file else list(_HF_PATTERNS)
    try:
        local = snapshot_download(
            repo,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=patterns,
            local_files_only=offline,  # HF_HUB_OFFLINE=1 makes huggingface_hub offline as well
            tqdm_class=_progress_bar(progress) if progress else None,
        )
    except LocalEntryNotFoundError as exc:
        raise SourceError(
            f"model {plan.spec.id}: {repo} is not in the Hugging Face cache and downloads are off "
            f"(offline mode); download it once while online, or point at a file: source"
        ) from exc
    except HfHubHTTPError as exc:
        raise SourceError(f"model {plan.spec.id}: hub download of {repo} failed: {exc}") from exc
    return _local(Path(local), plan)


def _progress_bar(report: Callable[[int, int], None]) -> type:
    """A tqdm class for snapshot_download that reports (bytes done, bytes total) instead of drawing."""
    from tqdm.auto import tqdm

    class Reporter(tqdm):  # type: ignore[misc]  # tqdm has no types: this subclasses Any
        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs["disable"] = False
            kwargs["file"] = io.StringIO()
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            shown: bool | None = super().update(n)
            if self.unit == "B" and self.total:
                report(int(self.n), int(self.total))
            return shown

    return Reporter
