"""The Ray tests (``tests/ray_cluster_suite.py``), run in a loopback-only network namespace.

Ray binds the machine's primary network address; tests may only use loopback. So this test
runs the suite in a fresh network + PID namespace (``tests/netns.py``) where ``lo`` is the
only interface and every Ray process dies with the namespace. Where namespaces cannot be made
it skips, saying why; with ``ACTADD_REQUIRE_NETNS=1`` (CI, ``.ci/run``) it fails instead.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

import pytest

from netns import FLAG, run_pytest_in_netns, unavailable_reason

SUITE = Path(__file__).with_name("ray_cluster_suite.py")
BUDGET_S = 900  # 90-100 s on the shared 2-core machine at load ~4; 700 s at load ~5.5

# Ray, small and quiet, for the cluster the suite starts: no usage reporting, no uv, no auth
# token written to ~/.ray; a short private temp dir (AF_UNIX socket paths < 108 bytes)
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def test_ray_suite_in_a_loopback_only_namespace():
    if os.environ.get(FLAG) == "1":
        pytest.skip("already inside the namespace")
    reason = unavailable_reason()
    if reason:
        if os.environ.get("ACTADD_REQUIRE_NETNS") == "1":
            pytest.fail(f"ACTADD_REQUIRE_NETNS=1 but {reason}")
        pytest.skip(reason)
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    t0 = time.perf_counter()
    try:
        run = run_pytest_in_netns(
            [str(SUITE), "-q", "-rA", "-p", "no:cacheprovider", "--durations=0"],
            {**RAY_ENV, "RAY_TMPDIR": tmp},
            timeout=BUDGET_S,
        )
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    took = time.perf_counter() - t0
    print(run.stdout[-6000:], run.stderr[-3000:], f"\n[suite took {took:.1f} s]")
    assert run.returncode == 0, f"the Ray suite failed (exit {run.returncode}):\n{run.stdout}"
    summary = run.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 8 and "skipped" not in summary, summary
