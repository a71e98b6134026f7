"""API keys: each key with the models it may use, admin keys for /admin, keys never in logs.

A second gateway with keys configured serves the session's fleet (node t1 with `tiny`); the
clients are the official SDKs, each sending its own header (OpenAI: `Authorization: Bearer`,
Anthropic: `x-api-key`).
"""

from __future__ import annotations

import hashlib
import json
import re

import anthropic
import httpx
import openai
import pytest

from cortex.cli.keys import entry, new_key
from tests.conftest import Gateway, start_gateway
from tests.test_observability import scrape, value

TINY = "test/tiny-llama"
TINY_KEY = "ck-tiny-only-key-for-tests-0001"
OTHER_KEY = "ck-other-models-key-for-tests-02"
ADMIN_KEY = "ck-admin-key-for-tests-00000003"
HASHED_KEY = new_key()  # configured by its SHA-256 only
WRONG_KEY = "ck-this-key-was-never-configured"
HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def locked(spawn, nats_url, models_toml, neuron) -> Gateway:
    keys = [
        {"name": "tiny-only", "key": TINY_KEY, "models": ["tiny"]},
        {"name": "others", "key": OTHER_KEY, "models": ["test/tiny-llama-*"]},
        {"name": "hashed", "key_sha256": hashlib.sha256(HASHED_KEY.encode()).hexdigest(), "models": ["*"]},
    ]
    env = {
        "CORTEX_AUTH__KEYS": json.dumps(keys),
        "CORTEX_AUTH__ADMIN_KEYS": json.dumps([ADMIN_KEY]),
        "CORTEX_LOG_FORMAT": "json",
    }
    gw = start_gateway(spawn, nats_url, models_toml, name="gateway-locked", **env)
    gw.headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    gw.wait_for_model(TINY)
    return gw


def _openai(gw: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=60)


def _anthropic(gw: Gateway, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=60)


def test_openai_sdk_with_a_key_for_the_model_gets_an_answer(locked) -> None:
    reply = _openai(locked, TINY_KEY).chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)
    assert reply.model == TINY
    assert reply.usage.completion_tokens == 4


def test_anthropic_sdk_streams_with_a_key_in_x_api_key(locked) -> None:
    with _anthropic(locked, TINY_KEY).messages.stream(model="tiny", messages=HELLO, max_tokens=4) as stream:
        final = stream.get_final_message()
    assert final.usage.output_tokens == 4


def test_a_key_configured_by_its_sha256_is_accepted(locked) -> None:
    reply = _openai(locked, HASHED_KEY).chat.completions.create(model=TINY, messages=HELLO, max_tokens=2)
    assert reply.usage.completion_tokens == 2


def test_no_key_is_401_naming_the_header_of_the_dialect(locked) -> None:
    resp = httpx.post(f"{locked.url}/v1/chat/completions", json={"model": "tiny", "messages": HELLO}, timeout=10)
    assert resp.status_code == 401
    assert resp.json()["error"]["type"] == "authentication_error"
    assert "Authorization: Bearer" in resp.json()["error"]["message"]
    resp = httpx.post(f"{locked.url}/v1/messages", json={"model": "tiny", "messages": HELLO}, timeout=10)
    assert resp.status_code == 401
    assert resp.json()["type"] == "error"
    assert "x-api-key" in resp.json()["error"]["message"]


def test_a_wrong_key_is_401_in_both_sdks(locked) -> None:
    with pytest.raises(openai.AuthenticationError) as oa:
        _openai(locked, WRONG_KEY).chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    assert "not valid" in oa.value.message
    with pytest.raises(anthropic.AuthenticationError) as an:
        _anthropic(locked, WRONG_KEY).messages.create(model="tiny", messages=HELLO, max_tokens=2)
    assert an.value.body["error"]["type"] == "authentication_error"


def test_a_key_is_refused_a_model_it_may_not_use(locked) -> None:
    with pytest.raises(openai.PermissionDeniedError) as oa:
        _openai(locked, OTHER_KEY).chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    assert f"`others` may not use the model `{TINY}`" in oa.value.message
    with pytest.raises(anthropic.PermissionDeniedError) as an:
        _anthropic(locked, TINY_KEY).messages.count_tokens(model="test/tiny-llama-b", messages=HELLO)
    assert an.value.body["error"]["type"] == "permission_error"
    assert "it may use: tiny" in an.value.body["error"]["message"]


def test_a_bad_body_without_a_key_is_401_not_400(locked) -> None:
    resp = httpx.post(f"{locked.url}/v1/chat/completions", content=b"{not json", timeout=10)
    assert resp.status_code == 401


def test_models_lists_only_what_the_key_may_use(locked) -> None:
    assert [m.id for m in _openai(locked, TINY_KEY).models.list()] == [TINY]
    others = {m.id for m in _openai(locked, OTHER_KEY).models.list()}
    assert TINY not in others and "test/tiny-llama-b" in others
    with pytest.raises(openai.PermissionDeniedError):
        _openai(locked, OTHER_KEY).models.retrieve("tiny")


def test_admin_needs_an_admin_key_not_an_api_key(locked) -> None:
    body = {"model": "tiny"}
    resp = httpx.post(f"{locked.url}/admin/models/load", json=body, headers={"x-api-key": TINY_KEY}, timeout=10)
    assert resp.status_code == 403
    assert "`tiny-only` is not an admin key" in resp.json()["error"]["message"]
    resp = httpx.post(f"{locked.url}/admin/models/load", json=body, headers={"x-api-key": WRONG_KEY}, timeout=10)
    assert resp.status_code == 401
    ok = httpx.post(
        f"{locked.url}/admin/models/load", json=body, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
    )
    assert ok.status_code == 200, ok.text
    assert ok.json()["nodes"] == ["t1"]


def test_an_admin_key_may_use_every_model(locked) -> None:
    ids = {m.id for m in _openai(locked, ADMIN_KEY).models.list()}
    assert {TINY, "test/tiny-llama-b"} <= ids


def test_health_needs_no_key(locked) -> None:
    assert httpx.get(f"{locked.url}/health", timeout=5).status_code == 200


def test_keys_never_appear_in_the_logs_but_their_names_do(locked) -> None:
    _openai(locked, TINY_KEY).chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        _openai(locked, WRONG_KEY).models.list()
    httpx.post(f"{locked.url}/admin/models/load", json={"model": "nope"}, headers={"x-api-key": ADMIN_KEY}, timeout=10)
    log = locked.proc.output()
    for key in (TINY_KEY, OTHER_KEY, ADMIN_KEY, HASHED_KEY, WRONG_KEY):
        assert key not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    served = [line for line in lines if re.match(r"request \S+ openai\.chat", line["msg"])]
    assert served and served[-1]["api_key"] == "tiny-only"


def test_metrics_count_requests_and_tokens_per_key_name(locked) -> None:
    before = scrape(locked.metrics_url)
    reply = _openai(locked, HASHED_KEY).chat.completions.create(model="tiny", messages=HELLO, max_tokens=3)
    after = scrape(locked.metrics_url)

    def grew(name: str, **labels: str) -> float:
        labels |= {"key": "hashed", "model": TINY}
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("cortex_key_requests_total", status="200") == 1
    assert grew("cortex_key_tokens_total", kind="completion") == reply.usage.completion_tokens == 3
    assert grew("cortex_key_tokens_total", kind="prompt") == reply.usage.prompt_tokens


def test_key_new_prints_a_key_and_an_entry_that_admits_it() -> None:
    key = new_key()
    text = entry("team-a", key, ["smollm2", "Qwen/*"], admin=False)
    assert key not in text
    assert f'key_sha256 = "{hashlib.sha256(key.encode()).hexdigest()}"' in text
    assert 'models = ["smollm2", "Qwen/*"]' in text


def test_a_key_kept_to_some_models_gets_403_not_404_for_a_name_that_does_not_exist(locked) -> None:
    with pytest.raises(openai.PermissionDeniedError) as err:
        _openai(locked, TINY_KEY).chat.completions.create(model="no/such-model", messages=HELLO, max_tokens=2)
    assert "may not use the model `no/such-model`" in err.value.message


def test_an_empty_bearer_header_falls_back_to_x_api_key() -> None:
    from starlette.requests import Request

    from cortex.gateway.auth import presented_key

    headers = [(b"authorization", b"Bearer  "), (b"x-api-key", TINY_KEY.encode())]
    assert presented_key(Request({"type": "http", "headers": headers})) == TINY_KEY


def test_with_api_keys_but_no_admin_key_admin_is_closed_even_on_loopback() -> None:
    from fastapi.testclient import TestClient

    from cortex.config.gateway import ApiKey, AuthSection, CortexSettings
    from cortex.gateway.app import build_app

    settings = CortexSettings(auth=AuthSection(keys=[ApiKey(name="a", key=TINY_KEY)]))
    client = TestClient(build_app(settings), client=("127.0.0.1", 50000))  # no lifespan: no NATS needed
    resp = client.post("/admin/models/load", json={"model": "smollm2"}, headers={"x-api-key": TINY_KEY})
    assert resp.status_code == 403
    assert "needs an admin key once [[auth.keys]] are configured" in resp.json()["error"]["message"]
