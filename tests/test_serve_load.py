"""The server under load, on a live uvicorn (127.0.0.1) and a tiny float64 model: continuous
batching gives every request what it gets alone, whatever joins when; disconnects free their
rows; a full queue answers 429; /metrics shows it; conditions gate steering per request."""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import actadd
from actadd.hooks import actadd_hooks
from actadd.serve import create_app
from conftest import live_server

LOVE_HATE = {"add": "Love", "sub": "Hate", "coeff": 5, "layer": 1}
PROMPTS = [
    "I hate you because",
    "Hi",
    "The weather today is",
    "A longer prompt than the others, by far, with more words in it",
    "Once upon a time",
    "x",
]
STEERINGS: list[dict[str, Any]] = [
    {},
    {"steering": [LOVE_HATE]},
    {"steering": [{"prompt": "Rain", "coeff": -3, "layer": 2, "site": "resid_post"}]},
    {"steering": [{"prompt": "ab", "coeff": 4, "layer": 1}], "steering_location": "mid"},
    {"steering": [{"prompt": "Q", "coeff": 3, "layer": 0}], "steering_location": "back"},
    {"steering": [{"prompt": "Z", "coeff": 2, "layer": 1}], "steering_location": "all"},
    {"steering": [{"prompt": "W", "coeff": 2, "layer": 2}], "steering_location": "generated"},
    {"steering": [{"prompt": "M", "coeff": 2, "layer": 1, "site": "mlp_out"}]},
    {"steering": [{"vector": "love", "coeff": 3}]},
    {"steering": [{**LOVE_HATE, "coeff": 2}, {"prompt": "x", "coeff": 1, "layer": 0}]},
]


def mixed(n: int, seed: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """``n`` greedy requests: completions and chats, every kind of steering and none, lengths
    1-30, stops, ``n=2`` and prompt lists, some streamed."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        body: dict[str, Any] = {"max_tokens": rng.randint(1, 30), "temperature": 0}
        body |= rng.choice(STEERINGS)
        if i % 5 == 4:
            route = "/v1/chat/completions"
            body["messages"] = [{"role": "user", "content": rng.choice(PROMPTS) + " today?"}]
            body.pop("steering_location", None)
        else:
            route = "/v1/completions"
            body["prompt"] = rng.choice(PROMPTS) + " and more"
            if i % 7 == 0:
                body["prompt"] = [body["prompt"], rng.choice(PROMPTS) + " else"]
        if i % 6 == 0:
            body["n"] = 2
        if i % 9 == 0:
            body["stop"] = [rng.choice("aeiou")]
        if i % 3 == 0:
            body["stream"] = True
        out.append((route, body))
    return out


def ask(http: httpx.Client, route: str, body: dict[str, Any]) -> list[str]:
    """The texts of a request's choices (streamed or not)."""
    if not body.get("stream"):
        r = http.post(route, json=body)
        assert r.status_code == 200, r.text
        return [c["text"] if "text" in c else c["message"]["content"] for c in r.json()["choices"]]
    texts: dict[int, str] = {}
    with http.stream("POST", route, json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line or line == "data: [DONE]":
                continue
            for c in json.loads(line[6:])["choices"]:
                part = c.get("text") or (c.get("delta") or {}).get("content") or ""
                texts[c["index"]] = texts.get(c["index"], "") + part
    return [texts[i] for i in sorted(texts)]


def love_vector(lm: actadd.LM, directory: Path) -> None:
    v = actadd.SteeringVector.from_additions(lm, actadd.get_x_vector("Love", "Hate", 1, 1))
    directory.mkdir(parents=True, exist_ok=True)
    v.save(directory / "love.safetensors")


@pytest.mark.slow
def test_200_mixed_requests_at_concurrency_16_equal_each_alone(
    llama: actadd.LM, tmp_path: Path
) -> None:
    love_vector(llama, tmp_path)
    work = mixed(200)
    app = create_app(llama, vectors_dir=tmp_path, max_batch_rows=16)
    engine = app.state.actadd.engine
    with live_server(app) as (url, _), httpx.Client(base_url=url, timeout=120) as http:
        alone = []
        for route, body in work:  # one at a time: nothing else in the batch
            solo = {k: v for k, v in body.items() if k != "stream"}
            alone.append(ask(http, route, solo))
        assert engine.stats["max_rows"] <= 4

        # sixteen clients; each waits a random moment first, so requests join before, during
        # and after others' prefill and decoding
        rng = random.Random(1)
        delays = [rng.uniform(0, 0.05) for _ in work]
        local = threading.local()

        def client_ask(i: int) -> list[str]:
            if not hasattr(local, "http"):
                local.http = httpx.Client(base_url=url, timeout=120)
            time.sleep(delays[i])
            return ask(local.http, *work[i])

        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(client_ask, range(len(work))))
    differ = [i for i, (a, b) in enumerate(zip(alone, together, strict=True)) if a != b]
    assert not differ, f"{len(differ)} of {len(work)} differ, e.g. {work[differ[0]]}"
    assert engine.stats["max_rows"] >= 8  # they really shared batches
    assert actadd_hooks(llama.model) == 0


def test_a_non_streaming_client_that_leaves_frees_its_slot(llama: actadd.LM) -> None:
    app = create_app(llama, max_batch_rows=1)  # one slot: a leftover row would block the next
    engine = app.state.actadd.engine
    with live_server(app) as (url, _):
        body = {"prompt": "Hi", "max_tokens": 250, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=body, timeout=0.5)
        deadline = time.monotonic() + 30
        while engine.stats["cancelled_rows"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats["cancelled_rows"] == 1
        steps = engine.stats["steps"]
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "ok", "max_tokens": 1}, timeout=30)
        assert r.status_code == 200
        # the cancelled row (250 tokens) left: the next request ran in a step or two
        assert engine.stats["steps"] - steps <= 3


def test_a_full_queue_answers_429_with_retry_after(llama: actadd.LM) -> None:
    app = create_app(llama, max_batch_rows=1, max_queue_rows=2)
    engine = app.state.actadd.engine
    with live_server(app) as (url, _), ThreadPoolExecutor(3) as pool:
        long = {"prompt": "Hi", "max_tokens": 200, "temperature": 0}
        with engine.held():  # nothing runs: the first two requests fill the queue
            first = [
                pool.submit(httpx.post, f"{url}/v1/completions", json=long, timeout=60)
                for _ in range(2)
            ]
            deadline = time.monotonic() + 30
            while engine.waiting_rows < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 429 and r.headers["Retry-After"] == "2"
        assert r.json()["error"]["code"] == "queue_full"
        assert all(f.result().status_code == 200 for f in first)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30)
        assert r.status_code == 200  # and it serves again
        metrics = httpx.get(f"{url}/metrics").text
    assert 'actadd_requests_total{route="/v1/completions",status="429"} 1.0' in metrics


def test_metrics_in_prometheus_format(llama: actadd.LM) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    app = create_app(llama, api_key="k")
    auth = {"Authorization": "Bearer k"}
    with live_server(app) as (url, _), httpx.Client(base_url=url, headers=auth) as http:
        made, eos = [], 0
        for i in range(3):
            r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 5 + i})
            made.append(r.json()["usage"]["completion_tokens"])
            # a row that ended at end-of-sequence sampled that token too (not in usage)
            eos += r.json()["choices"][0]["finish_reason"] == "stop"
        assert http.post("/v1/completions", json={"prompt": ""}).status_code == 400
        assert httpx.get(f"{url}/metrics").status_code == 401
        text = http.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "actadd_queue_rows",
        "actadd_running_rows",
        "actadd_kv_cache_tokens",
        "actadd_generated_tokens",
        "actadd_tokens_per_second",
        "actadd_time_to_first_token_seconds",
        "actadd_time_per_output_token_seconds",
        "actadd_requests",
    ):
        assert name in families, sorted(families)

    def value(family: str, sample: str, **labels: str) -> float:
        return next(
            s.value
            for s in families[family].samples
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
        )

    generated = sum(made) + eos
    assert value("actadd_generated_tokens", "actadd_generated_tokens_total") == generated
    ttft = "actadd_time_to_first_token_seconds"
    assert value(ttft, f"{ttft}_count") == 3
    tpot = "actadd_time_per_output_token_seconds"
    assert value(tpot, f"{tpot}_count") == generated - 3
    ok = {"route": "/v1/completions", "status": "200"}
    assert value("actadd_requests", "actadd_requests_total", **ok) == 3
    assert (
        value("actadd_requests", "actadd_requests_total", route="/v1/completions", status="400")
        == 1
    )


def test_conditions_gate_steering_per_request(llama: actadd.LM, tmp_path: Path) -> None:
    """A stored condition that holds for one prompt and not another: the same steering entry
    applies to the first only (steering_applied says so), in one batch."""
    from actadd.hooks import capture

    site = actadd.get_act_name("resid_pre", 1)
    yes, no = "I hate you because", "The weather today is"

    def mean(p: str) -> torch.Tensor:
        return capture(llama, llama.to_tokens(p), [site])[site][0].mean(0)

    g = torch.Generator().manual_seed(3)
    c = actadd.Condition(torch.randn(llama.d_model, generator=g, dtype=torch.float64), 1)
    s_yes, s_no = (float(c.score(mean(p)[None])[0]) for p in (yes, no))
    cut, comparator = (s_yes + s_no) / 2, ">" if s_yes > s_no else "<"
    (tmp_path / "conditions").mkdir(parents=True)
    c.with_threshold(cut, comparator).save(tmp_path / "conditions" / "hateful.safetensors")

    app = create_app(llama, vectors_dir=tmp_path)
    steer = [{**LOVE_HATE, "if": {"condition": "hateful"}}]
    with live_server(app) as (url, _), httpx.Client(base_url=url, timeout=60) as http:
        listed = http.get("/v1/conditions").json()["data"]
        assert [d["id"] for d in listed] == ["hateful"]
        body = {"prompt": [yes, no], "max_tokens": 8, "temperature": 0, "steering": steer}
        out = http.post("/v1/completions", json=body).json()
        assert [ch["steering_applied"] for ch in out["choices"]] == [[True], [False]]
        plain = {"prompt": [yes, no], "max_tokens": 8, "temperature": 0}
        always = {**plain, "steering": [LOVE_HATE]}
        texts = [
            [ch["text"] for ch in http.post("/v1/completions", json=b).json()["choices"]]
            for b in (plain, always)
        ]
        got = [ch["text"] for ch in out["choices"]]
        assert got == [texts[1][0], texts[0][1]]  # steered where it held, untouched elsewhere
        negated = {**body, "steering": [{**LOVE_HATE, "if": {"not": {"condition": "hateful"}}}]}
        out = http.post("/v1/completions", json=negated).json()
        assert [ch["steering_applied"] for ch in out["choices"]] == [[False], [True]]
        r = http.post(
            "/v1/completions",
            json={**body, "steering": [{**LOVE_HATE, "if": {"condition": "nope"}}]},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "steering[0].if.condition"
        assert http.delete("/v1/conditions/hateful").status_code == 200
        assert http.get("/v1/conditions").json()["data"] == []
