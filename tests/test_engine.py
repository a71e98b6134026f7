"""Engine pieces on a real tokenizer: detokenization, stop sequences, sampling."""

from __future__ import annotations

import torch

from cortex.protocol.messages import SamplingParams
from neuron.engine.detokenize import IncrementalDetokenizer
from neuron.engine.sampling import Sampler, SamplingDefaults
from neuron.engine.stops import StopMatcher


def _stream(tokenizer, text: str) -> list[str]:
    prompt = tokenizer("Say:", add_special_tokens=False)["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


def test_detokenizer_reassembles_multibyte_text_exactly(tokenizer) -> None:
    text = "Grüße aus Köln 👋🏽 — 東京タワー, naïve café."
    pieces = _stream(tokenizer, text)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces), "a delta split a character"


def test_detokenizer_keeps_spaces_between_words(tokenizer) -> None:
    text = " The quick  brown fox\njumps."
    assert "".join(_stream(tokenizer, text)) == text


def test_stop_sequence_is_trimmed_even_when_split_across_pieces() -> None:
    stops = StopMatcher(["END"])
    out = [stops.push(p) for p in ["hello E", "N", "D tail"]]
    assert "".join(text for text, _ in out) == "hello "
    assert out[-1][1] == "END"


def test_text_that_only_looks_like_a_stop_is_released() -> None:
    stops = StopMatcher(["END"])
    assert stops.push("an E") == ("an ", None)
    assert stops.push("Nx") == ("ENx", None)
    assert stops.flush() == ""


def test_earliest_of_several_stops_wins() -> None:
    stops = StopMatcher(["world", "lo w"])
    assert stops.push("hello world") == ("hel", "lo w")


def _logits() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(1000)


def test_temperature_zero_is_argmax() -> None:
    logits = _logits()
    sampler = Sampler(SamplingParams(temperature=0.0), SamplingDefaults(), torch.device("cpu"))
    assert sampler(logits) == int(torch.argmax(logits))


def test_same_seed_same_draws() -> None:
    logits = _logits()
    params = SamplingParams(temperature=1.0, seed=42)
    a = Sampler(params, SamplingDefaults(), torch.device("cpu"))
    b = Sampler(params, SamplingDefaults(), torch.device("cpu"))
    assert [a(logits) for _ in range(20)] == [b(logits) for _ in range(20)]


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.tensor([10.0, 9.5, 0.0, 0.0, 0.0])  # the first two hold > 99% of the mass
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.9, seed=0), SamplingDefaults(), torch.device("cpu"))
    assert {sampler(logits) for _ in range(200)} <= {0, 1}


def test_a_top_p_or_temperature_too_small_for_float32_is_greedy_not_a_crash() -> None:
    logits = _logits()
    for params in (SamplingParams(temperature=1.0, top_p=1e-103), SamplingParams(temperature=1e-300)):
        sampler = Sampler(params, SamplingDefaults(), torch.device("cpu"))
        assert sampler(logits) == int(torch.argmax(logits))


def test_top_k_one_is_greedy() -> None:
    logits = _logits()
    sampler = Sampler(SamplingParams(temperature=1.5, top_k=1, seed=0), SamplingDefaults(), torch.device("cpu"))
    assert {sampler(logits) for _ in range(20)} == {int(torch.argmax(logits))}


def test_model_default_temperature_applies_only_when_the_request_sets_none() -> None:
    logits = _logits()
    greedy_model = SamplingDefaults(temperature=0.0)
    unset = Sampler(SamplingParams(seed=1), greedy_model, torch.device("cpu"))
    assert {unset(logits) for _ in range(10)} == {int(torch.argmax(logits))}
    explicit = Sampler(SamplingParams(temperature=2.0, seed=1), greedy_model, torch.device("cpu"))
    assert len({explicit(logits) for _ in range(30)}) > 1
