"""Ignite handlers around the Scribble2Label loss."""

from __future__ import annotations

from typing import TYPE_CHECKING

from monai.engines import IterationEvents
from monai.utils import min_version, optional_import

from s2l_monai.losses import ScribbleLoss
from s2l_monai.schedule import TrainingSchedule

Events, _ = optional_import("ignite.engine", "0.5", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.5", min_version, "Engine")

__all__ = ["ScribbleLossHandler"]


class ScribbleLossHandler:
    """Switch the pseudo-label term on after warm-up and publish the loss terms.

    With a ``schedule`` (:class:`s2l_monai.schedule.TrainingSchedule`, the bundle's default), at every
    ``ITERATION_STARTED`` it sets ``loss_function.pseudo_label_enabled`` to "the warm-up share of the run has passed".
    Without one, at every ``EPOCH_STARTED`` it sets it to ``epoch > warmup_epochs`` (Ignite counts epochs from 1, so
    epochs ``1..warmup_epochs`` are the paper's warm-up ``0..E_W-1``). After every
    loss computation (MONAI's ``IterationEvents.LOSS_COMPLETED``) it copies ``loss_sp``, ``loss_up`` and
    ``omega_g`` into ``engine.state.output``, where ``StatsHandler``, ``TensorBoardStatsHandler`` and Ignite
    metrics see them.

    Args:
        loss_function: the trainer's loss.
        warmup_epochs: number of epochs with the scribble loss only (paper: 100); used without a schedule.
        schedule: the run's schedule; its warm-up share replaces ``warmup_epochs``.
    """

    def __init__(
        self, loss_function: ScribbleLoss, warmup_epochs: int = 100, schedule: TrainingSchedule | None = None
    ) -> None:
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}.")
        self.loss_function = loss_function
        self.warmup_epochs = int(warmup_epochs)
        self.schedule = schedule

    def attach(self, engine: Engine) -> None:
        if self.schedule is None:
            engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        else:
            engine.add_event_handler(Events.ITERATION_STARTED, self.iteration_started)
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self.loss_completed)

    def epoch_started(self, engine: Engine) -> None:
        self.loss_function.pseudo_label_enabled = engine.state.epoch > self.warmup_epochs

    def iteration_started(self, engine: Engine) -> None:
        # Ignite counts the step about to run in state.iteration already: L_up is on once the steps before it
        # (and the time spent) have passed the warm-up share
        self.loss_function.pseudo_label_enabled = not self.schedule.in_warmup(engine.state.iteration - 1)

    def loss_completed(self, engine: Engine) -> None:
        if isinstance(engine.state.output, dict):
            engine.state.output.update(self.loss_function.terms)
