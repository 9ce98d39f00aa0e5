"""The widget's side of a bundle run: start :mod:`s2l_monai.napari.runner` in a process, read its events, stop it.

No Qt here: the widget iterates :meth:`BundleProcess.events` in a napari worker thread and calls
:meth:`BundleProcess.stop` from the GUI thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from s2l_monai.napari.runner import EVENT_PREFIX

__all__ = ["BundleProcess", "configs_dir", "zoo_weights"]

#: seconds a stopped run may take to write its final files before it is killed
STOP_GRACE_SECONDS = 120.0


def configs_dir() -> Path:
    """The bundle's ``configs/`` folder (the one ``s2l train`` uses)."""
    from s2l_monai.cli import _configs_dir

    return _configs_dir()


def zoo_weights() -> Path | None:
    """The bundle zoo's pretrained weights (``bundle/models/model.pt`` beside ``configs/``), where present."""
    from s2l_monai.pretrained import shipped_weights

    return shipped_weights(configs_dir().parent)


class BundleProcess:
    """One bundle run (``training`` or ``inference``) in a child process, with its events.

    Args:
        run_id: ``training`` or ``inference``.
        config_file: the bundle config.
        overrides: top-level config overrides.
        log_path: where the run's own output (logs, and a traceback if it fails) is written.
        cwd: working directory of the run (its ``bundle_root``).
    """

    def __init__(
        self,
        run_id: str,
        config_file: str | Path,
        overrides: Mapping[str, Any],
        log_path: str | Path,
        cwd: str | Path,
    ) -> None:
        self.run_id = run_id
        self.config_file = str(config_file)
        self.overrides = dict(overrides)
        self.log_path = Path(log_path)
        self.cwd = Path(cwd)
        self.process: subprocess.Popen | None = None
        self.error: str | None = None
        self.returncode: int | None = None
        self._lock = threading.Lock()
        self._stop_sent = False

    def command(self) -> list[str]:
        """The child's command line."""
        return [sys.executable, "-W", "ignore:parsing config_file:UserWarning", "-m", "s2l_monai.napari.runner",
                self.run_id, self.config_file, json.dumps(self.overrides)]

    def events(self) -> Iterator[dict[str, Any]]:
        """Start the run and yield its events (dicts with ``event``) until it ends.

        The last event is ``done``, or ``error`` with a ``message`` (the run's own, or the end of its log when it
        died without one).
        """
        env = dict(os.environ)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `s2l train`: no spinning threads on a shared machine
        env["PYTHONUNBUFFERED"] = "1"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.cwd.mkdir(parents=True, exist_ok=True)
        finished = False
        with open(self.log_path, "w", encoding="utf-8") as log:
            log.write("$ " + " ".join(self.command()) + "\n")
            log.flush()
            with self._lock:
                self.process = subprocess.Popen(
                    self.command(), cwd=self.cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=log, text=True, bufsize=1,
                )
            assert self.process.stdout is not None
            for line in self.process.stdout:
                if line.startswith(EVENT_PREFIX):
                    try:
                        event = json.loads(line[len(EVENT_PREFIX):])
                    except ValueError:
                        continue
                    if event.get("event") == "error":
                        self.error = str(event.get("message"))
                    finished |= event.get("event") in ("done", "error")
                    yield event
                else:
                    log.write(line)
                    log.flush()
            self.returncode = self.process.wait()
            if self.process.stdin is not None:
                self.process.stdin.close()
        if not finished:
            self.error = f"the run ended with exit status {self.returncode} and no result; see {self.log_path}"
            tail = self.log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
            yield {"event": "error", "message": self.error + (":\n" + "\n".join(tail) if tail else "")}

    def stop(self) -> None:
        """Ask the run to end after its current step (it still writes ``model.pt``); kill it if it does not end
        within :data:`STOP_GRACE_SECONDS`."""
        with self._lock:
            process = self.process
            if process is None or process.poll() is not None or self._stop_sent:
                return
            self._stop_sent = True
        try:
            assert process.stdin is not None
            process.stdin.write("stop\n")
            process.stdin.flush()
        except (OSError, ValueError):
            pass
        timer = threading.Timer(STOP_GRACE_SECONDS, lambda: process.poll() is None and process.kill())
        timer.daemon = True
        timer.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None
