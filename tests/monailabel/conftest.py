"""Fixtures of the MONAI Label integration test: its separate environment and a running server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))  # rest.py, dsb_studies.py
sys.path.insert(0, str(REPO_ROOT / "monailabel_app"))  # lib.scribble_labels etc. (no MONAI Label needed)

VENV = Path(os.environ.get("S2L_MONAILABEL_VENV", REPO_ROOT / ".venv-monailabel"))
START_SERVER = REPO_ROOT / "monailabel_app" / "start_server.sh"
RUN_FLAG = "S2L_MONAILABEL_TEST"


@pytest.fixture(scope="session")
def monailabel_env() -> Path:
    """The MONAI Label environment; the test skips with a message where it is not built or not asked for."""
    if os.environ.get(RUN_FLAG) != "1":
        pytest.skip(f"MONAI Label integration test not requested: `bash monailabel_app/run_test.sh` sets {RUN_FLAG}=1")
    python = VENV / "bin" / "python"
    if not python.is_file():
        pytest.skip(f"no MONAI Label environment at {VENV}: build it with `bash monailabel_app/setup_env.sh`")
    return VENV


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: The test server's upload limit (``--conf max_upload_mb``): above every label and image the test sends but one.
MAX_UPLOAD_MB = 2


class Server:
    """A ``monailabel start_server`` process on 127.0.0.1 with the app, a studies folder and a bundle folder."""

    def __init__(self, studies: Path, bundle: Path, log: Path, venv: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "S2L_MONAILABEL_VENV": str(venv)}
        cmd = ["bash", str(START_SERVER), str(studies), str(self.port), "--conf", "bundle", str(bundle),
               "--conf", "max_upload_mb", str(MAX_UPLOAD_MB)]
        self._out = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout: float = 300.0) -> float:
        """Seconds until ``GET /info/`` answers."""
        from rest import Client

        start = time.time()
        client = Client(self.url, timeout=10)
        while time.time() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if client.info().status == 200:
                    return time.time() - start
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        self._out.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)  # the server's own process group (start_new_session): it and its workers
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        self._out.close()


@pytest.fixture()
def server_factory(monailabel_env: Path) -> Iterator:
    servers: list[Server] = []

    def start(studies: Path, bundle: Path, log: Path) -> Server:
        server = Server(studies, bundle, log, monailabel_env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
