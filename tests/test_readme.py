"""Every code block of README.md runs as written, on the embedded model.

Python blocks are executed (``actadd.load_model()`` returns the session's model instead of
loading it again); shell blocks and the ``$ actadd ...`` lines of transcripts are run
(``actadd serve`` is started, probed by the blocks that call it, and stopped). Commands that
install software or run this very suite (``pip install``, ``make``) are listed and not run: a
new kind of command in the README makes the test fail until it is handled here.

``actadd tune`` and ``actadd eval`` run for many minutes on the embedded model: their README
lines are run with ``--dry-run`` (every option checked, the plan printed, nothing generated);
tests/test_tune.py and tests/test_evaluation.py run them for real on tiny models.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

import actadd
import actadd.cli.common

pytestmark = pytest.mark.slow

README = Path(__file__).parent.parent / "README.md"
NOT_RUN = ("make ", "pip install ")  # they install things or run this suite
DRY_RUN = ("actadd tune", "actadd eval")  # minutes of generation: checked, not run
SERVER = "http://127.0.0.1:8000"


def blocks() -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def shell_lines(code: str) -> list[str]:
    """Commands of a shell block: comments dropped, continuation lines and lines inside an
    open quote joined to their command."""
    code = re.sub(r"\\\n\s*", " ", code)
    out: list[str] = []
    pending = ""
    for line in code.splitlines():
        if not pending:
            line = line.split("  #")[0].strip()
            if not line or line.startswith("#"):
                continue
        pending = f"{pending}\n{line}" if pending else line
        try:
            shlex.split(pending)
        except ValueError:  # an unclosed quote: the command goes on
            continue
        out.append(pending)
        pending = ""
    assert not pending, f"unclosed quote in a README shell block: {pending}"
    return out


def transcript_commands(code: str) -> list[str]:
    """The ``$ command`` lines of a transcript (output lines are not commands)."""
    code = re.sub(r"\\\n\s*", " ", code)
    return [line[2:].split("  #")[0].strip() for line in code.splitlines() if line.startswith("$ ")]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def embedded(real_lm, monkeypatch):
    """``load_model()`` / the CLI's loader give the session's embedded model."""
    real = actadd.load_model

    def load_model(name=None, **kwargs):
        return real_lm if name is None and not kwargs else real(name, **kwargs)

    monkeypatch.setattr(actadd, "load_model", load_model)
    monkeypatch.setattr(actadd.cli.common, "load", lambda model, dtype=None: load_model(model))
    for module in ("compare", "sweep", "vector", "serve", "tune", "evaluate", "condition"):
        monkeypatch.setattr(
            f"actadd.cli.{module}.load", lambda model, dtype=None: load_model(model)
        )
    return real_lm


def run_cli(command: str) -> str:
    from actadd.cli import app

    args = shlex.split(command) + (["--dry-run"] if command.startswith(DRY_RUN) else [])
    assert args[0] == "actadd", command
    result = CliRunner().invoke(app, args[1:])
    assert result.exit_code == 0, f"{command}\n{result.output}\n{result.exception!r}"
    return result.output


def test_the_readme_has_the_blocks_this_test_knows():
    kinds = {lang for lang, _ in blocks()}
    assert kinds <= {"bash", "python", "json", ""}, kinds
    commands = [c for lang, code in blocks() if lang == "bash" for c in shell_lines(code)]
    unknown = [c for c in commands if not c.startswith((*NOT_RUN, "actadd ", "curl "))]
    assert not unknown, f"README shell commands this test does not run: {unknown}"
    assert blocks()[0] == ("bash", blocks()[0][1]) and "make demo" in blocks()[0][1]


def test_python_blocks(embedded, workdir):
    for i, (lang, code) in enumerate(blocks()):
        if lang != "python" or "OpenAI(" in code:  # the client block needs the server
            continue
        try:
            exec(compile(code, f"README.md block {i}", "exec"), {"__name__": "__readme__"})
        except Exception as e:
            pytest.fail(f"README python block {i} failed: {e!r}\n{code}")


def test_transcript_commands(embedded, workdir):
    ran = 0
    for lang, code in blocks():
        if lang == "":
            for command in transcript_commands(code):
                run_cli(command)
                ran += 1
    assert ran >= 5


def _wait(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not come up")


def test_serving_blocks(real_lm, workdir):
    """`actadd serve` as written, then the curl and openai-client blocks against it."""
    serve_lines = [
        c
        for lang, code in blocks()
        if lang == "bash"
        for c in shell_lines(code)
        if c.startswith("actadd serve")
    ]
    assert serve_lines
    base_env = {k: v for k, v in os.environ.items() if k != "ACTADD_API_KEY"}
    actadd_bin = str(Path(sys.executable).with_name("actadd"))
    for line in serve_lines:
        # the key only where the command line names it, as in a user's shell
        env = {**base_env, "HF_HUB_OFFLINE": "1"}
        if "$ACTADD_API_KEY" in line:
            env["ACTADD_API_KEY"] = "readme-key"
        args = [
            os.path.expandvars(a)
            for a in shlex.split(line.replace("$ACTADD_API_KEY", "readme-key"))
        ]
        port = re.search(r"--port (\d+)", line)
        url = f"http://127.0.0.1:{port.group(1) if port else 8000}"
        proc = subprocess.Popen(
            [actadd_bin, *args[1:]],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            _wait(f"{url}/health", proc)
            if url == SERVER:  # the blocks that talk to the default server
                _client_blocks()
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                pytest.fail(f"`{line}` did not stop on Ctrl-C")


def _client_blocks() -> None:
    for i, (lang, code) in enumerate(blocks()):
        if lang == "bash" and code.lstrip().startswith("curl"):
            out = subprocess.run(
                ["sh", "-c", code], capture_output=True, text=True, timeout=300, check=True
            ).stdout
            assert '"choices"' in out, out
        if lang == "python" and "OpenAI(" in code:
            try:
                exec(compile(code, f"README.md block {i}", "exec"), {"__name__": "__readme__"})
            except Exception as e:
                pytest.fail(f"README openai block {i} failed: {e!r}\n{code}")
