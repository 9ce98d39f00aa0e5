"""Shared pieces of the benchmark harnesses: machine description, peak-RSS measurement, result files, markdown.

Used by ``benchmarks/dsb.py`` (BBBC038 / DSB2018) and meant to be reused by the other benchmarks (EM). Nothing here
imports torch or MONAI at module level, so the report tests stay fast.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ProcessTreeMonitor",
    "RunResult",
    "append_record",
    "fmt",
    "git_commit",
    "json_safe",
    "load_records",
    "machine_info",
    "machine_line",
    "markdown_table",
    "mean_std",
    "now_iso",
    "process_tree_rss_kb",
    "run_measured",
    "write_json_atomic",
    "write_text_atomic",
]

DASH = "–"  # what an empty cell shows; never a made-up number


# --------------------------------------------------------------------------------------------------------------
# Machine and provenance
# --------------------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _usable_cores() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def machine_info(with_versions: bool = True) -> dict[str, Any]:
    """Describe this machine: CPU model, usable cores, RAM, GPU (if torch sees one) and library versions.

    Args:
        with_versions: also import torch and MONAI to report their versions and the GPU (slow-ish, ~2 s).

    Returns:
        A JSON-able dict with ``cpu``, ``cores``, ``ram_gb``, ``gpu``, ``python``, ``torch``, ``monai``,
        ``platform`` and ``hostname``.
    """
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": _usable_cores(),
        "ram_gb": _ram_gb(),
        "gpu": None,
        "python": platform.python_version(),
        "torch": None,
        "monai": None,
        "platform": platform.platform(terse=True),
        "hostname": platform.node(),
    }
    if with_versions:
        try:
            import torch

            info["torch"] = torch.__version__
            if torch.cuda.is_available():
                info["gpu"] = torch.cuda.get_device_name(0)
        except Exception:  # noqa: BLE001 - a description must never fail the benchmark
            pass
        try:
            import monai

            info["monai"] = monai.__version__
        except Exception:  # noqa: BLE001
            pass
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One human line for a :func:`machine_info` dict."""
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    return (
        f"{info.get('cpu', '?')}, {info.get('cores', '?')} cores, {info.get('ram_gb', '?')} GB RAM{gpu}; "
        f"Python {info.get('python', '?')}, torch {info.get('torch', '?')}, MONAI {info.get('monai', '?')}"
    )


def git_commit(repo: str | Path) -> str | None:
    """The commit checked out in ``repo`` (with ``+dirty`` when tracked files are modified), or ``None``."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True, timeout=20
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo, capture_output=True, text=True, timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}+dirty" if dirty else sha


def now_iso() -> str:
    """Local time, ISO 8601 with offset, to the second."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------------------
# Peak RSS of a process tree
# --------------------------------------------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    """Parent pid -> child pids, from ``/proc/<pid>/stat`` of every process."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # the command name (field 2) is in parentheses and may contain spaces: parse after the last ')'
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0  # exited, or a kernel thread / zombie without VmRSS


def process_tree_rss_kb(pid: int) -> int:
    """Sum of ``VmRSS`` (kB) of ``pid`` and all its descendants now (0 if it is gone).

    Shared pages (e.g. copy-on-write memory of DataLoader workers) are counted once per process, so the sum is an
    upper bound of the physical memory the tree uses, which is what a user has to provision.
    """
    children = _children_map()
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _rss_kb(p)
        stack.extend(children.get(p, ()))
    return total


class ProcessTreeMonitor:
    """Poll a process tree's summed RSS in a background thread and keep the maximum.

    Example::

        with ProcessTreeMonitor(proc.pid, interval=0.5) as mon:
            proc.wait()
        mon.peak_mb
    """

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kb = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"rss-{pid}", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> int:
        """Take one sample now; return it (kB) and update the peak."""
        kb = process_tree_rss_kb(self.pid)
        self.peak_kb = max(self.peak_kb, kb)
        self.samples += 1
        return kb

    @property
    def peak_mb(self) -> float:
        """The peak summed RSS in MB (2**20 bytes)."""
        return self.peak_kb / 1024.0

    def start(self) -> ProcessTreeMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def __enter__(self) -> ProcessTreeMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class RunResult:
    """Outcome of :func:`run_measured`."""

    returncode: int
    seconds: float
    peak_rss_mb: float
    log_path: Path | None


#: Set for every measured child unless the caller's environment already sets it. With torch's default OpenMP
#: wait policy (spinning), a 2-core machine where anything else runs (a data-loader worker, another job) slowed
#: an ensemble pass over 128 slices from 7 s to 104 s and 6 epochs of the default training from 16-22 s to 161 s;
#: PASSIVE kept them at 7 s and 22 s (about 25% slower than spinning on an idle machine). Measured 2026-11-25,
#: 2 cores; see docs/design.md, "Speed on small machines". Timings should not depend on what else happens to run.
CHILD_ENV: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}


def run_measured(
    cmd: Sequence[str],
    cwd: str | Path,
    log_path: str | Path | None = None,
    env: dict[str, str] | None = None,
    interval: float = 0.5,
    echo: bool = False,
) -> RunResult:
    """Run ``cmd``, measuring its wall time and the peak summed RSS of its process tree.

    Args:
        cmd: the command (no shell).
        cwd: working directory.
        log_path: file for stdout and stderr together (appended; ``None``: inherit the console).
        env: environment (default: this process's), always with ``OMP_WAIT_POLICY`` (see :data:`CHILD_ENV`).
        interval: RSS polling interval in seconds.
        echo: with ``log_path``, also copy the output to this process's stdout, line by line.

    Returns:
        A :class:`RunResult`.
    """
    env = {**CHILD_ENV, **(os.environ if env is None else env)}
    log = None
    if log_path is not None:
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "a", buffering=1)  # noqa: SIM115 - closed below
        log.write(f"$ {' '.join(cmd)}\n")
    start = time.perf_counter()
    try:
        proc = subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE if (log and echo) else log,
            stderr=subprocess.STDOUT if log else None,
            text=True if (log and echo) else None,
        )
        with ProcessTreeMonitor(proc.pid, interval=interval) as monitor:
            if log and echo and proc.stdout is not None:
                for line in proc.stdout:
                    log.write(line)
                    sys.stdout.write(line)
            rc = proc.wait()
        seconds = time.perf_counter() - start
    finally:
        if log:
            log.close()
    return RunResult(rc, seconds, round(monitor.peak_mb, 1), log_path)


# --------------------------------------------------------------------------------------------------------------
# Result files
# --------------------------------------------------------------------------------------------------------------


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats as ``None`` and numpy scalars as Python numbers (recursively)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (TypeError, ValueError):
            return value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """:func:`write_text_atomic` of ``obj`` as indented JSON (NaN written as ``null``)."""
    write_text_atomic(path, json.dumps(json_safe(obj), indent=2) + "\n")


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a result file (a JSON list); ``[]`` if it does not exist.

    Raises:
        ValueError: the file exists but is not a JSON list (it is never overwritten silently).
    """
    path = Path(path)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); fix or move it, it holds measured results") from exc
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of records, found {type(data).__name__}")
    return data


def append_record(path: str | Path, record: dict[str, Any], key_fields: Sequence[str] | None = None) -> bool:
    """Append ``record`` to the JSON list in ``path`` (re-read first, written atomically).

    Args:
        path: result file.
        record: the record.
        key_fields: if given, a record with the same values of these fields already in the file is kept and
            ``record`` is not added.

    Returns:
        ``True`` if the record was added.
    """
    records = load_records(path)
    if key_fields is not None:
        key = tuple(_key_value(record.get(f)) for f in key_fields)
        if any(tuple(_key_value(r.get(f)) for f in key_fields) == key for r in records):
            return False
    records.append(json_safe(record))
    write_json_atomic(path, records)
    return True


def ensure_calibration(
    ckpt: Path, enabled: bool, calibrate_cmd: Sequence[str], cwd: str | Path, log_path: str | Path | None = None,
    can_calibrate: bool = True, refine_weight: float | None = None,
) -> float:
    """The foreground threshold a run's evaluation will read (``s2l_monai.calibration``), made consistent with its
    recipe: with calibration on (the default), a training that finished before calibration existed (a reused run
    folder) is calibrated now by ``calibrate_cmd`` (``python -m s2l_monai calibrate ...``; training does it itself
    since 2026-12-05); with it off, a calibration file is removed so the evaluation reads the argmax.
    ``can_calibrate`` false (a recipe whose network ``s2l calibrate`` does not build, e.g. ``configs/paper.json``):
    only what the training wrote is read. ``refine_weight`` (the recipe's boundary refinement): a calibration made
    with another one (e.g. before refinement existed, 2026-12-05) is made again, as the threshold is chosen on the
    refined probabilities; a record that did not calibrate (not objects on a background) is kept.

    Returns:
        The threshold in ``<model>.calibration.json``, or 0.5 (the argmax) without one.

    Raises:
        RuntimeError: the calibration command failed.
    """
    from s2l_monai.calibration import DEFAULT_THRESHOLD, calibration_path

    path = calibration_path(ckpt)
    if not enabled:
        if path.is_file():
            path.unlink()
        return DEFAULT_THRESHOLD
    stale = False
    if path.is_file() and can_calibrate and refine_weight is not None:
        record = json.loads(path.read_text())
        stale = not record.get("not_calibrated") and float(record.get("refine_weight", 0.0)) != float(refine_weight)
    if (stale or not path.is_file()) and can_calibrate:
        res = run_measured(calibrate_cmd, cwd, log_path)
        if res.returncode != 0 or not path.is_file():
            raise RuntimeError(f"calibration of {ckpt} exited {res.returncode}; see {log_path}")
    if not path.is_file():
        return DEFAULT_THRESHOLD
    return float(json.loads(path.read_text())["foreground_threshold"])


def calibrated_refinement(ckpt: Path) -> float:
    """The boundary-refinement weight a run's evaluation applies (``refine_weight`` ``"auto"`` of
    ``configs/inference.json``): the one in ``<model>.calibration.json``, 0 without one."""
    from s2l_monai.calibration import resolve_refinement

    return resolve_refinement("auto", ckpt)


def _key_value(value: Any) -> Any:
    """Normalise a key field: floats rounded (0.30000000000000004 == 0.3), everything else as is."""
    if isinstance(value, float):
        return round(value, 6)
    return value


# --------------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------------


def current_recipe(records: Sequence[dict[str, Any]], headline: str = "default") -> list[dict[str, Any]]:
    """The records of one table cell to show: those of the ``headline`` profile (``+smoke`` stripped) where the cell
    has any, else those of the retired recipe measured last (e.g. ``default-1200`` stands in until the headline's
    are measured; the report marks them with their profile). Never a mix of recipes: a mean over seeds of two
    different recipes is no recipe's figure."""
    by_profile: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_profile.setdefault(str(r.get("profile", headline)).split("+")[0], []).append(r)
    if headline in by_profile:
        return by_profile[headline]
    if not by_profile:
        return []
    newest = max(by_profile, key=lambda p: max(str(r.get("date", "")) for r in by_profile[p]))
    return by_profile[newest]


def _finite(values: Iterable[Any]) -> list[float]:
    out = []
    for v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out.append(float(v))
    return out


def mean_std(values: Iterable[Any]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (``None`` with fewer than 2 values) and count of the finite values."""
    vals = _finite(values)
    if not vals:
        return None, None, 0
    std = statistics.stdev(vals) if len(vals) >= 2 else None
    return statistics.fmean(vals), std, len(vals)


def fmt(value: Any, digits: int = 4, std: Any = None) -> str:
    """Format a number (``–`` for missing / NaN), with ``±std`` when ``std`` is given."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return DASH
    text = f"{value:.{digits}f}"
    if std is not None and isinstance(std, (int, float)) and math.isfinite(std):
        text += f"±{std:.{digits}f}"
    return text


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A GitHub markdown table; ``align`` per column is ``"l"`` or ``"r"`` (default: first left, rest right)."""
    align = list(align) if align else ["l"] + ["r"] * (len(headers) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def svg_panel(
    x0: float,
    title: str,
    xlabel: str,
    x_range: tuple[float, float],
    y_range: tuple[float, float],
    x_ticks: Sequence[tuple[float, str]],
    reference: tuple[float, str] | None = None,
    width: int = 420,
    height: int = 300,
    pad: int = 55,
) -> tuple[list[str], Callable[[float], float], Callable[[float], float]]:
    """One plot panel of the benchmarks' SVG figures: title, axes, tick labels, an optional dashed reference line.

    Args:
        x0: left edge of the panel in the figure.
        title: text above the panel.
        xlabel: text under the x axis.
        x_range: data range of x; y_range: that of y (the y ticks: both ends inset by 0.01 and the middle).
        x_ticks: ``(x, label)`` pairs.
        reference: ``(y, colour)`` of a dashed horizontal line (e.g. Otsu), or None.

    Returns:
        the SVG elements, and the functions from data x and y to figure coordinates.
    """
    (x_lo, x_hi), (lo, hi) = x_range, y_range

    def px(x: float) -> float:
        return x0 + pad + (x - x_lo) / max(x_hi - x_lo, 1e-9) * (width - 2 * pad)

    def py(v: float) -> float:
        return height - pad - (v - lo) / max(hi - lo, 1e-9) * (height - 2 * pad)

    parts = [f'<text x="{x0 + width / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
             f'<line x1="{x0 + pad}" y1="{height - pad}" x2="{x0 + width - pad}" y2="{height - pad}" stroke="black"/>',
             f'<line x1="{x0 + pad}" y1="{pad}" x2="{x0 + pad}" y2="{height - pad}" stroke="black"/>',
             f'<text x="{x0 + width / 2}" y="{height - 12}" text-anchor="middle" font-size="12">{xlabel}</text>']
    parts += [f'<text x="{px(x):.1f}" y="{height - pad + 15}" text-anchor="middle" font-size="10">{label}</text>'
              for x, label in x_ticks]
    parts += [f'<text x="{x0 + pad - 5}" y="{py(v) + 3:.1f}" text-anchor="end" font-size="10">{v:.3f}</text>'
              for v in (lo + 0.01, (lo + hi) / 2, hi - 0.01)]
    if reference is not None:
        y, colour = reference
        parts.append(f'<line x1="{x0 + pad}" y1="{py(y):.1f}" x2="{x0 + width - pad}" y2="{py(y):.1f}" '
                     f'stroke="{colour}" stroke-dasharray="5,4"/>')
    return parts, px, py

