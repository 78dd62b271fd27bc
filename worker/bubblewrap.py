"""The isolation boundary: a bubblewrap (`bwrap`) command line for the sandboxed child.

Its own user (uid 65534, no capabilities), PID, network, IPC and UTS namespaces; no network; a new
root with read-only views of the system, the Python installation, the environment's packages and the
engine's own packages (never the project or data folder); a private /proc and /tmp; one writable
folder, the job's scratch folder. `check_isolation` tells whether it works on this machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent


ISOLATIONS = ("bubblewrap", "none")
BWRAP_INSTALL_HINT = "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap)"
SANDBOX_UID = 65534  # "nobody" inside the user namespace


def _python_roots() -> list[Path]:
    """Folders the child's Python needs: the interpreter's install and the environment's packages."""
    roots = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), Path(sys.executable).resolve().parent}
    return sorted(roots)


def _readonly_system_binds() -> list[str]:
    args: list[str] = []
    for top in ("/usr", "/bin", "/lib", "/lib64", "/sbin"):
        path = Path(top)
        if path.is_symlink():  # merged /usr: keep the link, it points into the bound /usr
            args += ["--symlink", os.readlink(path), top]
        elif path.exists():
            args += ["--ro-bind", top, top]
    # the dynamic loader's cache, name resolution stubs and time zone: harmless and needed by libraries
    for name in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/alternatives"):
        if Path(name).exists():
            args += ["--ro-bind", name, name]
    # CPU topology: torch sizes its thread pools and picks kernels from it
    if Path("/sys/devices/system/cpu").exists():
        args += ["--ro-bind", "/sys/devices/system/cpu", "/sys/devices/system/cpu"]
    return args


def bubblewrap_command(scratch: Path, environment: dict[str, str], read_only: Sequence[Path] = ()) -> list[str]:
    """The bwrap prefix: a new, empty root with only what the child needs, writable scratch only."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(f"bubblewrap (bwrap) is not installed: {BWRAP_INSTALL_HINT}")
    args = [
        bwrap,
        "--unshare-all",
        "--unshare-user",
        "--uid",
        str(SANDBOX_UID),
        "--gid",
        str(SANDBOX_UID),
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--hostname",
        "sandbox",
        "--clearenv",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
    ]
    args += _readonly_system_binds()
    for root in _python_roots():
        args += ["--ro-bind", str(root), str(root)]
    # only the engine's packages (the engine reads the method catalogue of the client package), not the
    # project folder: that may hold the data folder (var/) of every tenant
    for package in ("worker", "modelpress"):
        folder = PROJECT_ROOT / package
        args += ["--ro-bind", str(folder), str(folder)]
    for path in read_only:
        resolved = Path(path).resolve()
        args += ["--ro-bind", str(resolved), str(resolved)]
    args += ["--bind", str(scratch), str(scratch), "--chdir", str(scratch)]
    for key, value in environment.items():
        args += ["--setenv", key, value]
    return args + ["--"]


class SandboxUnavailable(RuntimeError):
    """The configured isolation cannot run on this machine."""


def check_isolation(isolation: str) -> str | None:
    """None when `isolation` works here; otherwise why not (with the install line)."""
    if isolation not in ISOLATIONS:
        return f"unknown sandbox isolation {isolation!r}; choose one of {list(ISOLATIONS)}"
    if isolation == "none":
        return None
    try:
        command = bubblewrap_command(Path("/tmp"), {"PATH": "/usr/bin:/bin"}) + [sys.executable, "-c", "pass"]
    except SandboxUnavailable as error:
        return str(error)
    try:
        probe = subprocess.run(command, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"bubblewrap could not start a sandbox: {error}"
    if probe.returncode != 0:
        reason = probe.stderr.decode(errors="replace").strip()[-300:]
        return (
            f"bubblewrap could not start a sandbox ({reason}); it needs user namespaces "
            "(in a container: --security-opt seccomp=unconfined, or a seccomp profile that allows clone/unshare)"
        )
    return None


def describe_isolation(isolation: str) -> dict[str, Any]:
    """What /v1/workers shows for a worker's sandbox."""
    if isolation == "none":
        return {"kind": "none", "namespaces": [], "network": True, "note": "resource limits only (development)"}
    version = ""
    bwrap = shutil.which("bwrap")
    if bwrap:
        try:
            version = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            version = ""
    return {
        "kind": "bubblewrap",
        "version": version,
        "namespaces": ["user", "pid", "net", "ipc", "uts", "cgroup"],
        "network": False,
        "uid": SANDBOX_UID,
        "writable": ["scratch"],
    }
