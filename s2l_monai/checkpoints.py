"""Checkpoints a run can be resumed from exactly: atomic files, random states, retention across resumes.

MONAI's ``CheckpointSaver`` writes in place (``DiskSaver(atomic=False)``, for file permissions on shared servers),
so a kill during a write leaves a truncated newest checkpoint, and its ``n_saved`` only counts the files of the
current process, so every resumed attempt leaves its own ``checkpoint_epoch=N.pt`` behind. Neither saves the
random states a resumed run needs to draw the same batches and augmentations as the uninterrupted one.
:class:`ResumeCheckpointer` does these three things; MONAI's ``CheckpointLoader`` still loads the files.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.transforms import Compose, Randomizable
from monai.utils import min_version, optional_import

from s2l_monai.faults import FAULT_ENV, fault_point

Events, _ = optional_import("ignite.engine", "0.5", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.5", min_version, "Engine")

__all__ = [
    "CHECKPOINT_PATTERN",
    "RandomStates",
    "ResumeCheckpointer",
    "TimedSnapshots",
    "latest_checkpoint",
    "resolve_resume",
    "run_or_finish",
]

#: File names of the per-epoch checkpoints; the group is the epoch.
CHECKPOINT_PATTERN = re.compile(r"^checkpoint_epoch=(\d+)\.pt$")
logger = logging.getLogger(__name__)


def _numpy_state(state: tuple[Any, ...]) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_tuple(state: Mapping[str, Any]) -> tuple[Any, ...]:
    keys = np.asarray(state["keys"].numpy() if isinstance(state["keys"], torch.Tensor) else state["keys"], np.uint32)
    return (state["name"], keys, int(state["pos"]), int(state["has_gauss"]), float(state["cached"]))


def _randomizables(transform: Any) -> list[Randomizable]:
    """Every ``Randomizable`` of a (nested) ``Compose``, with the randomizable members of each transform."""
    out: list[Randomizable] = []
    stack = [transform]
    seen: set[int] = set()
    while stack:
        t = stack.pop(0)
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        if isinstance(t, Compose):
            stack = list(t.transforms) + stack
            continue
        if isinstance(t, Randomizable):
            out.append(t)
        members = vars(t).values() if hasattr(t, "__dict__") else ()
        stack += [v for v in members if isinstance(v, (Randomizable, Compose))]
    return out


class RandomStates:
    """The random states a run draws from, as a checkpointable object (``state_dict`` / ``load_state_dict``).

    Python's and NumPy's global generators, torch's CPU (and CUDA) generator, and the generator of every random
    transform of ``transforms``. Restored when a checkpoint is loaded. The training batches, crops and augmentations
    do not depend on these: :mod:`s2l_monai.data.seeding` derives them from the run's seed and the epoch, in the
    (persistent) data-loader workers too, so the resumed epoch draws what the uninterrupted run drew.

    Args:
        transforms: the training ``Compose`` (or None).
    """

    def __init__(self, transforms: Any = None) -> None:
        self.transforms = transforms

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        state: dict[str, Any] = {
            "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                       "gauss": gauss},
            "numpy": _numpy_state(np.random.get_state()),
            "torch": torch.get_rng_state(),
            "transforms": [_numpy_state(t.R.get_state()) for t in _randomizables(self.transforms)],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(x) for x in py["internal"].tolist()), py["gauss"]))
        np.random.set_state(_numpy_tuple(state["numpy"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        found = _randomizables(self.transforms)
        if len(found) == len(state["transforms"]):
            for t, s in zip(found, state["transforms"]):
                t.R.set_state(_numpy_tuple(s))
        elif state["transforms"]:
            logger.warning("the random transforms differ from the checkpoint's; their states are not restored")


def _epoch_checkpoints(folder: Path) -> list[Path]:
    """The per-epoch checkpoints in ``folder``, oldest epoch first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The per-epoch checkpoint with the highest epoch in ``ckpt_dir`` (None if there is none)."""
    found = _epoch_checkpoints(Path(ckpt_dir))
    return found[-1] if found else None


def resolve_resume(resume_from: str | os.PathLike | None, ckpt_dir: str | os.PathLike) -> str:
    """The checkpoint to resume from: ``""`` (none), a path, or ``"latest"`` (newest in ``ckpt_dir``, if any).

    Raises:
        FileNotFoundError: a path that does not exist.
    """
    text = "" if resume_from is None else str(resume_from).strip()
    if text.lower() in ("", "none", "null", "false"):
        return ""
    if text.lower() == "latest":
        path = latest_checkpoint(ckpt_dir)
        if path is None:
            logger.info(f"resume_from=latest: no checkpoint in {ckpt_dir}; starting a new run")
            return ""
        logger.info(f"resume_from=latest: resuming from {path}")
        return str(path)
    if not Path(text).is_file():
        raise FileNotFoundError(f"resume_from: {text} does not exist")
    return text


class ResumeCheckpointer:
    """Write a full checkpoint after every epoch, atomically, keeping the newest ``keep`` across resumes.

    Each file is written to a hidden temporary name in ``save_dir`` and renamed over its final name, so a kill
    leaves either the previous file or the new one, never a truncated one; temporary files of killed runs are
    removed at start. After a save, older ``checkpoint_epoch=N.pt`` files in ``save_dir`` beyond the newest
    ``keep`` are deleted, whichever run wrote them. At completion the last state is also written as
    ``final_filename``. Load with MONAI's ``CheckpointLoader`` (same keys as ``save_dict``).

    Args:
        save_dir: folder of the checkpoints.
        save_dict: name -> object with ``state_dict()`` (network, optimizer, trainer, EMA store, ...).
        keep: per-epoch checkpoints kept (>= 1).
        final_filename: name of the checkpoint written at completion; None for none.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        keep: int = 2,
        final_filename: str | None = "checkpoint_final.pt",
    ) -> None:
        if int(keep) < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.keep = int(keep)
        self.final_filename = final_filename

    def attach(self, engine: Engine) -> None:
        self.save_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.save_dir.glob(".*.pt.tmp*"):
            stale.unlink(missing_ok=True)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        if os.environ.get(FAULT_ENV):
            engine.add_event_handler(Events.ITERATION_COMPLETED, lambda _: fault_point("step"))
        if self.final_filename:
            engine.add_event_handler(Events.COMPLETED, self.completed)

    def _state(self) -> dict[str, Any]:
        return {name: obj.state_dict() for name, obj in self.save_dict.items()}

    def save(self, filename: str) -> Path:
        """Write the checkpoint ``save_dir / filename`` atomically."""
        path = self.save_dir / filename
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(self._state(), f)
                f.flush()
                os.fsync(f.fileno())
            fault_point("checkpoint_write")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def epoch_completed(self, engine: Engine) -> None:
        self.save(f"checkpoint_epoch={engine.state.epoch}.pt")
        for old in _epoch_checkpoints(self.save_dir)[: -self.keep]:
            old.unlink(missing_ok=True)

    def completed(self, engine: Engine) -> None:
        if self.final_filename:
            self.save(self.final_filename)


def match_epoch_length(trainer: Engine, schedule: Any) -> None:
    """After a resume: fit the checkpoint's epoch length to this run's data loader.

    An epoch's length depends on the number of processes (``torchrun`` shares the batches out), so a run resumed
    on another number of them loads an epoch length its loader does not have; Ignite would then wrap the loader
    mid-epoch. The optimiser steps done are kept (the schedule counts in steps) and the epoch is recomputed.

    Args:
        trainer: the trainer, its state loaded from the checkpoint.
        schedule: the run's :class:`s2l_monai.schedule.TrainingSchedule` (``steps_per_epoch`` of this loader).
    """
    state = trainer.state
    new = int(schedule.steps_per_epoch)
    if state.epoch_length in (None, new):
        return
    logger.info(
        f"resumed checkpoint had {state.epoch_length} steps per epoch, this run {new} (another number of "
        f"processes): step {state.iteration} kept, epoch {state.epoch} -> {state.iteration // new}"
    )
    state.epoch_length = new
    state.epoch = state.iteration // new
    state.max_epochs = max(int(schedule.max_epochs), state.epoch)


def run_or_finish(trainer: Engine) -> None:
    """Run the trainer; if a resumed checkpoint already holds the whole run, only write its final files.

    A run killed after its last epoch's checkpoint (e.g. while writing ``checkpoint_final.pt``) resumes from a state
    in which every epoch is done; Ignite would then start a new run from epoch 0 on the trained weights. Here the
    ``COMPLETED`` handlers (final checkpoint, ``model.pt``, the summary line) run instead, so the result is the
    uninterrupted run's.
    """
    state = trainer.state
    done = state.max_epochs is not None and state.epoch >= state.max_epochs and state.iteration > 0
    if not done:
        trainer.run()
        return
    logger.info(f"the resumed checkpoint holds the finished run (epoch {state.epoch}): writing its final files")
    trainer.fire_event(Events.COMPLETED)


class TimedSnapshots:
    """Save the network's weights when the training clock passes given minutes (for learning curves).

    At every step the schedule's training time (this process plus the ones before it, ensembles included) is read;
    each target in ``minutes`` that has been passed gets ``<save_dir>/model_<minutes>min.pt`` (a ``model.pt``-style
    state dict, written atomically) and a line in ``<save_dir>/snapshots.json`` (minutes asked, seconds and step
    reached). ``benchmarks/learning_curve.py`` evaluates them on the test split.

    Args:
        network: the trained network.
        schedule: the run's :class:`s2l_monai.schedule.TrainingSchedule` (its clock).
        minutes: training times in minutes, any order.
        save_dir: output folder.
    """

    def __init__(self, network: torch.nn.Module, schedule: Any, minutes: Any, save_dir: str | os.PathLike) -> None:
        self.network = network
        self.schedule = schedule
        self.minutes = sorted(float(m) for m in (minutes or []))
        self.save_dir = Path(save_dir)
        self.saved: list[dict[str, float]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)

    def iteration_completed(self, engine: Engine) -> None:
        seconds = self.schedule.seconds()
        while self.minutes and seconds >= self.minutes[0] * 60.0:
            target = self.minutes.pop(0)
            self.save_dir.mkdir(parents=True, exist_ok=True)
            path = self.save_dir / f"model_{target:g}min.pt"
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            torch.save(self.network.state_dict(), tmp)
            os.replace(tmp, path)
            self.saved.append({"minutes": target, "seconds": round(seconds, 2), "step": engine.state.iteration})
            (self.save_dir / "snapshots.json").write_text(json.dumps(self.saved, indent=1))
            logger.info(f"snapshot at {seconds / 60:.2f} min of training (step {engine.state.iteration}): {path}")
