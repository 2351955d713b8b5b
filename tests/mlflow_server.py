"""A real `mlflow server` on 127.0.0.1 for tests: sqlite store, served artifacts, one worker.

It can be stopped and started again on the same port and store, like a server that goes
away and comes back.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root: Path, port: int | None = None):
        self.root = root
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = root / "server.log"

    def start(self, timeout: float = 120) -> None:
        """Start and wait until /health answers."""
        cmd = [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
               "--serve-artifacts", "--artifacts-destination", str(self.root / "artifacts")]
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            try:
                if requests.get(self.uri + "/health", timeout=1).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"mlflow server did not answer within {timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """Stop the server and all its workers; the port refuses connections afterwards."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass
        self.proc = None
