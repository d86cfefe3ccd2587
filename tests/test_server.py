"""The HTTP server on a tiny random model: OpenAI shapes, batching = solo, streaming, errors, auth,
vectors, shutdown. The official ``openai`` client runs against a live uvicorn on 127.0.0.1."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

import actadd
from actadd.hooks import actadd_hooks
from actadd.serve import Limits, create_app
from conftest import build_tiny, live_server

LOVE_HATE = {"add": "Love", "sub": "Hate", "coeff": 5, "layer": 1}


def n_hooks(lm: actadd.LM) -> int:
    return actadd_hooks(lm.model)


@pytest.fixture
def client(llama: actadd.LM) -> Iterator[TestClient]:
    with TestClient(create_app(llama), base_url="http://127.0.0.1") as c:
        yield c


def completion(c: Any, **body: Any) -> dict[str, Any]:
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def text_of(c: Any, **body: Any) -> str:
    return completion(c, **body)["choices"][0]["text"]


# -- shapes -------------------------------------------------------------------------------------
def test_models_info_and_playground(client: TestClient, llama: actadd.LM) -> None:
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-llama"
    info = client.get("/v1/actadd/info").json()
    assert info["n_layers"] == llama.n_layers and info["d_model"] == llama.d_model
    page = client.get("/")
    assert page.status_code == 200 and 'id="compare"' in page.text
    for asset in ("/static/playground.js", "/static/playground.css"):
        assert client.get(asset).status_code == 200
    assert "http" not in page.text.replace("http://www.w3.org", "")  # nothing from a CDN
    assert client.get("/docs").status_code == 404  # Swagger UI would load from a CDN
    assert "/v1/completions" in client.get("/openapi.json").json()["paths"]


def test_completion_shape_and_steering(client: TestClient) -> None:
    plain = completion(client, prompt="I hate you because", max_tokens=8, temperature=0)
    assert plain["object"] == "text_completion"
    choice = plain["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert plain["usage"]["completion_tokens"] == 8
    steered = completion(
        client, prompt="I hate you because", max_tokens=8, temperature=0, steering=[LOVE_HATE]
    )
    assert steered["choices"][0]["text"] != choice["text"]
    assert len(steered["steering"]) == 1  # one description per entry (an x-vector is one)
    assert steered["choices"][0]["steering_applied"] == [True]
    zero = text_of(
        client,
        prompt="I hate you because",
        max_tokens=8,
        temperature=0,
        steering=[{**LOVE_HATE, "coeff": 0}],
    )
    assert zero == choice["text"]  # coeff 0 = unsteered


def test_completion_matches_the_library(client: TestClient, llama: actadd.LM) -> None:
    body = dict(
        prompt="I hate you because",
        max_tokens=10,
        temperature=1.0,
        top_p=0.9,
        frequency_penalty=0.5,
        seed=7,
        steering=[LOVE_HATE],
    )
    served = text_of(client, **body)
    # the last events of a batch arrive before its steer() block has exited: held() waits
    with client.app.state.actadd.engine.held():  # type: ignore[attr-defined]
        df = actadd.gen_using_activation_additions(
            llama,
            list(actadd.get_x_vector("Love", "Hate", 5, 1)),
            ["I hate you because"],
            tokens_to_generate=10,
            seed=7,
            temperature=1.0,
            top_p=0.9,
            freq_penalty=0.5,
        )
    assert served == df.completions[0]


def test_chat_uses_the_chat_template() -> None:
    lm = build_tiny("llama")
    lm.tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}[assistant]"
    )
    with TestClient(create_app(lm), base_url="http://127.0.0.1") as c:
        r = c.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 4,
                "temperature": 0,
            },
        )
        out = r.json()
        assert r.status_code == 200 and out["object"] == "chat.completion"
        assert out["choices"][0]["message"]["role"] == "assistant"
        assert out["usage"]["prompt_tokens"] == 1 + len("[user]Hi[assistant]")
        same = c.post(
            "/v1/completions",
            json={
                "prompt": "[user]Hi[assistant]",
                "max_tokens": 4,
                "temperature": 0,
            },
        ).json()["choices"][0]["text"]
        assert out["choices"][0]["message"]["content"] == same


def test_n_and_prompt_lists_are_rows_with_their_own_seeds(client: TestClient) -> None:
    out = completion(client, prompt=["Hello there", "Why"], n=2, max_tokens=6, seed=3)
    texts = [c["text"] for c in out["choices"]]
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert texts[0] == text_of(client, prompt="Hello there", max_tokens=6, seed=3)
    assert texts[1] == text_of(client, prompt="Hello there", max_tokens=6, seed=4)
    assert texts[2] == text_of(client, prompt="Why", max_tokens=6, seed=5)


def test_stop_strings(client: TestClient) -> None:
    full = text_of(client, prompt="I hate you because", max_tokens=12, temperature=0)
    stop = full[4:6]
    cut = completion(client, prompt="I hate you because", max_tokens=12, temperature=0, stop=[stop])
    assert cut["choices"][0]["text"] == full[: full.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


# -- streaming ----------------------------------------------------------------------------------
def sse(c: Any, path: str, body: dict[str, Any]) -> list[Any]:
    with c.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]


def test_streaming_equals_non_streaming(client: TestClient) -> None:
    body = dict(prompt="I hate you because", max_tokens=9, n=2, seed=5, steering=[LOVE_HATE])
    chunks = sse(client, "/v1/completions", body)
    texts = ["", ""]
    reasons = {}
    for ch in chunks:
        for c in ch["choices"]:
            texts[c["index"]] += c["text"]
            if c["finish_reason"]:
                reasons[c["index"]] = c["finish_reason"]
    whole = completion(client, **body)
    assert texts == [c["text"] for c in whole["choices"]]
    assert reasons == {c["index"]: c["finish_reason"] for c in whole["choices"]}
    assert len(chunks) > 4  # token by token, not one lump


def test_chat_streaming_chunks_and_usage(client: TestClient) -> None:
    body = {
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 5,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    chunks = sse(client, "/v1/chat/completions", body)
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert chunks[-1]["usage"]["completion_tokens"] == 5 and chunks[-1]["choices"] == []
    whole = client.post("/v1/chat/completions", json={**body, "stream_options": None}).json()
    assert text == whole["choices"][0]["message"]["content"]


# -- batching: a response never depends on its batch ---------------------------------------------
MIXED: list[tuple[str, dict[str, Any]]] = [
    (
        "/v1/completions",
        {
            "prompt": "I hate you because",
            "max_tokens": 12,
            "temperature": 0,
            "steering": [LOVE_HATE],
        },
    ),
    ("/v1/completions", {"prompt": "I hate you because", "max_tokens": 12, "temperature": 0}),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 3, "temperature": 0}),
    (
        "/v1/completions",
        {
            "prompt": "The weather today is",
            "max_tokens": 7,
            "temperature": 0,
            "steering": [{"prompt": "Rain", "coeff": -3, "layer": 2, "site": "resid_post"}],
        },
    ),
    (
        "/v1/completions",
        {
            "prompt": "A longer prompt than the others, by far",
            "max_tokens": 10,
            "temperature": 0,
            "steering": [{**LOVE_HATE, "coeff": 2}, {"prompt": "x", "coeff": 1, "layer": 0}],
        },
    ),
    (
        "/v1/completions",
        {
            "prompt": "Sampled",
            "max_tokens": 8,
            "n": 2,
            "seed": 11,
            "top_p": 0.8,
            "frequency_penalty": 1.0,
            "steering": [LOVE_HATE],
        },
    ),
    (
        "/v1/completions",
        {
            "prompt": "Middle",
            "max_tokens": 6,
            "temperature": 0,
            "steering_location": "mid",
            "steering": [{"prompt": "ab", "coeff": 4, "layer": 1}],
        },
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Hey, how are you today?"}],
            "max_tokens": 6,
            "temperature": 0.7,
            "seed": 2,
            "steering": [LOVE_HATE],
        },
    ),
]


def texts_of(out: dict[str, Any]) -> list[str]:
    return [c.get("text", c.get("message", {}).get("content")) for c in out["choices"]]


def test_concurrent_batched_responses_equal_solo(llama: actadd.LM) -> None:
    app = create_app(llama)
    engine = app.state.actadd.engine
    with TestClient(app, base_url="http://127.0.0.1") as c:
        solo = [texts_of(c.post(p, json=b).json()) for p, b in MIXED]
        assert engine.stats["max_rows"] <= max(b.get("n", 1) for _, b in MIXED)
        rows = sum(b.get("n", 1) for _, b in MIXED)
        with ThreadPoolExecutor(len(MIXED)) as pool, engine.held():
            futures = [pool.submit(c.post, p, json=b) for p, b in MIXED]
            deadline = time.monotonic() + 60
            while engine.waiting_rows < rows and time.monotonic() < deadline:
                time.sleep(0.01)
            assert engine.waiting_rows == rows  # everything queued: they run together
        batched = [texts_of(f.result().json()) for f in futures]
    assert engine.stats["max_rows"] == rows  # every row, at every location, in one batch
    assert batched == solo
    assert n_hooks(llama) == 0


# -- errors, limits, auth -----------------------------------------------------------------------
BAD: list[tuple[Any, int, str | None]] = [
    (
        '{"prompt": "x", "steering": [{"prompt": "Love", "coeff": NaN, "layer": 1}]}',
        400,
        "steering[0].coeff",
    ),
    (
        {"prompt": "x", "steering": [{"prompt": "Love", "coeff": 1e9, "layer": 1}]},
        400,
        "steering[0].coeff",
    ),
    (
        {"prompt": "x", "steering": [{"prompt": "Love", "coeff": 1, "layer": 3}]},
        400,
        "steering[0].layer",
    ),
    ({"prompt": "x", "steering": [{"prompt": "Love", "coeff": 1}]}, 400, "steering[0]"),
    ({"prompt": "x", "steering": [{"vector": "missing", "coeff": 1}]}, 400, "steering[0].vector"),
    ({"prompt": "x", "steering": [{"prompt": "a", "coeff": 1, "layer": 0}] * 9}, 400, "steering"),
    ({"prompt": "x" * 300}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": 100_000}, 400, "max_tokens"),
    ({"prompt": "x", "n": 50}, 400, "n"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "bogus": 1}, 400, "bogus"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": ""}, 400, "prompt"),
    (
        {"prompt": "Hi", "steering": [{"prompt": "Much longer", "coeff": 1, "layer": 1}]},
        400,
        "steering",
    ),
    ('{"prompt": ', 400, None),
    ('{"prompt": "' + "x" * 2_000_000 + '"}', 413, None),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD)
def test_bad_requests_get_openai_errors_and_the_server_goes_on(
    body: Any, status: int, param: str | None, llama: actadd.LM
) -> None:
    app = create_app(llama, limits=Limits(max_prompt_tokens=200))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        if isinstance(body, str):
            r = c.post(
                "/v1/completions", content=body, headers={"Content-Type": "application/json"}
            )
        else:
            r = c.post("/v1/completions", json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert err["param"] == param
        assert c.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2}).status_code == 200
    assert n_hooks(llama) == 0


def test_api_key(llama: actadd.LM) -> None:
    with TestClient(create_app(llama, api_key="s3cret"), base_url="http://127.0.0.1") as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.post("/v1/completions", json={"prompt": "x"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models").status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/completions", json={"prompt": "x"}, headers=ok).status_code == 200
        assert c.get("/").status_code == 200  # the page itself asks for the key


def test_openai_client_against_live_uvicorn(llama: actadd.LM) -> None:
    openai = pytest.importorskip("openai")
    app = create_app(llama, api_key="k")
    with live_server(app) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        model = client.models.list().data[0].id
        steer = {"steering": [LOVE_HATE]}
        out = client.completions.create(
            model=model, prompt="I hate you because", max_tokens=8, temperature=0, extra_body=steer
        )
        assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 8
        streamed = "".join(
            ch.choices[0].text
            for ch in client.completions.create(
                model=model,
                prompt="I hate you because",
                max_tokens=8,
                temperature=0,
                stream=True,
                extra_body=steer,
            )
        )
        assert streamed == out.choices[0].text
        chat = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=5,
            seed=1,
        )
        assert chat.choices[0].message.role == "assistant"
        parts = [
            ch.choices[0].delta.content or ""
            for ch in client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=5,
                seed=1,
                stream=True,
            )
            if ch.choices
        ]
        assert "".join(parts) == chat.choices[0].message.content
        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(
                model=model, prompt="x", extra_body={"steering": [{**LOVE_HATE, "layer": 99}]}
            )
        assert bad.value.body["param"] == "steering[0].layer"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()


def test_graceful_shutdown_finishes_in_flight_streams(llama: actadd.LM) -> None:
    app = create_app(llama)
    lines: list[str] = []
    with live_server(app) as (url, server), httpx.Client(base_url=url, timeout=60) as http:
        body = {
            "prompt": "I hate you because",
            "max_tokens": 60,
            "temperature": 0,
            "stream": True,
            "steering": [LOVE_HATE],
        }
        with http.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    if len(lines) == 2:
                        server.should_exit = True  # what Ctrl-C does
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert app.state.actadd.engine.closed
    assert n_hooks(llama) == 0
    with TestClient(
        create_app(llama), base_url="http://127.0.0.1"
    ) as c:  # the same text as an undisturbed request
        assert "".join(ch["choices"][0]["text"] for ch in chunks) == text_of(
            c, **{k: v for k, v in body.items() if k != "stream"}
        )


def test_client_going_away_cancels_its_rows(llama: actadd.LM) -> None:
    app = create_app(llama)
    engine = app.state.actadd.engine
    with live_server(app) as (url, _), httpx.Client(base_url=url, timeout=60) as http:
        body = {"prompt": "Hi", "max_tokens": 250, "temperature": 0, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            next(r.iter_lines())
        deadline = time.monotonic() + 30
        while (engine.stats["rows"] == 0 or engine.busy) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.stats["cancelled_rows"] == 1  # not run to its 250 tokens
        assert completion(http, prompt="ok", max_tokens=2)["choices"][0]["finish_reason"]


# -- steering vectors -----------------------------------------------------------------------------
def test_vector_upload_list_use_delete(llama: actadd.LM, tmp_path: Any) -> None:
    vectors = pytest.importorskip("actadd.vectors")
    v = vectors.SteeringVector.from_additions(llama, actadd.get_x_vector("Love", "Hate", 1, 1))
    path = tmp_path / "lovehate.safetensors"
    v.save(path)
    store = tmp_path / "store"
    with TestClient(create_app(llama, vectors_dir=store), base_url="http://127.0.0.1") as c:
        r = c.put("/v1/vectors/love-hate", content=path.read_bytes())
        assert r.status_code == 201 and r.json()["sites"] == ["blocks.1.hook_resid_pre"]
        assert [d["id"] for d in c.get("/v1/vectors").json()["data"]] == ["love-hate"]
        served = text_of(
            c,
            prompt="I hate you because",
            max_tokens=8,
            temperature=0,
            steering=[{"vector": "love-hate", "coeff": 4}],
            steering_location="all",
        )
        with c.app.state.actadd.engine.held():  # type: ignore[attr-defined]
            df = actadd.gen_using_activation_additions(
                llama,
                [v.with_coeff(4)],
                ["I hate you because"],
                tokens_to_generate=8,
                temperature=0,
                addition_location="all",
            )
        assert served == df.completions[0]
        assert served != text_of(c, prompt="I hate you because", max_tokens=8, temperature=0)
        # not a vector / made for another model: 400, nothing stored
        bad = c.put("/v1/vectors/junk", content=b"not safetensors")
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_vector"
        other = vectors.SteeringVector({1: torch.ones(32)})
        other.save(tmp_path / "other.safetensors")
        r = c.put("/v1/vectors/other", content=(tmp_path / "other.safetensors").read_bytes())
        assert r.status_code == 400 and "d_model" in r.json()["error"]["message"]
        assert c.put("/v1/vectors/bad name!", content=b"x").status_code in (400, 404)
        assert sorted(p.name for p in store.glob("*.safetensors")) == ["love-hate.safetensors"]
    with TestClient(
        create_app(llama, vectors_dir=store), base_url="http://127.0.0.1"
    ) as c:  # persisted
        assert [d["id"] for d in c.get("/v1/vectors").json()["data"]] == ["love-hate"]
        assert c.delete("/v1/vectors/love-hate").json()["deleted"] is True
        assert c.delete("/v1/vectors/love-hate").status_code == 404
        r = c.post("/v1/completions", json={"prompt": "x", "steering": [{"vector": "love-hate"}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_vector"
    assert not list(store.glob("*.safetensors"))


def test_vector_upload_body_limit(llama: actadd.LM) -> None:
    with TestClient(
        create_app(llama, limits=Limits(max_vector_bytes=1000)), base_url="http://127.0.0.1"
    ) as c:
        r = c.put("/v1/vectors/big", content=b"x" * 2000)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


# -- sweep ----------------------------------------------------------------------------------------
def test_sweep(client: TestClient) -> None:
    body = {
        "prompt": "I hate you because",
        "add": "Love",
        "sub": "Hate",
        "layers": [0, 2],
        "coeffs": [-3, 0, 3],
        "n": 2,
        "max_tokens": 6,
        "metric": "words",
        "words": ["a", "e"],
    }
    r = client.post("/v1/actadd/sweep", json=body)
    out = r.json()
    assert r.status_code == 200, r.text
    assert [s["label"] for s in out["series"]] == ["layer 0", "layer 2"]
    assert out["completions"] == 2 * 2 * 2 + 2  # coefficient 0 is generated once
    a, b = out["series"]
    assert a["samples"][1] == b["samples"][1]  # coeff 0: the unsteered model, same seeds
    assert a["samples"][0] != b["samples"][0]
    one = text_of(
        client,
        prompt="I hate you because",
        max_tokens=6,
        seed=1,
        top_p=0.3,
        frequency_penalty=1.0,
        steering=[{**LOVE_HATE, "coeff": 3, "layer": 2}],
    )
    assert b["samples"][2][1] == one  # sample j uses seed + j
    too_many = {**body, "coeffs": list(range(21)), "layers": [0, 1, 2], "n": 4}
    assert client.post("/v1/actadd/sweep", json=too_many).status_code == 400


# -- the command ----------------------------------------------------------------------------------
def test_serve_command_builds_the_app(
    monkeypatch: pytest.MonkeyPatch, llama: actadd.LM, tmp_path: Any
) -> None:
    from typer.testing import CliRunner

    import actadd.cli
    import actadd.cli.serve

    ran: dict[str, Any] = {}
    monkeypatch.setattr(actadd.cli.serve, "load", lambda model, dtype=None: llama)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    args = [
        "serve",
        "--port",
        "8123",
        "--api-key",
        "k",
        "--max-tokens",
        "7",
        "--vectors",
        str(tmp_path / "v"),
    ]
    result = CliRunner().invoke(actadd.cli.app, args)
    assert result.exit_code == 0, result.output
    assert ran["host"] == "127.0.0.1" and ran["port"] == 8123
    assert (tmp_path / "v").is_dir()
    with TestClient(ran["app"], base_url="http://127.0.0.1") as c:
        assert c.get("/v1/models").status_code == 401
        auth = {"Authorization": "Bearer k"}
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 8}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
