"""Run tests inside a fresh network namespace that has only loopback (Linux).

Ray binds the machine's primary address by default; tests here may only talk to 127.0.0.1.
In a new network namespace the only interface is ``lo`` (brought up here), so every Ray
process started inside binds and advertises loopback and nothing can leave the machine. A new
PID namespace (``--pid --mount-proc``) holds every process Ray starts, and ``--kill-child``
ends them all with the namespace, whatever happens to the test.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import struct
import subprocess
import sys

FLAG = "ACTADD_IN_NETNS"  # set for the pytest run inside the namespace


def in_loopback_only_netns() -> bool:
    """Whether this process's network namespace has no interface but ``lo``."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def lo_up() -> None:
    """Bring ``lo`` up (a new namespace starts with it down) without iproute2: the
    SIOCGIFFLAGS / SIOCSIFFLAGS ioctls, which need CAP_NET_ADMIN inside the namespace."""
    get_flags, set_flags, up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, get_flags, request))[1]
        fcntl.ioctl(s, set_flags, struct.pack("16sH14x", b"lo", flags | up))


def unshare_command() -> list[str]:
    """``unshare`` with new network and PID namespaces (and a user namespace when not root)."""
    user = [] if os.geteuid() == 0 else ["--map-root-user"]
    return ["unshare", *user, "--net", "--pid", "--mount-proc", "--kill-child"]


def unavailable_reason() -> str | None:
    """None if a loopback-only namespace can be made here, else why not."""
    if not sys.platform.startswith("linux"):
        return "loopback-only network namespaces need Linux"
    if not shutil.which("unshare"):
        return "`unshare` (util-linux) is not installed"
    try:
        r = subprocess.run([*unshare_command(), "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`unshare` failed: {e}"
    if r.returncode != 0:
        return (
            f"cannot create a network namespace ({r.stderr.strip() or r.returncode}): needs "
            "root or unprivileged user namespaces"
        )
    return None


def run_pytest_in_netns(
    args: list[str], env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """``python -m pytest ARGS`` in a fresh loopback-only namespace (``FLAG`` set)."""
    full_env = {**os.environ, **env, FLAG: "1"}
    return subprocess.run(
        [*unshare_command(), sys.executable, "-m", "pytest", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
