"""Ignite handlers around the Scribble2Label loss."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from monai.engines import IterationEvents
from monai.utils import min_version, optional_import

from s2l_monai.losses import ScribbleLoss

Events, _ = optional_import("ignite.engine", "0.5", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.5", min_version, "Engine")

__all__ = ["ScribbleLossHandler", "TrainingTimeLimit"]


class ScribbleLossHandler:
    """Switch the pseudo-label term on after warm-up and publish the loss terms.

    At every ``EPOCH_STARTED`` it sets ``loss_function.pseudo_label_enabled`` to ``epoch > warmup_epochs``
    (Ignite counts epochs from 1, so epochs ``1..warmup_epochs`` are the paper's warm-up ``0..E_W-1``). After every
    loss computation (MONAI's ``IterationEvents.LOSS_COMPLETED``) it copies ``loss_sp``, ``loss_up`` and
    ``omega_g`` into ``engine.state.output``, where ``StatsHandler``, ``TensorBoardStatsHandler`` and Ignite
    metrics see them.

    Args:
        loss_function: the trainer's loss.
        warmup_epochs: number of epochs with the scribble loss only (paper: 100).
    """

    def __init__(self, loss_function: ScribbleLoss, warmup_epochs: int = 100) -> None:
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}.")
        self.loss_function = loss_function
        self.warmup_epochs = int(warmup_epochs)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self.loss_completed)

    def epoch_started(self, engine: Engine) -> None:
        self.loss_function.pseudo_label_enabled = engine.state.epoch > self.warmup_epochs

    def loss_completed(self, engine: Engine) -> None:
        if isinstance(engine.state.output, dict):
            engine.state.output.update(self.loss_function.terms)


class TrainingTimeLimit:
    """Stop training before a wall-clock budget runs out, at an epoch boundary where possible.

    Ignite's ``TimeLimit`` starts its clock when it is constructed (while the bundle config is still being parsed)
    and only stops after the limit has passed; a time-boxed profile ("at most 10 minutes of training on 2 cores")
    needs the clock to start with the run and to stop BEFORE the budget is spent. So, with ``t`` the time since
    ``STARTED``:

    - at ``EPOCH_COMPLETED`` (attach it after the ensemble handler, so that epoch's ensemble is counted): stop when
      ``t`` plus the longest epoch so far would pass ``max_seconds`` (the next epoch would not fit);
    - at ``ITERATION_COMPLETED``: stop when ``t`` has passed ``max_seconds`` (a safety net for an epoch slower than
      all before it).

    ``engine.terminate()`` still fires ``COMPLETED``, so final checkpoints are written. The number of epochs
    actually trained is in the final checkpoint's trainer state and in the log.

    Args:
        max_seconds: the budget in seconds; ``None`` or ``<= 0`` disables the handler (train all ``max_epochs``).
    """

    def __init__(self, max_seconds: float | None = None) -> None:
        self.max_seconds = float(max_seconds) if max_seconds is not None and float(max_seconds) > 0 else None
        self.logger = logging.getLogger(self.__class__.__name__)
        self.start = self.epoch_start = 0.0
        self.longest_epoch = 0.0
        self.stopped_early = False

    def attach(self, engine: Engine) -> None:
        if self.max_seconds is None:
            return
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)

    def started(self, engine: Engine) -> None:
        self.start = time.perf_counter()
        self.longest_epoch, self.stopped_early = 0.0, False

    def epoch_started(self, engine: Engine) -> None:
        self.epoch_start = time.perf_counter()

    def epoch_completed(self, engine: Engine) -> None:
        now = time.perf_counter()
        self.longest_epoch = max(self.longest_epoch, now - self.epoch_start)
        elapsed = now - self.start
        if engine.state.epoch < engine.state.max_epochs and elapsed + self.longest_epoch > self.max_seconds:
            self._stop(engine, f"another epoch (up to {self.longest_epoch:.1f} s) would pass the budget")

    def iteration_completed(self, engine: Engine) -> None:
        if not self.stopped_early and time.perf_counter() - self.start > self.max_seconds:
            self._stop(engine, "the budget is spent (mid-epoch)")

    def _stop(self, engine: Engine, why: str) -> None:
        self.stopped_early = True
        self.logger.warning(
            f"Time limit {self.max_seconds:.0f} s: stopping after epoch {engine.state.epoch} of "
            f"{engine.state.max_epochs}, iteration {engine.state.iteration} "
            f"({time.perf_counter() - self.start:.1f} s of training): {why}."
        )
        engine.terminate()
