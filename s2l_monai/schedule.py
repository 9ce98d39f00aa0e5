"""A training schedule measured in shares of a budget, so one recipe fits 10 large images and 500 small ones.

The paper schedules Scribble2Label in epochs (300 epochs, warm-up ``E_W`` = 100, an ensemble every ``gamma`` = 5
epochs, EMA weight ``alpha`` = 0.2). An epoch is a different amount of training on every dataset: 10 training
images of 1024x1024 make an epoch of a few optimiser steps, 500 small images one of hundreds. Epoch-based recipes
tuned on one dataset therefore do not carry over. :class:`TrainingSchedule` lays the same schedule on the
*progress* of the run instead, ``progress = max(step / total_steps, seconds / max_seconds)`` in ``[0, 1]``:

- warm-up (``L_sp`` only) until ``progress >= warmup``;
- the prediction ensemble every ``ensemble_interval`` of the run, starting one interval before warm-up ends
  (earlier averages would be forgotten by the time ``L_up`` reads them);
- the EMA weight from the memory the average should have, as a share of the run:
  ``alpha = 1 - exp(-ensemble_interval / ema_memory)``, so the newest prediction's weight decays by ``e`` over
  ``ema_memory`` of the run whatever the interval (paper: ``gamma / alpha`` = 25 of 300 epochs);
- a cosine learning-rate decay over the progress (:meth:`lr_factor`).

The epoch keys of the paper stay available as overrides: ``max_epochs``, ``warmup_epochs`` and ``ema_every`` are
turned into steps with ``steps_per_epoch``, and an explicit ``ema_alpha`` is used as given.

Ignite's own ``TimeLimit``/``Events(every=...)`` filters count epochs or iterations of a known length and know no
budget shared between steps and seconds, hence this small module. :class:`ScheduleHandler` ends the run when the
budget is spent; :class:`s2l_monai.handlers.ScribbleLossHandler` and :class:`s2l_monai.ensemble.EMAEnsembleHandler`
read the schedule.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from monai.utils import min_version, optional_import

from s2l_monai import distributed

Events, _ = optional_import("ignite.engine", "0.5", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.5", min_version, "Engine")

__all__ = ["TrainingSchedule", "ScheduleHandler"]


class TrainingSchedule:
    """Budget, warm-up, ensemble interval and EMA weight of one training run, as shares of the run.

    Args:
        steps_per_epoch: optimiser steps in one pass over the training data (``len(train_dataloader)``).
        max_steps: the budget in optimiser steps; ignored when ``max_epochs`` is given.
        max_epochs: override: the budget in epochs (``max_epochs * steps_per_epoch`` steps).
        max_seconds: optional wall-clock budget; the run ends at whichever budget is spent first, and the schedule
            follows the larger of the two shares.
        warmup: share of the run trained on the scribbles alone (paper: 100 of 300 epochs).
        warmup_epochs: override: the warm-up in epochs.
        ensemble_interval: share of the run between two ensembles.
        ema_every: override: the ensemble interval ``gamma`` in epochs.
        ema_memory: time constant of the EMA, as a share of the run; gives ``alpha`` (see the module notes).
        ema_alpha: override: the EMA weight of the newest prediction (paper: 0.2).
        lr_min_factor: final learning rate as a share of the initial one (cosine decay over the progress).
    """

    def __init__(
        self,
        steps_per_epoch: int,
        max_steps: int | None = 2400,
        max_epochs: int | None = None,
        max_seconds: float | None = None,
        warmup: float = 0.6,
        warmup_epochs: int | None = None,
        ensemble_interval: float = 0.1,
        ema_every: int | None = None,
        ema_memory: float = 0.15,
        ema_alpha: float | None = None,
        lr_min_factor: float = 0.05,
    ) -> None:
        if steps_per_epoch < 1:
            raise ValueError(
                f"steps_per_epoch must be >= 1, got {steps_per_epoch}: the training list is empty or smaller than "
                "one batch."
            )
        self.steps_per_epoch = int(steps_per_epoch)
        if max_epochs is not None:
            if max_epochs < 1:
                raise ValueError(f"max_epochs must be >= 1, got {max_epochs}.")
            self.total_steps = int(max_epochs) * self.steps_per_epoch
        elif max_steps is not None:
            if max_steps < 1:
                raise ValueError(f"max_steps must be >= 1, got {max_steps}.")
            self.total_steps = int(max_steps)
        else:
            raise ValueError("set a budget: max_steps or max_epochs.")
        self.max_seconds = float(max_seconds) if max_seconds is not None and float(max_seconds) > 0 else None

        self.notes: list[str] = []  # what the user should know about this schedule (logged at start)
        if warmup_epochs is not None:
            warmup = warmup_epochs * self.steps_per_epoch / self.total_steps
            if warmup >= 1.0:
                self.notes.append(
                    f"warmup_epochs {warmup_epochs} >= the run's {self.total_steps / self.steps_per_epoch:g} epochs: "
                    "the pseudo-label loss never switches on (this is partial cross-entropy only)"
                )
                warmup = 1.0
        if not 0.0 <= warmup <= 1.0:
            raise ValueError(f"warmup must be a share of the run in [0, 1], got {warmup}.")
        self.warmup = float(warmup)

        if ema_every is not None:
            if ema_every < 1:
                raise ValueError(f"ema_every must be >= 1 epoch, got {ema_every}.")
            ensemble_interval = ema_every * self.steps_per_epoch / self.total_steps
        if ensemble_interval <= 0.0:
            raise ValueError(f"ensemble_interval must be a share of the run > 0 (> 1: no ensemble), got "
                             f"{ensemble_interval}.")
        self.ensemble_interval = float(ensemble_interval)
        if ema_alpha is None:
            if ema_memory <= 0:
                raise ValueError(f"ema_memory must be > 0, got {ema_memory}.")
            ema_alpha = 1.0 - math.exp(-min(self.ensemble_interval, 1.0) / ema_memory)
        if not 0.0 < ema_alpha <= 1.0:
            raise ValueError(f"ema_alpha must be in (0, 1], got {ema_alpha}.")
        self.ema_alpha = float(ema_alpha)
        self.ema_memory = float(ema_memory)
        self.lr_min_factor = float(lr_min_factor)
        # epoch overrides keep the paper's grid (ensembles at gamma, 2 gamma, ... epochs, from the first epoch on);
        # share-based schedules start one interval before warm-up ends
        self.epoch_grid = ema_every is not None
        self.ensemble_start = self.ensemble_interval if self.epoch_grid else max(
            self.ensemble_interval, self.warmup - self.ensemble_interval)
        if not self.ensemble_points and self.warmup < 1.0:
            self.notes.append(
                f"no ensemble fits in the run (ensemble interval {self.ensemble_interval:.2f} of the run"
                + (f", ema_every {ema_every} epochs > {self.total_steps / self.steps_per_epoch:g} epochs" if ema_every
                   else "")
                + "): no pseudo-label is ever made"
            )
        # state (saved in checkpoints): training seconds before this process, the last step seen
        self.seconds_before = 0.0
        self.step = 0
        self.ensembles_done = 0
        self._clock: float | None = None
        self._agreed: float | None = None  # under torchrun: the ranks' common clock (see ScheduleHandler)

    # ---------------------------------------------------------------------------------------------------- derived
    @property
    def max_epochs(self) -> int:
        """Epochs the trainer must be allowed to run (the step budget ends the run, possibly mid-epoch)."""
        return max(1, math.ceil(self.total_steps / self.steps_per_epoch))

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup * self.total_steps))

    @property
    def ensemble_points(self) -> list[float]:
        """Progress values at which an ensemble runs.

        Share-based schedules stop before the end (an ensemble after the last step is never read by ``L_up``);
        the paper's epoch grid keeps its ensemble at the last epoch when ``max_epochs`` is a multiple of ``gamma``.
        """
        points, k = [], 0
        end = 1.0 + 1e-9 if self.epoch_grid else 1.0 - 1e-9
        while True:
            point = self.ensemble_start + k * self.ensemble_interval
            if point >= end:
                return points
            points.append(round(point, 9))
            k += 1

    def sync(self, step: int) -> None:
        """Set the position after ``step`` steps (a fresh or a resumed run): the ensemble points already passed
        count as done (a checkpoint is written after the ensembles of its step)."""
        self.step = int(step)
        progress = self.progress(step)
        self.ensembles_done = sum(p <= progress + 1e-9 for p in self.ensemble_points) if step > 0 else 0

    def seconds(self) -> float:
        """Training seconds so far (this process and the ones before it, for a resumed run)."""
        if self._agreed is not None:
            return self._agreed
        running = 0.0 if self._clock is None else time.perf_counter() - self._clock
        return self.seconds_before + running

    def agree(self, seconds: float | None) -> None:
        """Use ``seconds`` as the clock until the next call (None: the own clock again). Under ``torchrun`` every
        rank must take the same time-budget decisions (warm-up, ensembles, the end) at the same step, or one rank
        waits for the others forever; :class:`ScheduleHandler` sets the slowest rank's clock after every step."""
        self._agreed = None if seconds is None else float(seconds)

    def progress(self, step: int | None = None) -> float:
        """Share of the budget spent after ``step`` optimiser steps (default: the last step seen)."""
        step = self.step if step is None else step
        share = step / self.total_steps
        if self.max_seconds is not None:
            share = max(share, self.seconds() / self.max_seconds)
        return min(1.0, share)

    def in_warmup(self, step: int | None = None) -> bool:
        """Whether ``L_up`` is still off (the paper's warm-up)."""
        return self.progress(step) < self.warmup - 1e-9

    def ensemble_due(self, step: int | None = None) -> bool:
        """Whether the next ensemble point has been reached (an ensemble should run now)."""
        points = self.ensemble_points
        return self.ensembles_done < len(points) and self.progress(step) >= points[self.ensembles_done] - 1e-9

    def finished(self, step: int | None = None) -> bool:
        return self.progress(step) >= 1.0

    def lr_factor(self, step: int) -> float:
        """Cosine decay of the learning rate over the progress, from 1 to ``lr_min_factor``.

        Suits ``torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule.lr_factor)`` stepped every
        iteration; ``step`` is the scheduler's own count, the time budget is read from the clock.
        """
        share = step / self.total_steps
        if self.max_seconds is not None and self._clock is not None:
            share = max(share, self.seconds() / self.max_seconds)
        share = min(1.0, share)
        return self.lr_min_factor + (1.0 - self.lr_min_factor) * 0.5 * (1.0 + math.cos(math.pi * share))

    def describe(self) -> str:
        budget = f"{self.total_steps} steps ({self.total_steps / self.steps_per_epoch:.1f} epochs of " \
                 f"{self.steps_per_epoch} steps)"
        if self.max_seconds is not None:
            budget += f" or {self.max_seconds:.0f} s, whichever comes first"
        points = ", ".join(f"{p:.2f}" for p in self.ensemble_points)
        return (f"schedule: {budget}; warm-up until {self.warmup:.2f} of the run (step {self.warmup_steps}); "
                f"ensembles at {points or 'none'}; EMA alpha {self.ema_alpha:.3f}")

    # ---------------------------------------------------------------------------------------------------- state
    def start_clock(self) -> None:
        self._agreed = None
        self._clock = time.perf_counter()

    def stop_clock(self) -> None:
        self._agreed = None
        if self._clock is not None:
            self.seconds_before += time.perf_counter() - self._clock
            self._clock = None

    def state_dict(self) -> dict[str, Any]:
        """The training seconds spent so far (what a resumed run cannot recompute); the step is the trainer's."""
        return {"seconds": self.seconds(), "step": self.step}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._agreed = None
        self.seconds_before = float(state_dict.get("seconds", 0.0))
        self.step = int(state_dict.get("step", 0))
        if self._clock is not None:
            self._clock = time.perf_counter()


class ScheduleHandler:
    """Keep a :class:`TrainingSchedule` in step with a trainer and end the run when the budget is spent.

    Attach it before the handlers that read the schedule. It starts the clock at ``STARTED``, records the
    iteration after every step and, once the progress reaches 1, makes the current epoch the last one (ending it
    early with ``engine.terminate_epoch()`` when the budget runs out mid-epoch), so ``EPOCH_COMPLETED`` (epoch
    metrics, checkpoints) and ``COMPLETED`` (final checkpoints) still fire. It stops the clock at ``COMPLETED`` and
    logs the schedule once. Under ``torchrun`` with a time budget, the ranks agree on the slowest one's clock
    after every step (one small all-reduce), so they end, warm up and ensemble at the same step.

    Args:
        schedule: the schedule.
    """

    def __init__(self, schedule: TrainingSchedule) -> None:
        self.schedule = schedule
        self.logger = logging.getLogger(self.__class__.__name__)
        self._synced = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_STARTED, self.iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine: Engine) -> None:
        self.schedule.start_clock()
        self._synced = False
        self.logger.info(self.schedule.describe())
        for note in self.schedule.notes:
            self.logger.warning(note)

    def iteration_started(self, engine: Engine) -> None:
        # at the first step, not at STARTED: a resumed run's CheckpointLoader restores the iteration (and the
        # schedule's seconds) at STARTED, possibly after this handler
        if not self._synced:
            self.schedule.sync(engine.state.iteration - 1)
            self._synced = True

    def iteration_completed(self, engine: Engine) -> None:
        self.schedule.step = engine.state.iteration
        if self.schedule.max_seconds is not None and distributed.is_distributed():
            self.schedule.agree(None)
            self.schedule.agree(distributed.all_reduce([self.schedule.seconds()], op="max")[0])
        if not self.schedule.finished() or engine.state.max_epochs == engine.state.epoch and self._epoch_end(engine):
            return
        if engine.state.iteration < self.schedule.total_steps:
            self.logger.info(
                f"time budget {self.schedule.max_seconds:.0f} s spent after {engine.state.iteration} of "
                f"{self.schedule.total_steps} steps."
            )
        # end with this epoch, so that EPOCH_COMPLETED still fires (epoch metrics, checkpoints), then COMPLETED
        engine.state.max_epochs = engine.state.epoch
        if not self._epoch_end(engine):
            engine.terminate_epoch()

    @staticmethod
    def _epoch_end(engine: Engine) -> bool:
        return engine.state.epoch_length is not None and engine.state.iteration % engine.state.epoch_length == 0

    def completed(self, engine: Engine) -> None:
        self.schedule.stop_clock()
