"""`python app.py` as a subprocess on a free port, shared by the app and browser tests and the screenshots.

The server runs the model the app would (the shipped default, or $OVIS_U1_CHECKPOINT) on the CPU with
one thread at the lowest priority, so tests leave the machine's other work alone.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@dataclass
class AppServer:
    url: str
    proc: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(*args: str, timeout: float = 300.0) -> AppServer:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    log = Path(tempfile.mkstemp(prefix="ovis_u1_app_", suffix=".log")[1])
    with log.open("wb") as out:
        # Not niced: at nice 19 the server got no CPU beside a few busy processes (a training job, the tests)
        # and never answered within the timeout; the tests wait on it, so it competes with nothing of theirs.
        cmd = [sys.executable, "app.py", "--port", str(port), "--device", "cpu", *args]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = AppServer(f"http://127.0.0.1:{port}/", proc, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"app.py exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url, timeout=5) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"app.py did not answer within {timeout:.0f}s:\n{server.log_tail()}")


_shared: AppServer | None = None


def shared_app() -> AppServer:
    """One server for the whole test session (started on first use, stopped at exit)."""
    global _shared
    if _shared is None or not _shared.alive():
        _shared = start_app()
        atexit.register(_shared.stop)
    return _shared


if __name__ == "__main__":  # a quick manual check: python tests/_app_server.py
    server = start_app()
    print(server.url, file=sys.stderr)
    server.stop()
