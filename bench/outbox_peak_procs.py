"""Processes and the environment for ``bench.bench_outbox_peak``: a clean environment with this checkout's
code first on the path, stopping a process group, a health probe, a log's tail, the load average and git."""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any DISPATCHD_* setting, this checkout's code first on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHD_")}
    path = [str(ROOT / "src"), str(ROOT)]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(path)
    return {**env, **extra}


def stop(process: subprocess.Popen, grace_s: float = 20.0) -> str:
    """SIGINT (graceful), then SIGTERM, then SIGKILL the process group we started; say which ended it."""
    if process.poll() is not None:
        return f"already exited ({process.returncode})"
    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
            return f"{signal.Signals(sig).name} → exit {process.returncode}"
        except subprocess.TimeoutExpired:
            continue
    return f"exit {process.poll()}"


def get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""
