"""Bad input at the HTTP boundary: every malformed, mistyped, out-of-range or oversized request to an
inference endpoint gets a 4xx in the envelope of the dialect that was called, never a 500, a hang or a
job left running; then schemathesis throws generated requests, valid and not, at the same endpoints."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from tests.conftest import Gateway, nats_request, wait_until

NATS_MAX_PAYLOAD = 8 * 1024 * 1024  # nats.conf's max_payload, which the test nats-server runs with
HI = [{"role": "user", "content": "hi"}]
CHAT, COMPLETIONS, MESSAGES, COUNT = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/messages",
    "/v1/messages/count_tokens",
)
INFERENCE_PATHS = (CHAT, COMPLETIONS, MESSAGES, COUNT)


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def _valid(path: str, **fields: Any) -> bytes:
    """A request the endpoint would serve, with `fields` replacing or adding to it."""
    base: dict[str, Any] = {
        CHAT: {"model": "tiny", "messages": HI, "max_tokens": 2},
        COMPLETIONS: {"model": "tiny", "prompt": "hi", "max_tokens": 2},
        MESSAGES: {"model": "tiny", "messages": HI, "max_tokens": 2},
        COUNT: {"model": "tiny", "messages": HI},
    }[path]
    return _json({**base, **fields})


def _oversized(path: str) -> bytes:
    """A prompt a megabyte beyond NATS max_payload: valid JSON, valid fields, too big to publish."""
    text = "a" * (NATS_MAX_PAYLOAD + 1024 * 1024)
    if path == COMPLETIONS:
        return _valid(path, prompt=text)
    return _valid(path, messages=[{"role": "user", "content": text}])


# (endpoint, raw body, status, a fragment the error message must hold)
CASES: list[tuple[str, bytes, int, str]] = []
for _path in INFERENCE_PATHS:
    CASES += [
        (_path, b"{not json", 400, "not valid JSON"),
        (_path, b"", 400, "Field required"),
        (_path, b"[1, 2]", 400, "valid dictionary"),
        (_path, b'{"model": "tiny", "messages": [{"role": "user", "content": "caf\xe9"}]}', 400, "not valid UTF-8"),
        (_path, b"[" * 100_000 + b"]" * 100_000, 400, "nests too deeply"),
        (_path, _valid(_path, model=5), 400, "invalid `model`"),
        (_path, _valid(_path, model="nobody/nothing"), 404, "nobody/nothing"),
        (_path, _valid(_path, unknown_knob=1), 400, "unknown_knob"),
        (_path, _oversized(_path), 413, f"max_payload is {NATS_MAX_PAYLOAD} bytes"),
    ]
    lone_surrogate = (
        {"prompt": "\ud800 hi"} if _path == COMPLETIONS else {"messages": [{"role": "user", "content": "\udfff"}]}
    )
    CASES.append((_path, _valid(_path, **lone_surrogate), 400, "lone UTF-16 surrogate"))
for _path in (CHAT, COMPLETIONS, MESSAGES):
    CASES += [
        (_path, _valid(_path, max_tokens=-1), 400, "invalid `max_tokens`: Input should be greater than or equal to 1"),
        (_path, _valid(_path, max_tokens=0), 400, "invalid `max_tokens`: Input should be greater than or equal to 1"),
        (_path, _valid(_path, max_tokens=10**12), 400, "invalid `max_tokens`: Input should be less than or equal to"),
        (_path, _valid(_path, max_tokens="ten"), 400, "invalid `max_tokens`"),
        (_path, _valid(_path, temperature="hot"), 400, "invalid `temperature`"),
        (_path, _valid(_path, stream="yes please"), 400, "invalid `stream`"),
    ]
CASES += [
    (CHAT, _valid(CHAT, messages="hi"), 400, "invalid `messages`: Input should be a valid list"),
    (CHAT, _valid(CHAT, messages=[]), 400, "invalid `messages`"),
    (CHAT, _valid(CHAT, messages=[{"role": "wizard", "content": "hi"}]), 400, "invalid `messages.0.role`"),
    (CHAT, _valid(CHAT, max_tokens=1e400), 400, "finite number"),  # json.dumps writes Infinity
    (CHAT, _valid(CHAT, max_completion_tokens=2**40), 400, "invalid `max_completion_tokens`"),
    (CHAT, _valid(CHAT, seed=10**30), 400, "invalid `seed`"),
    (CHAT, _valid(CHAT, temperature=float("nan")), 400, "invalid `temperature`"),
    (CHAT, _valid(CHAT, logit_bias={"99999999999": 5}), 400, "outside this model's vocabulary"),
    (COMPLETIONS, _valid(COMPLETIONS, prompt=[]), 400, "`prompt` must be one string"),
    (COMPLETIONS, _valid(COMPLETIONS, prompt=""), 400, "`prompt` is empty"),
    (COMPLETIONS, _valid(COMPLETIONS, prompt={"text": "hi"}), 400, "invalid `prompt"),
    (MESSAGES, _valid(MESSAGES, max_tokens=None), 400, "invalid `max_tokens`"),
    (MESSAGES, _json({"model": "tiny", "messages": HI}), 400, "invalid `max_tokens`: Field required"),
    (MESSAGES, _valid(MESSAGES, top_k=10**20), 400, "invalid `top_k`"),
    (MESSAGES, _valid(MESSAGES, messages=[{"role": "system", "content": "hi"}]), 400, "only system turns"),
    (MESSAGES, _valid(MESSAGES, messages=[{"role": "tool", "content": "hi"}]), 400, "invalid `messages.0.role`"),
    (COUNT, _valid(COUNT, messages=[]), 400, "invalid `messages`"),
    (COUNT, _valid(COUNT, max_tokens=5), 400, "max_tokens"),  # not a count_tokens field
]


def _case_id(case: tuple[str, bytes, int, str]) -> str:
    path, body, status, _ = case
    return f"{path.removeprefix('/v1/')}-{status}-{re.sub(r'[^ -~]', '?', body[:40].decode('latin-1'))}"


def _post(gateway: Gateway, path: str, body: bytes, timeout: float = 30) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}{path}", content=body, headers={"content-type": "application/json"}, timeout=timeout
    )


def _assert_envelope(path: str, body: dict[str, Any]) -> str:
    """The error is in the envelope of the dialect the endpoint speaks; returns its message."""
    if path.startswith("/v1/messages"):
        assert body["type"] == "error", body
        assert set(body["error"]) >= {"type", "message"}, body
        assert isinstance(body["error"]["type"], str) and body["error"]["type"] != "api_error", body
    else:
        assert set(body) == {"error"}, body
        assert set(body["error"]) >= {"message", "type", "param", "code"}, body
        assert body["error"]["type"] != "server_error", body
    return body["error"]["message"]


def _serves(gateway: Gateway) -> None:
    reply = _post(gateway, COMPLETIONS, _valid(COMPLETIONS, max_tokens=1))
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] in ("length", "stop")


def _no_jobs(nats_url: str) -> None:
    wait_until(lambda: nats_request(nats_url, "cortex.node.t1.status")["jobs"] == [], 10, "t1 to hold no jobs")


@pytest.mark.parametrize(("path", "body", "status", "fragment"), CASES, ids=[_case_id(c) for c in CASES])
def test_bad_request_is_refused_in_the_dialects_envelope(
    gateway: Gateway, neuron: object, nats_url: str, path: str, body: bytes, status: int, fragment: str
) -> None:
    reply = _post(gateway, path, body)
    assert reply.status_code == status, reply.text
    assert fragment in _assert_envelope(path, reply.json())
    _serves(gateway)


@pytest.mark.parametrize("path", [CHAT, MESSAGES, COUNT])
def test_ten_thousand_messages_are_refused_by_context_length(
    gateway: Gateway, neuron: object, nats_url: str, path: str
) -> None:
    """10,000 messages fit in NATS but not in the tiny model's 8k context: the node says so (a 400
    naming the prompt's length), or, for count_tokens, simply counts them."""
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}] * 5000
    reply = _post(gateway, path, _valid(path, messages=turns), timeout=60)
    if path == COUNT:
        assert reply.status_code == 200, reply.text
        assert reply.json()["input_tokens"] > 8192
    else:
        assert reply.status_code == 400, reply.text
        assert re.search(
            r"the prompt is \d+ tokens; model test/tiny-llama takes at most", _assert_envelope(path, reply.json())
        )
    _no_jobs(nats_url)
    _serves(gateway)


# --- generated requests --------------------------------------------------------------------------

FUZZ_COUNTS: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> answers, checked after the run
FUZZ_EXAMPLES = int(os.environ.get("BAD_INPUT_EXAMPLES", "25"))  # per endpoint and mode: 200 requests, ~15 s


@pytest.fixture(scope="module")
def api_schema(gateway: Gateway, neuron: object) -> Any:
    """The gateway's own /openapi.json: the inference endpoints are picked from it by path."""
    return schemathesis.openapi.from_url(f"{gateway.url}/openapi.json")


def _runnable(path: str, body: Any) -> None:
    """Where a generated body names a model as a string, names the loaded tiny one, and caps the
    tokens to generate: the valid requests then run a real job, quickly (no max_tokens means 1024
    tokens on /v1/chat/completions). Every other field stays as generated."""
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return
    body["model"] = "tiny"
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        # JSON's 3050.0 is an int to pydantic too: floats would otherwise run thousands of tokens.
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 4:
            body[key] = 4
    if path in (CHAT, COMPLETIONS) and "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 4


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize("path", INFERENCE_PATHS)
def test_generated_requests_never_get_a_server_error(api_schema: Any, path: str, mode: GenerationMode) -> None:
    """Schemathesis generates bodies from the endpoint's schema (positive: valid per the schema;
    negative: violating it) and checks each answer: no 5xx, and any documented status (the errors
    included) in its documented shape and content type."""

    # pytest 9 broke schemathesis's pytest plugin (it sets Function._nodeid), so hypothesis runs its strategy here.
    @given(case=api_schema[path]["POST"].as_strategy(mode))
    # derandomize: the same examples on every run, so CI is repeatable (BAD_INPUT_EXAMPLES widens the search).
    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=True,
    )
    def run(case: Any) -> None:
        _runnable(path, case.body)
        response = case.call_and_validate(
            checks=[not_a_server_error, response_schema_conformance, content_type_conformance], timeout=30
        )
        FUZZ_COUNTS[path, response.status_code] += 1

    run()


def test_after_generated_requests_gateway_serves_and_no_job_is_stuck(gateway: Gateway, nats_url: str) -> None:
    assert {path for path, _ in FUZZ_COUNTS} == set(INFERENCE_PATHS), FUZZ_COUNTS
    assert not [key for key in FUZZ_COUNTS if key[1] >= 500], FUZZ_COUNTS
    print(f"schemathesis {schemathesis.__version__}: {FUZZ_COUNTS.total()} requests, {sorted(FUZZ_COUNTS.items())}")
    _no_jobs(nats_url)
    _serves(gateway)
