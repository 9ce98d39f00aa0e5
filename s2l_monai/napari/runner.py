"""The bundle run behind the napari widget, in a process of its own: ``python -m s2l_monai.napari.runner``.

It runs ``configs/train.json`` (``training``) or ``configs/inference.json`` (``inference``) exactly as ``python -m
monai.bundle run`` does (MONAI's :func:`monai.bundle.create_workflow`, then the config's run list) and adds two
things the widget needs, without touching the configs:

* **progress events**: one line per event on stdout, ``@s2l {json}`` — ``start`` (the step budget and the
  ensemble points), ``step`` (every few steps: the loss terms and ``omega_g``, the share of unscribbled pixels in the
  pseudo-label set Ωg), ``ensemble`` (after every EMA ensemble: its coverage, its foreground share, the
  background weight drift control gave L_up (``background_weight``) and the step),
  ``done`` and ``error`` (the message of a data or configuration error, no traceback). Everything else the run logs
  goes through unchanged.
* **a clean stop**: a line ``stop`` on stdin, or stdin closing (the widget, or napari, went away), calls the
  trainer's ``terminate()``. Ignite then ends the run after the current step and fires ``COMPLETED``, so the
  bundle's own handlers write ``model.pt`` and ``checkpoint_final.pt`` from the weights reached, exactly as at the
  end of a full run. A stdin line rather than a signal: it works the same on Windows, and a napari that crashes
  does not leave a training running.

Why a process and not a thread of napari: training holds the GIL and the CPU for minutes (napari would stutter),
PyTorch's threads and ``OMP_WAIT_POLICY`` are per process, a crash of the run cannot take the viewer with it, and
the memory is returned at the end. The widget's worker thread only reads these lines.

Usage: ``python -m s2l_monai.napari.runner RUN_ID CONFIG_FILE OVERRIDES_JSON``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["EVENT_PREFIX", "emit", "main", "run"]

#: prefix of an event line on stdout
EVENT_PREFIX = "@s2l "
#: a ``step`` event every this many optimiser steps (and at the last one)
STEP_EVERY = 5


def emit(event: str, **fields: Any) -> None:
    """Print one event line (``@s2l {"event": ..., ...}``) and flush it."""
    print(EVENT_PREFIX + json.dumps({"event": event, **fields}), flush=True)


def _float(value: Any) -> float | None:
    try:
        return float(value.detach()) if hasattr(value, "detach") else float(value)
    except (TypeError, ValueError):
        return None


class _Reporter:
    """Ignite handlers that emit the widget's events; attached after the bundle's own handlers."""

    def __init__(self, trainer: Any, schedule: Any, ensemble: Any) -> None:
        self.trainer = trainer
        self.schedule = schedule
        self.ensemble = ensemble
        self.stop_requested = threading.Event()
        self.stopped = False
        self._ensembles = 0

    def attach(self) -> None:
        from ignite.engine import Events

        self.trainer.add_event_handler(Events.STARTED, self.started)
        self.trainer.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)

    def started(self, engine: Any) -> None:
        self._ensembles = len(self.ensemble.epochs_run)
        emit("start", total_steps=int(self.schedule.total_steps), step=int(engine.state.iteration),
             ensemble_points=[round(p, 4) for p in self.schedule.ensemble_points],
             warmup_steps=int(self.schedule.warmup_steps))

    def iteration_completed(self, engine: Any) -> None:
        step = int(engine.state.iteration)
        output = engine.state.output if isinstance(engine.state.output, dict) else {}
        stopping = self.stop_requested.is_set()
        if step % STEP_EVERY == 0 or step >= self.schedule.total_steps or stopping:
            terms = {k: _float(output.get(k)) for k in ("loss", "loss_sp", "loss_up", "loss_crf", "omega_g")}
            emit("step", step=step, total_steps=int(self.schedule.total_steps), **terms)
        if len(self.ensemble.epochs_run) > self._ensembles:  # the EMA handler ran in this step
            self._ensembles = len(self.ensemble.epochs_run)
            m = engine.state.metrics
            emit("ensemble", step=step, number=self._ensembles, coverage=_float(m.get("ema_coverage")),
                 foreground=_float(m.get("ema_foreground")), seconds=_float(m.get("ensemble_seconds")),
                 background_weight=_float(m.get("pseudo_background_weight")))
        if stopping and not self.stopped:
            # here, on the engine's thread: Ignite checks the flag right after these handlers, ends the run and
            # still fires COMPLETED, so the bundle writes model.pt and checkpoint_final.pt
            self.stopped = True
            engine.terminate()

    def stop(self) -> None:
        """Ask for the end of the run after the current step (thread-safe; honoured by the next step's end)."""
        self.stop_requested.set()


def _watch_stdin(reporter: _Reporter) -> None:
    """Stop the run on a ``stop`` line or at the end of stdin (daemon thread).

    Reads the file descriptor with ``os.read``, not ``sys.stdin``: a thread blocked inside ``sys.stdin`` holds its
    buffer's lock, and a data-loader worker forked meanwhile deadlocks when multiprocessing closes ``sys.stdin`` in
    the child.
    """
    seen = b""
    while True:
        try:
            chunk = os.read(0, 256)
        except OSError:
            break
        if not chunk:
            break
        seen = (seen + chunk)[-64:]
        if b"stop" in seen:
            break
    reporter.stop()


def run(run_id: str, config_file: str | Sequence[str], overrides: Mapping[str, Any]) -> int:
    """Run the bundle's ``run_id`` with the widget's events; returns the exit status (0, or 2 after an error).

    Args:
        run_id: ``training`` or ``inference``.
        config_file: the bundle config(s).
        overrides: top-level config overrides (``--key value`` of ``monai.bundle run``).
    """
    from monai.bundle import create_workflow

    from s2l_monai.errors import find_user_error, short_errors

    short_errors()
    reporter: _Reporter | None = None
    try:
        workflow = create_workflow(config_file=config_file, run_id=run_id, **dict(overrides))
        if run_id == "training":
            parser = workflow.parser
            # the same objects the run list uses: the parser resolves each id once
            trainer = parser.get_parsed_content("train#trainer")
            reporter = _Reporter(trainer, parser.get_parsed_content("schedule"),
                                 parser.get_parsed_content("ensemble#handler"))
            reporter.attach()
            threading.Thread(target=_watch_stdin, args=(reporter,), daemon=True).start()
        workflow.run()
        workflow.finalize()
    except Exception as exc:  # noqa: BLE001 - reported to the widget as one message
        user = find_user_error(exc)
        if user is None:
            import traceback

            traceback.print_exc()
        message = str(user) if user is not None else f"{type(exc).__name__}: {exc}"
        emit("error", message=message, user_error=user is not None)
        return 2
    step = None
    if reporter is not None:
        step = int(reporter.trainer.state.iteration)
    emit("done", stopped=bool(reporter is not None and reporter.stopped), step=step)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``RUN_ID CONFIG_FILE OVERRIDES_JSON``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3:
        print("usage: python -m s2l_monai.napari.runner RUN_ID CONFIG_FILE OVERRIDES_JSON", file=sys.stderr)
        return 2
    run_id, config_file, overrides = args
    return run(run_id, config_file, json.loads(overrides))


if __name__ == "__main__":
    sys.exit(main())
