"""End to end: `actadd serve` with the embedded model, driven by Debian chromium through Playwright.

Types a prompt, sets Love − Hate at layer 6 with coefficient 5, clicks Compare and waits for
both streamed completions; then runs a small Sweep. Screenshots go to ``test-output/``.
Without /usr/bin/chromium the test is skipped, unless ACTADD_REQUIRE_BROWSER=1 (CI) makes
that a failure. Never run ``playwright install``: the system chromium is used.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
OUT = Path(__file__).resolve().parents[1] / "test-output"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """`python -m actadd serve` on 127.0.0.1, stopped with SIGINT (its graceful shutdown)."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    OUT.mkdir(exist_ok=True)
    log = (OUT / "browser-server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "actadd", "serve", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"actadd serve exited with {proc.returncode}; see {log.name}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail("actadd serve did not come up within 300 s")
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("ACTADD_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (see .ci/run)")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def test_playground_compare_and_sweep(server: str, browser: object) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    foreign: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(server) else foreign.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server + "/")
    page.wait_for_function(
        "document.querySelector('#model-info').textContent.includes('30 layers')"
    )
    assert not page.is_visible("#panel-sweep") and not page.is_visible("#key-box")

    page.fill("#prompt", "I hate you because")
    row = page.locator(".steer-row").first
    row.locator("input.add").fill("Love")
    row.locator("input.sub").fill("Hate")
    row.locator("input.layer").fill("6")
    row.locator("input.coeff").fill("5")
    page.fill("#max-tokens", "30")
    page.click("#compare")
    for pane in ("#out-unsteered", "#out-steered"):
        page.wait_for_selector(f"{pane}[data-state=done]", timeout=120_000)
    plain = page.inner_text("#out-unsteered .completion")
    steered = page.inner_text("#out-steered .completion")
    assert plain.strip() and steered.strip()
    assert plain != steered
    assert "Love" in page.inner_text("#steer-desc") and "layer 6" in page.inner_text("#steer-desc")
    page.screenshot(path=str(OUT / "playground.png"), full_page=True)

    page.click("#tab-sweep")
    assert page.is_visible("#panel-sweep") and not page.is_visible("#panel-compare")
    page.fill("#sw-layers", "2,6")
    page.fill("#sw-coeffs", "-5,0,5")
    page.fill("#sw-n", "1")
    page.fill("#sw-max-tokens", "12")
    page.click("#sweep")
    page.wait_for_selector("#plot svg circle", timeout=120_000)
    assert page.locator("#plot svg polyline").count() == 2
    assert page.locator("#plot svg circle").count() == 6
    page.screenshot(path=str(OUT / "sweep.png"), full_page=True)
    assert not errors, errors
    assert not foreign, f"the page fetched from elsewhere: {foreign}"
