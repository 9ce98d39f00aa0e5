"""Ignite handlers around the Scribble2Label loss."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from monai.engines import IterationEvents
from monai.utils import min_version, optional_import

from s2l_monai.ensemble import EnsembleEvents, register_ensemble_events
from s2l_monai.errors import NonFiniteLossError
from s2l_monai.losses import ScribbleLoss
from s2l_monai.schedule import TrainingSchedule

Events, _ = optional_import("ignite.engine", "0.5", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.5", min_version, "Engine")

__all__ = ["EpochSummary", "FiniteGuard", "PseudoLabelDriftControl", "ScribbleLossHandler"]


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


class PseudoLabelDriftControl:
    """Hold the pseudo-labels' foreground share at its warm-up level by weighting the background of ``L_up``.

    Self-training feeds the network's own masks back as targets: where it over-segments a little, ``L_up`` teaches
    it to over-segment more, and the pseudo-labels' foreground (``ema_foreground``, the share of unscribbled
    pixels the average calls foreground with confidence) grows from one ensemble to the next (measured on DSB
    bright-field: +38% over the L_up phase, away from the true share; fluorescence +6%). This handler is an
    integral controller on that statistic: the last ensemble made before ``L_up`` switches on (the network
    trained on the scribbles alone) gives the reference share ``f_0``; after each later ensemble ``k`` with share
    ``f_k`` the background weight of ``L_up`` becomes

    ``w_k = clip(w_{k-1} * f_k / f_0, 1, max_weight)``,  ``w = 1`` before,

    and ``loss_function.pseudo_class_weights = [w_k, 1, ..., 1]``. Where the share stays put the loss is the
    paper's; where it grows the weight grows until it stops. Nothing but the run's own statistic is used (no
    masks, no flag to tune per dataset). Not in the paper; Ignite and MONAI have no such handler.

    Args:
        loss_function: the trainer's :class:`s2l_monai.losses.ScribbleLoss`.
        num_classes: number of classes (background first).
        max_weight: upper bound of the background weight.
        enabled: False leaves ``L_up`` as it is (the handler still attaches, so its state is in every checkpoint).
    """

    def __init__(
        self, loss_function: ScribbleLoss, num_classes: int = 2, max_weight: float = 4.0, enabled: bool = True
    ) -> None:
        if max_weight < 1.0:
            raise ValueError(f"max_weight must be >= 1, got {max_weight}.")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        self.loss_function = loss_function
        self.num_classes = int(num_classes)
        self.enabled = bool(enabled)
        self.max_weight = float(max_weight)
        self.reference: float | None = None
        self.weight = 1.0
        self.logger = logging.getLogger(self.__class__.__name__)

    def attach(self, engine: Engine) -> None:
        register_ensemble_events(engine)
        engine.add_event_handler(EnsembleEvents.ENSEMBLE_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        foreground = engine.state.metrics.get("ema_foreground")
        coverage = engine.state.metrics.get("ema_coverage")
        if not self.enabled or foreground is None or not coverage:
            return
        # the foreground's share of the pseudo-labelled pixels (of Omega_g): the class balance of L_up's targets,
        # which does not grow merely because the average becomes confident on more pixels
        share = float(foreground) / float(coverage)
        if not self.loss_function.pseudo_label_enabled or self.reference is None:
            self.reference, self.weight = share, 1.0
        elif self.reference > 0:
            self.weight = min(max(self.weight * share / self.reference, 1.0), self.max_weight)
        self._apply()
        engine.state.metrics["pseudo_background_weight"] = self.weight
        self.logger.info(
            f"step {engine.state.iteration}: foreground {100 * share:.2f}% of the pseudo-labelled pixels (reference "
            f"{100 * self.reference:.2f}%), L_up background weight {self.weight:.3f}"
        )

    def _apply(self) -> None:
        self.loss_function.pseudo_class_weights = [self.weight] + [1.0] * (self.num_classes - 1)

    def state_dict(self) -> dict:
        return {"reference": self.reference, "weight": self.weight}

    def load_state_dict(self, state: dict) -> None:
        self.reference = None if state.get("reference") is None else float(state["reference"])
        self.weight = float(state.get("weight", 1.0))
        if self.enabled and self.reference is not None:
            self._apply()


class FiniteGuard:
    """Stop training with a clear error when the loss or a weight becomes NaN or infinite.

    The loss is checked when it is computed (MONAI's ``IterationEvents.LOSS_COMPLETED``), before the backward pass,
    so the weights are still the last good ones; the weights are checked after every optimiser step. Either way
    a :class:`s2l_monai.errors.NonFiniteLossError` names the batch's items and the step; the checkpoints already on
    disk stay as they are and no model with non-finite weights is written (``model.pt`` is saved at completion only).

    Args:
        network: the trained network (its parameters are checked).
        id_keys: batch keys tried, in order, to name the batch's items.
    """

    def __init__(self, network: torch.nn.Module, id_keys: tuple[str, ...] = ("image", "id")) -> None:
        self.network = network
        self.id_keys = id_keys

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self.check_loss)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.check_weights)

    def _items(self, engine: Engine) -> str:
        batch = engine.state.batch
        if isinstance(batch, dict):
            for key in self.id_keys:
                names = batch.get(key)
                if isinstance(names, (list, tuple)) and names and isinstance(names[0], str):
                    unique = list(dict.fromkeys(str(n) for n in names))
                    return ", ".join(unique[:16]) + (f" and {len(unique) - 16} more" if len(unique) > 16 else "")
        return "(item names not in the batch)"

    def check_loss(self, engine: Engine) -> None:
        output = engine.state.output
        loss = output.get("loss") if isinstance(output, dict) else None
        if isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss.detach()).all()):
            terms = {k: float(v) for k, v in output.items() if k.startswith("loss_") and isinstance(v, (int, float))}
            raise NonFiniteLossError(
                f"the training loss is {float(loss.detach())} at step {engine.state.iteration} (epoch "
                f"{engine.state.epoch}; terms {terms}); batch items: {self._items(engine)}. The weights were not "
                "updated; the last epoch's checkpoint is kept. Check these images, or lower learning_rate."
            )

    def check_weights(self, engine: Engine) -> None:
        params = dict(self.network.named_parameters())
        # one reduction (one device sync) per step; the names are only looked up on failure
        if bool(torch.stack([torch.isfinite(p.detach()).all() for p in params.values()]).all()):
            return
        bad = [name for name, p in params.items() if not bool(torch.isfinite(p.detach()).all())]
        if bad:
            raise NonFiniteLossError(
                f"{len(bad)} weight tensor(s) became NaN or infinite at step {engine.state.iteration} (epoch "
                f"{engine.state.epoch}; first: {bad[0]}); batch items: {self._items(engine)}. Nothing was saved "
                "from this step; the last epoch's checkpoint is kept. Lower learning_rate."
            )


class EpochSummary:
    """One log line per epoch and one at the end, in place of Ignite's and StatsHandler's several.

    ``epoch 3/12 in 20.1 s, step 150/600: loss 0.412 (L_sp 0.301, L_up 0.222, L_crf 0.015); Omega_g 41.0% of
    unscribbled pixels; last ensemble 2.1 s`` — the epoch's means of the trainer metrics ``train_loss``,
    ``loss_sp``, ``loss_up``, ``loss_crf``, ``omega_g`` and the last ensemble's time, where present.
    At the end: steps, minutes, and where the model was written.

    Args:
        model_path: the final model file, named in the last line.
        schedule: the run's schedule, for the step budget (optional).
    """

    def __init__(self, model_path: str | None = None, schedule: TrainingSchedule | None = None) -> None:
        self.model_path = model_path
        self.schedule = schedule
        self.logger = logging.getLogger("s2l")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def epoch_completed(self, engine: Engine) -> None:
        m = engine.state.metrics
        steps = f"/{self.schedule.total_steps}" if self.schedule is not None else ""
        took = engine.state.times.get("EPOCH_COMPLETED")
        took = f" in {took:.1f} s" if took is not None else ""
        parts = [f"epoch {engine.state.epoch}/{engine.state.max_epochs}{took}, step {engine.state.iteration}{steps}:"]
        if "train_loss" in m:
            names = (("loss_sp", "L_sp"), ("loss_up", "L_up"), ("loss_crf", "L_crf"))
            # L_crf only where the CRF term is on (it is exactly 0 otherwise)
            terms = ", ".join(
                f"{name} {m[key]:.3f}" for key, name in names if key in m and (key != "loss_crf" or m[key])
            )
            parts.append(f"loss {m['train_loss']:.3f}" + (f" ({terms})" if terms else ""))
        if "omega_g" in m:
            parts.append(f"Omega_g {100 * m['omega_g']:.1f}% of unscribbled pixels")
        if "ensemble_seconds" in m:
            parts.append(f"last ensemble {m['ensemble_seconds']:.1f} s")
        self.logger.info(" ".join(parts[:1]) + " " + "; ".join(parts[1:]))

    def completed(self, engine: Engine) -> None:
        seconds = self.schedule.seconds() if self.schedule is not None else None
        took = f" in {seconds / 60:.1f} min of training" if seconds is not None else ""
        where = f"; model: {self.model_path}" if self.model_path else ""
        self.logger.info(f"training finished after {engine.state.iteration} steps{took}{where}")
