"""A language model served by `kiln serve` (auth on, the default) and called through the
stock `openai` package: completions, chat, streaming with usage, n=2, stop strings, the
OpenAI error shape, key scopes, and the queue bound's 429. Every `kiln` command a subprocess.
"""

from __future__ import annotations

import json
import sysconfig
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.e2e.kiln_process import KilnServe, kiln_env, kiln_json

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow  # a model trained by `kiln train` first: about 2 minutes

CORPUS = f"text:{Path(sysconfig.get_paths()['stdlib'])}/json/*.py"


@pytest.fixture(scope="module")
def lm_home(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    home = tmp_path_factory.mktemp("openai-home")
    env = kiln_env(home, free_port())
    kiln_json(env, "train", "--data", CORPUS, "--model", "lm", "--vocab-size", "512",
              "--block-size", "128", "--max-steps", "40", "--register", "pylm")  # fmt: skip
    keys = {
        "all": kiln_json(env, "keys", "create", "--scope", "predict:*")["secret"],
        "other": kiln_json(env, "keys", "create", "--scope", "predict:other")["secret"],
    }
    return {"home": home, "keys": keys}


@pytest.fixture(scope="module")
def served(lm_home, tmp_path_factory) -> Iterator[KilnServe]:
    env = kiln_env(lm_home["home"], free_port())
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    # Two sequences at a time and one waiting: a fourth concurrent request gets 429.
    server = KilnServe(env, ["pylm", "--lm-max-batch", "2", "--max-waiting", "1"], log).start()
    try:
        yield server
    finally:
        server.kill()


def client(served: KilnServe, key: str) -> Any:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=key, max_retries=0, timeout=60)


def test_completions_and_chat_through_the_openai_package(served, lm_home):
    api = client(served, lm_home["keys"]["all"])
    done = api.completions.create(model="pylm", prompt="def ", max_tokens=12, temperature=0)
    assert done.object == "text_completion" and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.completion_tokens <= 12 and done.usage.prompt_tokens >= 2
    # Greedy through the service equals `kiln generate` (same engine rules, same prefix).
    offline = kiln_json(served.env, "generate", "pylm", "--prompt", "def ", "--max-tokens", "12")
    assert done.choices[0].text == offline["text"]

    chat = api.chat.completions.create(
        model="pylm", messages=[{"role": "user", "content": "import json"}], max_tokens=8, n=2,
        temperature=0.8, seed=1,
    )  # fmt: skip
    assert [c.index for c in chat.choices] == [0, 1]
    assert all(c.message.role == "assistant" for c in chat.choices)
    assert chat.usage.completion_tokens <= 16

    listed = api.models.list()
    assert [m.id for m in listed.data] == ["pylm"]


def test_streaming_with_usage_and_a_stop_string(served, lm_home):
    api = client(served, lm_home["keys"]["all"])
    whole = api.completions.create(model="pylm", prompt="def ", max_tokens=24, temperature=0)
    text = whole.choices[0].text
    assert len(text) > 4
    stop = text[2:5]  # a stop string inside what greedy decoding writes, likely across tokens
    chunks = list(
        api.chat.completions.create(
            model="pylm", messages=[{"role": "user", "content": "x"}], max_tokens=24,
            temperature=0, stream=True, stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])
    streamed = list(
        api.completions.create(
            model="pylm", prompt="def ", max_tokens=24, temperature=0, stop=[stop], stream=True
        )
    )
    pieces = [c.choices[0].text for c in streamed if c.choices]
    assert "".join(pieces) == text[: text.index(stop)]
    assert all(stop not in p for p in pieces)
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_sse_framing_on_the_wire(served, lm_home):
    headers = {"Authorization": f"Bearer {lm_home['keys']['all']}"}
    body = {"model": "pylm", "prompt": "def ", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST", f"{served.url}/v1/completions", json=body, headers=headers, timeout=60
    ) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        raw = answer.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/v1/completions", {"model": "pylm", "prompt": "x", "max_tokens": 500}, 400, "max_tokens"),
        ("/v1/completions", {"model": "pylm", "prompt": "x", "temperature": 3}, 400, "temperature"),
        ("/v1/completions", {"model": "pylm", "prompt": "x", "n": 0}, 400, "n"),
        ("/v1/completions", {"model": "nosuch", "prompt": "x"}, 404, "model"),
        ("/v1/chat/completions", {"model": "pylm", "messages": []}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": "pylm", "messages": [{"role": "wizard", "content": "x"}]},
            400,
            "messages.0.role",
        ),
        ("/v1/completions", {"model": "pylm", "prompt": "x" * 9_000_000}, 413, None),
        ("/v1/completions", "not json", 400, None),
    ],
)
def test_errors_in_openai_shape(served, lm_home, path, body, status, param):
    headers = {"Authorization": f"Bearer {lm_home['keys']['all']}"}
    sent = httpx.post(
        served.url + path,
        content=body if isinstance(body, str) else json.dumps(body),
        headers={**headers, "content-type": "application/json"},
        timeout=60,
    )
    assert sent.status_code == status, sent.text
    error = sent.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param


def test_keys_and_scopes(served, lm_home):
    body = {"model": "pylm", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    none = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=60)
    assert none.status_code == 401 and none.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.PermissionDeniedError):
        client(served, lm_home["keys"]["other"]).chat.completions.create(**body)
    with pytest.raises(openai.AuthenticationError):
        client(served, "kiln_000000000000_wrong").chat.completions.create(**body)


def test_the_queue_bound_answers_429(served, lm_home):
    """Two sequences run, one waits: more requests at the same time are refused."""
    headers = {"Authorization": f"Bearer {lm_home['keys']['all']}"}
    body = {"model": "pylm", "prompt": "def ", "max_tokens": 100, "temperature": 0}
    answers: list[int] = []

    def send() -> None:
        sent = httpx.post(f"{served.url}/v1/completions", json=body, headers=headers, timeout=120)
        answers.append(sent.status_code)
        if sent.status_code == 429:
            assert sent.headers["retry-after"].isdigit()
            assert sent.json()["error"]["type"] == "rate_limit_error"

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert 429 in answers and 200 in answers, answers


def test_the_metrics_route_reports_the_language_model(served, lm_home):
    headers = {"Authorization": f"Bearer {lm_home['keys']['all']}"}
    body = {"model": "pylm", "prompt": "def ", "max_tokens": 6, "temperature": 0}
    for _ in range(3):
        assert (
            httpx.post(f"{served.url}/v1/completions", json=body, headers=headers).status_code
            == 200
        )
    report = httpx.get(f"{served.url}/v1/models/pylm/metrics", headers=headers, timeout=30)
    assert report.status_code == 200, report.text
    found = report.json()
    assert found["kind"] == "lm" and found["requests"] >= 3
    assert found["completion_tokens"] >= 3 and found["prompt_tokens"] >= 6
    assert found["time_to_first_token_ms"]["p50"] > 0
    assert found["cost"]["usd_per_1k_output_tokens"] > 0
    refused = httpx.post(
        f"{served.url}/v1/models/pylm:predict", json={"instances": [[1.0]]}, headers=headers
    )
    assert refused.status_code == 400 and "/v1/completions" in refused.json()["error"]


def test_the_python_client_chats_and_streams(served, lm_home):
    from kiln.client import Kiln
    from kiln.errors import AuthError, NotFoundError

    kiln = Kiln(home=str(lm_home["home"]), key=lm_home["keys"]["all"], use_ray=False)
    try:
        messages = [{"role": "user", "content": "import json"}]
        whole = kiln.chat("pylm", messages, url=served.url, max_tokens=10, temperature=0)
        pieces = list(
            kiln.chat("pylm", messages, stream=True, url=served.url, max_tokens=10, temperature=0)
        )
        assert "".join(pieces) == whole and len(pieces) >= 1
        with pytest.raises(NotFoundError, match="nosuch") as missing:
            kiln.chat("nosuch", messages, url=served.url)
        assert missing.value.http_status == 404
    finally:
        kiln.close()
    with Kiln(url=served.url, key=lm_home["keys"]["all"]) as kiln:
        done = kiln.complete("pylm", "def ", max_tokens=12, temperature=0)
        offline = kiln_json(
            served.env, "generate", "pylm", "--prompt", "def ", "--max-tokens", "12"
        )
        assert done.text == offline["text"] and done.usage["completion_tokens"] <= 12
        assert kiln.metrics("pylm").kind == "lm"
    with Kiln(url=served.url, key=lm_home["keys"]["other"]) as kiln:
        with pytest.raises(AuthError, match="lacks scope predict:pylm"):
            kiln.complete("pylm", "def ")


def test_the_async_client_streams_the_same_text(served, lm_home):
    import asyncio

    from kiln.http_client import AsyncKiln

    messages = [{"role": "user", "content": "import json"}]

    async def chat() -> tuple[str, list[str]]:
        async with AsyncKiln(url=served.url, key=lm_home["keys"]["all"]) as kiln:
            whole = await kiln.chat("pylm", messages, max_tokens=10, temperature=0)
            stream = await kiln.chat("pylm", messages, stream=True, max_tokens=10, temperature=0)
            return whole, [piece async for piece in stream]

    whole, pieces = asyncio.run(chat())
    assert "".join(pieces) == whole and len(pieces) >= 1
