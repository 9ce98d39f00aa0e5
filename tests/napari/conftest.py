"""Fixtures of the napari plugin's tests: an X server for napari's OpenGL canvas, the sample's layers.

napari draws with OpenGL also under ``QT_QPA_PLATFORM=offscreen`` (through GLX), so the tests need an X display:
the session's own when ``DISPLAY`` is set, else a private ``Xvfb`` started here (Debian package ``xvfb``); without
either, the widget tests skip with a message. Nothing here imports napari: the test modules skip themselves when it
is not installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the test process ends (Linux), however it ends."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _start_xvfb() -> subprocess.Popen | None:
    """An ``Xvfb`` on a free display number, or None when Xvfb is not installed or does not start."""
    binary = shutil.which("Xvfb")
    if binary is None:
        return None
    for number in range(90, 110):
        if Path(f"/tmp/.X11-unix/X{number}").exists() or Path(f"/tmp/.X{number}-lock").exists():
            continue
        # it ends with this process (not at the end of the session: Qt still holds its connection until the
        # interpreter exits, and a server gone before that makes Qt abort with "XIO: fatal IO error")
        process = subprocess.Popen(
            [binary, f":{number}", "-screen", "0", "1600x1000x24", "-nolisten", "tcp"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent,
        )
        for _ in range(50):
            if Path(f"/tmp/.X11-unix/X{number}").exists():
                os.environ["DISPLAY"] = f":{number}"
                return process
            if process.poll() is not None:
                break
            time.sleep(0.1)
        process.kill()
    return None


@pytest.fixture(scope="session")
def x_display() -> Iterator[str]:
    """An X display for napari's canvas (the session's, or a private Xvfb for the test session)."""
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    process = _start_xvfb()
    if process is None:
        pytest.skip("napari's canvas needs an X display: set DISPLAY or install Xvfb (apt-get install xvfb)")
    yield os.environ["DISPLAY"]  # the server ends with this process (_die_with_parent)


@pytest.fixture
def viewer(x_display, make_napari_viewer):
    """A napari viewer (napari's ``make_napari_viewer`` fixture, which also closes it)."""
    return make_napari_viewer()


@pytest.fixture(autouse=True)
def _passive_threads(monkeypatch):
    """Training children inherit this: PyTorch's threads do not spin on a shared machine."""
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
