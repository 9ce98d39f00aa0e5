"""The prediction ensemble of Scribble2Label: a memory-mapped EMA store and the Ignite handler that updates it.

Paper, section 2 ("Self-generating pseudo-labels with consistency"): every ``gamma`` epochs the network predicts
every training image without augmentation and the running average ``y <- alpha * p + (1 - alpha) * y`` is
updated (``y_0 = p``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.utils import min_version, optional_import

from s2l_monai import distributed
from s2l_monai.faults import fault_point
from s2l_monai.figures import save_pseudo_label_figure
from s2l_monai.temporary_files import remove_stale_temporaries, temporary_tag
from s2l_monai.uncertainty import UncertaintyMaps, pixel_uncertainty

Events, _ = optional_import("ignite.engine", "0.5", min_version, "Events")
EventEnum, _ = optional_import("ignite.engine", "0.5", min_version, "EventEnum")
if TYPE_CHECKING:
    from ignite.engine import Engine
    from monai.engines import Evaluator
else:
    Engine, _ = optional_import("ignite.engine", "0.5", min_version, "Engine")
    Evaluator, _ = optional_import("monai.engines", name="Evaluator")

__all__ = ["EMAStore", "EMAEnsembleHandler", "EnsembleEvents", "ema_update"]

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def ema_update(previous: np.ndarray | None, prob: np.ndarray, alpha: float) -> np.ndarray:
    """One step of the prediction ensemble: ``y_n = alpha * p + (1 - alpha) * y_{n-1}``, ``y_0 = p``.

    Args:
        previous: the running average ``y_{n-1}`` (any shape), or None before the first ensemble.
        prob: the newest softmax prediction ``p``, same shape.
        alpha: weight of the newest prediction (paper: 0.2; 0.1 for MoNuSeg).

    Returns:
        the new average, float32.
    """
    prob = np.asarray(prob, dtype=np.float32)
    if previous is None:
        return prob
    return alpha * prob + (1.0 - alpha) * np.asarray(previous, dtype=np.float32)


class EMAStore:
    """Exponential-moving-average pseudo-label store, one memory-mapped file per training item.

    Each item (keyed by a stable id, e.g. from :func:`s2l_monai.data.datalist.load_datalist`) is a ``.npy`` file
    under ``root`` holding the averaged probabilities of classes ``1..C-1`` in the item's own frame, shape
    ``(C-1)HW`` (``(C-1)DHW`` for volumes); class 0 is ``1 - sum`` of the others, so a binary task stores one
    channel. Values are float16, or uint8 quantised to 1/255 (``dtype="uint8"``).

    Data-loader workers read the files memory-mapped, so they always see the values of the last ensemble and memory
    stays flat however large the dataset is. Writes go to a temporary file that atomically replaces the old one, so
    a reader never sees a half-written map. ``state_dict``/``load_state_dict`` let MONAI's ``CheckpointSaver`` and
    ``CheckpointLoader`` save and restore the store with the network.

    Volumes (3D items trained slice by slice, see :mod:`s2l_monai.volumes`): ONE ``(C-1)DHW`` float16 file per
    volume, ``D`` = the slices along ``slice_axis`` (stored slice-first, so a slice is contiguous on disk whatever
    the axis). :meth:`update_slice` folds one slice's prediction in, :meth:`probabilities` with ``slice_index``
    reads one slice through a memory map, and slices never ensembled hold NaN (read as "no pseudo-label", like a 2D
    item never ensembled). Crash consistency: during an ensemble the slice updates go into a temporary copy of the
    volume's file (:meth:`update_slice`), which replaces the file atomically only when the whole ensemble pass over
    that volume is done (:meth:`commit`, called by :class:`EMAEnsembleHandler`). A reader or a crash therefore sees
    the complete previous average or the complete new one, never a volume mixing ``y_n`` and ``y_{n+1}`` slices;
    an interrupted ensemble leaves only a hidden temporary file (ignored, removed by :meth:`abort`).

    File names: an id made only of letters, digits, ``_``, ``-`` and ``.`` that does not start with ``.`` is its own
    file name; any other id gets its unsafe characters replaced and a short hash of the id appended, so two ids
    never share a file and no file is hidden (hidden files are the store's temporary files). Temporary files left
    by a process that was killed are removed when a store is opened.

    Args:
        root: folder of the store (created if missing), e.g. ``<output_dir>/ema``.
        num_classes: number of classes ``C`` of the network output (>= 2).
        dtype: ``"float16"`` or ``"uint8"``.
        aliases: ``{old id: new id}`` for a store (or checkpoint) written under an older id rule
            (:func:`s2l_monai.data.datalist.legacy_aliases`): old files are renamed when the store opens, and
            :meth:`load_state_dict` maps old keys.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        num_classes: int = 2,
        dtype: str = "float16",
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        if dtype not in ("float16", "uint8"):
            raise ValueError(f"dtype must be 'float16' or 'uint8', got {dtype!r}.")
        self.root = Path(root)
        self.num_classes = int(num_classes)
        self.dtype = dtype
        self.root.mkdir(parents=True, exist_ok=True)
        self._pending: dict[str, tuple[Path, np.memmap | None]] = {}
        self._deferred = False  # between begin() and commit(): updates wait in temporary files
        #: the stored average ``CHW`` an item had before its last :meth:`update` / :meth:`update_slice` (None when it
        #: was the item's first), for the change term of :func:`s2l_monai.uncertainty.pixel_uncertainty`
        self.previous: np.ndarray | None = None
        meta = self.root / "store.json"
        if meta.exists():
            found = json.loads(meta.read_text())
            if found != self._meta():
                raise ValueError(
                    f"EMA store at {self.root} was made with {found}, not {self._meta()}; use another folder or "
                    "delete it."
                )
        else:
            self._atomic_write_text(meta, json.dumps(self._meta()))
        self._remove_stale_temporaries()
        self.aliases = {str(k): str(v) for k, v in (aliases or {}).items()}
        self._migrate()

    def _meta(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "dtype": self.dtype}

    def _remove_stale_temporaries(self) -> None:
        """Delete temporary files (``.<name>.<pid>-<host>.tmp*``) of this host's processes that no longer run."""
        remove_stale_temporaries(self.root)

    def _tmp_path(self, final: Path) -> Path:
        return final.with_name(f".{final.stem}.{temporary_tag()}.tmp.npy")

    def _migrate(self) -> None:
        """Rename files written under old ids (``aliases``) to their new ids' names."""
        moved = 0
        for old, new in self.aliases.items():
            for legacy in {self.root / f"{_SAFE.sub('_', old)}.npy", self.path(old)}:
                target = self.path(new)
                if legacy.exists() and legacy != target:
                    if not target.exists():
                        os.replace(legacy, target)
                        moved += 1
                    else:
                        legacy.unlink()
        if moved:
            logger = logging.getLogger(self.__class__.__name__)
            logger.info(f"EMA store {self.root}: {moved} item(s) renamed to new ids")

    def path(self, item_id: str) -> Path:
        """File of an item: its id, or for an id unsafe as a file name, a sanitised id plus a hash of it."""
        text = str(item_id)
        safe = _SAFE.sub("_", text)
        if safe != text or safe.startswith(".") or not safe:
            safe = f"{safe.lstrip('.') or 'item'}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:8]}"
        return self.root / f"{safe}.npy"

    def __contains__(self, item_id: object) -> bool:
        return self.path(str(item_id)).exists()

    def _files(self) -> list[Path]:
        """The committed item files (hidden temporary files excluded)."""
        return sorted(p for p in self.root.glob("*.npy") if not p.name.startswith("."))

    def ids(self) -> list[str]:
        """Ids (file stems) of the items stored so far."""
        return [p.stem for p in self._files()]

    def __len__(self) -> int:
        return len(self.ids())

    def _encode(self, fg: np.ndarray) -> np.ndarray:
        if self.dtype == "uint8":
            return np.clip(np.rint(fg * 255.0), 0, 255).astype(np.uint8)
        return fg.astype(np.float16)

    def _decode(self, stored: np.ndarray) -> np.ndarray:
        if stored.dtype == np.uint8:
            return stored.astype(np.float32) / 255.0
        return stored.astype(np.float32)

    def probabilities(self, item_id: str, slice_index: int | None = None) -> np.ndarray | None:
        """The averaged class probabilities ``CHW`` (float32) of an item, or None if it was never ensembled.

        Args:
            item_id: the item's id.
            slice_index: for a volume item, the slice to read (only that slice is read from the memory map);
                None for a 2D item (or a whole volume, ``CDHW``).
        """
        path = self.path(item_id)
        try:
            stored = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            return None
        if slice_index is not None:
            if stored.ndim != 4:
                raise ValueError(f"item {item_id!r} is not a volume (stored shape {stored.shape}); no slice to read")
            stored = np.asarray(stored[:, int(slice_index)])
            if stored.dtype == np.float16 and np.isnan(stored.flat[0]):
                return None  # this slice was never ensembled
        fg = self._decode(stored)
        return np.concatenate([1.0 - fg.sum(0, keepdims=True), fg], axis=0)

    def update_slice(
        self, item_id: str, slice_index: int, num_slices: int, prob: np.ndarray | torch.Tensor, alpha: float
    ) -> np.ndarray:
        """Fold a new prediction of one slice of a volume item into the item's ``(C-1)DHW`` average.

        The update goes into a temporary copy of the volume's file, made on the first slice of an ensemble; the copy
        replaces the file at :meth:`commit` (see the class notes on crash consistency). A slice never ensembled
        before starts the average (``y_0 = p``).

        Args:
            item_id: the volume's stable id.
            slice_index: the slice, ``0 <= slice_index < num_slices``.
            num_slices: number of slices ``D`` of the volume along its slice axis.
            prob: softmax probabilities ``CHW`` of the slice, in its own un-augmented frame.
            alpha: weight of the new prediction.

        Returns:
            the slice's new averaged probabilities ``CHW`` as stored (after float16 rounding), float32.

        Raises:
            ValueError: a store of dtype uint8 (volumes need float16, whose NaN marks slices never ensembled), a
                wrong channel count, or a shape different from the stored volume.
        """
        if self.dtype != "float16":
            raise ValueError("volume items need an EMAStore with dtype='float16' (NaN marks unensembled slices).")
        if isinstance(prob, torch.Tensor):
            prob = prob.detach().float().cpu().numpy()
        if prob.shape[0] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} class channels, got shape {prob.shape} for {item_id!r}.")
        shape = (self.num_classes - 1, int(num_slices), *prob.shape[1:])
        k = int(slice_index)
        if not 0 <= k < shape[1]:
            raise ValueError(f"slice {k} outside 0..{shape[1] - 1} of {item_id!r}")
        work = self._open_pending(str(item_id), shape)
        previous = work[:, k].astype(np.float32)
        first = bool(np.isnan(previous.flat[0]))
        self.previous = None if first else np.concatenate([1.0 - previous.sum(0, keepdims=True), previous], axis=0)
        average = ema_update(None if first else previous, prob[1:], alpha)
        stored = self._encode(average)
        work[:, k] = stored
        fg = self._decode(stored)
        return np.concatenate([1.0 - fg.sum(0, keepdims=True), fg], axis=0)

    def _open_pending(self, item_id: str, shape: tuple[int, ...]) -> np.memmap:
        if item_id in self._pending:
            tmp, work = self._pending[item_id]
            if work is None:  # released earlier in this ensemble: map it again
                work = np.load(tmp, mmap_mode="r+")
                self._pending[item_id] = (tmp, work)
            if work.shape != shape:
                raise ValueError(f"item {item_id!r} changed shape within an ensemble: {work.shape} vs {shape}.")
            return work
        final = self.path(item_id)
        tmp = self._tmp_path(final)
        if final.exists():
            found = np.load(final, mmap_mode="r")
            if found.shape != shape:
                raise ValueError(f"item {item_id!r} changed shape: stored {found.shape}, new {shape}.")
            del found
            shutil.copyfile(final, tmp)
            work = np.load(tmp, mmap_mode="r+")
        else:
            work = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
            for k in range(shape[1]):  # slice by slice: no whole-volume array in memory
                work[:, k] = np.nan
        self._pending[item_id] = (tmp, work)
        return work

    def begin(self) -> None:
        """Start an ensemble: from now until :meth:`commit`, :meth:`update` writes to temporary files too, so the
        whole ensemble is published at once (a crash or a failed rank leaves the complete previous averages)."""
        self.abort()
        self._deferred = True

    def release(self, item_id: str | None = None) -> None:
        """Flush and unmap the pending file(s) of a volume whose slices are done (they stay pending)."""
        for key in [item_id] if item_id is not None else list(self._pending):
            if key in self._pending and self._pending[key][1] is not None:
                tmp, work = self._pending[key]
                work.flush()  # type: ignore[union-attr]
                del work
                self._pending[key] = (tmp, None)

    def commit(self, item_id: str | None = None) -> None:
        """Atomically publish the pending update(s) of the current ensemble (all of them by default, which also
        ends the ensemble started by :meth:`begin`)."""
        self.release(item_id)
        for key in [item_id] if item_id is not None else list(self._pending):
            if key not in self._pending:
                continue
            tmp, _ = self._pending.pop(key)
            os.replace(tmp, self.path(key))
        if item_id is None:
            self._deferred = False

    def abort(self) -> None:
        """Discard the pending updates (an ensemble that failed): the stored averages stay as they were."""
        for tmp, work in self._pending.values():
            del work
            tmp.unlink(missing_ok=True)
        self._pending.clear()
        self._deferred = False

    def update(self, item_id: str, prob: np.ndarray | torch.Tensor, alpha: float) -> np.ndarray:
        """Fold a new prediction into an item's average (:func:`ema_update`) and write it atomically.

        Args:
            item_id: the item's stable id.
            prob: softmax probabilities ``CHW`` (or ``CDHW``) in the item's own, un-augmented frame.
            alpha: weight of the new prediction.

        Returns:
            the new averaged probabilities ``CHW`` as stored (after float16/uint8 rounding), float32.
        """
        if isinstance(prob, torch.Tensor):
            prob = prob.detach().float().cpu().numpy()
        if prob.shape[0] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} class channels, got shape {prob.shape} for {item_id!r}.")
        previous = self.probabilities(item_id)
        if previous is not None and previous.shape != prob.shape:
            raise ValueError(f"item {item_id!r} changed shape: stored {previous.shape}, new {prob.shape}.")
        self.previous = previous
        average = ema_update(None if previous is None else previous[1:], prob[1:], alpha)
        stored = self._encode(average)
        if self._deferred:
            tmp = self._tmp_path(self.path(item_id))
            np.save(tmp, stored)
            self._pending[str(item_id)] = (tmp, None)
        else:
            self._atomic_save(self.path(item_id), stored)
        fg = self._decode(stored)
        return np.concatenate([1.0 - fg.sum(0, keepdims=True), fg], axis=0)

    def clear(self) -> None:
        """Remove every stored item."""
        self.abort()
        for p in self._files():
            p.unlink()

    def state_dict(self) -> dict[str, Any]:
        """Every stored map as a tensor, for a checkpoint."""
        items = {p.stem: torch.from_numpy(np.load(p)) for p in self._files()}
        return {**self._meta(), "items": items}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace the store's contents with a checkpoint's (under ``torchrun``: rank 0 writes, all ranks wait)."""
        if int(state_dict["num_classes"]) != self.num_classes:
            raise ValueError(f"checkpoint store has {state_dict['num_classes']} classes, this one {self.num_classes}.")
        if distributed.is_main_process():
            self._load_items(state_dict)
        distributed.barrier()

    def _load_items(self, state_dict: Mapping[str, Any]) -> None:
        self.clear()
        for stem, value in state_dict["items"].items():
            array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            if state_dict.get("dtype", self.dtype) != self.dtype:
                array = self._encode(self._decode(array))
            new = self.aliases.get(stem) or {_SAFE.sub("_", k): v for k, v in self.aliases.items()}.get(stem)
            target = self.path(new) if new is not None else self.root / f"{stem}.npy"
            self._atomic_save(target, array)

    @staticmethod
    def _atomic_save(path: Path, array: np.ndarray) -> None:
        tmp = path.with_name(f".{path.stem}.{temporary_tag()}.tmp.npy")
        np.save(tmp, array)
        os.replace(tmp, path)

    @staticmethod
    def _atomic_write_text(path: Path, text: str) -> None:
        tmp = path.with_name(f".{path.name}.{temporary_tag()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


class EnsembleEvents(EventEnum):
    """Ignite event the trainer fires when :class:`EMAEnsembleHandler` has published an ensemble.

    Its statistics (``ema_coverage``, ``ema_foreground``, ``ensemble_seconds``) are in ``engine.state.metrics``
    by then; :class:`s2l_monai.handlers.PseudoLabelDriftControl` listens to it.
    """

    ENSEMBLE_COMPLETED = "ensemble_completed"


class EMAEnsembleHandler:
    """Ignite handler that runs the Scribble2Label prediction ensemble every ``every`` epochs, or on a schedule.

    Modelled on MONAI's ``ValidationHandler``: without a ``schedule``, :meth:`attach` registers it on the trainer at
    ``EPOCH_COMPLETED(every=every)``, from the first epoch on (warm-up included, so the average is ready when
    ``L_up`` switches on). With a :class:`s2l_monai.schedule.TrainingSchedule` (the bundle's default) it checks
    after every iteration whether the next ensemble point of the schedule is reached, and takes ``alpha`` from it.
    Each run drives ``evaluator`` (a MONAI ``SupervisedEvaluator`` over every training item,
    without augmentation, usually with a ``SlidingWindowInferer``; it puts the network in eval mode and disables
    gradients) and folds each softmax prediction into ``store``. Afterwards the network is put back in train mode.

    It logs, and puts into the trainer's ``state.metrics``, ``ema_coverage`` (share of unscribbled pixels whose
    averaged prediction passes ``tau``), ``ema_foreground`` (share of unscribbled pixels whose average passes
    ``tau`` for a class other than background: the pseudo-labels' foreground, to compare with the share of the
    image one expects the objects to cover; a share that grows from one ensemble to the next is the network
    learning its own over-segmentation) and ``ensemble_seconds``. For the first ``num_figures`` items it saves a
    picture per ensemble under ``figure_dir`` (see :func:`s2l_monai.figures.pseudo_label_figure`). With
    ``uncertainty`` it also writes each item's uncertainty map and the per-item summary that ``s2l suggest`` ranks
    (:mod:`s2l_monai.uncertainty`; computed from the prediction and the averages, no extra network pass).

    Under ``torchrun`` each rank predicts its share of the items (the evaluator's loader has a
    :class:`s2l_monai.distributed.ShardSampler`) into the shared store; the ensemble is published when every rank
    is done (:meth:`EMAStore.begin` / :meth:`EMAStore.commit` around a barrier), the statistics are reduced over the
    ranks and rank 0 draws the figures.

    Args:
        evaluator: the engine that predicts the un-augmented training items; its batches must carry ``id_key``
            and ``scribble_key``, its output ``"pred"`` logits ``BCHW``.
        store: where the averages live.
        every: ensemble interval ``gamma`` in epochs (paper: 5).
        alpha: EMA weight of the newest prediction (paper: 0.2).
        tau: consistency threshold, for the coverage statistic and the figures.
        unlabelled: scribble value of unlabelled pixels.
        id_key: key of the item id in the evaluator's batches.
        image_key: key of the image, used for the figures.
        scribble_key: key of the scribbles.
        slice_key: key of the slice index of a volume item (:func:`s2l_monai.volumes.slice_items`); batches without
            it are 2D items. A volume's slices update its one store entry (:meth:`EMAStore.update_slice`), which is
            unmapped when the evaluator moves on to another volume and published with the rest of the ensemble.
        num_slices_key: key of the volume's slice count.
        figure_dir: folder for the figures; None for none.
        num_figures: how many items get a figure.
        schedule: the run's schedule; replaces ``every`` and ``alpha``.
        uncertainty: where the uncertainty maps go; None for none.
    """

    def __init__(
        self,
        evaluator: Evaluator,
        store: EMAStore,
        every: int = 5,
        alpha: float = 0.2,
        tau: float = 0.8,
        unlabelled: int = 255,
        id_key: str = "id",
        image_key: str = "image",
        scribble_key: str = "scribble",
        figure_dir: str | os.PathLike | None = None,
        num_figures: int = 4,
        slice_key: str = "slice",
        num_slices_key: str = "num_slices",
        schedule: Any = None,
        uncertainty: UncertaintyMaps | None = None,
    ) -> None:
        if schedule is not None:
            every, alpha = 1, schedule.ema_alpha
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}.")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}.")
        self.evaluator = evaluator
        self.store = store
        self.schedule = schedule
        self.uncertainty = uncertainty
        self.every = int(every)
        self.alpha = float(alpha)
        self.tau = float(tau)
        self.unlabelled = int(unlabelled)
        self.id_key, self.image_key, self.scribble_key = id_key, image_key, scribble_key
        self.slice_key, self.num_slices_key = slice_key, num_slices_key
        self._volume: str | None = None
        self.figure_dir = None if figure_dir is None else Path(figure_dir)
        self.num_figures = int(num_figures)
        self.logger = logging.getLogger(self.__class__.__name__)
        self.epochs_run: list[int] = []
        self._epoch = 0
        self._passed = 0
        self._passed_foreground = 0
        self._unlabelled_total = 0
        self._seen = 0
        evaluator.add_event_handler(Events.ITERATION_COMPLETED, self._update_batch)

    def attach(self, engine: Engine) -> None:
        """Run the ensemble at the end of every ``every``-th epoch of ``engine``, or at the schedule's points."""
        register_ensemble_events(engine)
        if self.schedule is None:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every), self)
        else:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._maybe_run)

    def _maybe_run(self, engine: Engine) -> None:
        if self.schedule.ensemble_due(engine.state.iteration):
            progress = self.schedule.progress(engine.state.iteration)
            self(engine)
            # one ensemble per reached point; points skipped by a slow step (time budget) are not made up for
            self.schedule.ensembles_done = sum(p <= progress + 1e-9 for p in self.schedule.ensemble_points)

    def __call__(self, engine: Engine) -> None:
        start = time.perf_counter()
        self._epoch = engine.state.epoch
        self._passed = self._passed_foreground = self._unlabelled_total = self._seen = 0
        self._volume = None
        self.store.begin()
        if self.uncertainty is not None:
            self.uncertainty.begin()
        try:
            self.evaluator.run(engine.state.epoch)
            self.store.release()
            # under torchrun every rank predicted its own share (ShardSampler); nothing is published before all of
            # them are done, so a rank that fails leaves every rank's previous averages in place
            distributed.barrier()
        except BaseException:
            self.store.abort()
            if self.uncertainty is not None:
                self.uncertainty.abort()
            raise
        self.store.commit()
        if self.uncertainty is not None:
            self.uncertainty.commit(engine.state.epoch, engine.state.iteration)
        seen, passed, foreground, total = distributed.all_reduce(
            [self._seen, self._passed, self._passed_foreground, self._unlabelled_total])
        distributed.barrier()  # every rank's averages are in place before any rank trains on them
        network = getattr(engine, "network", None)
        if network is not None:
            network.train()
        self._seen = int(seen)
        seconds = distributed.all_reduce([time.perf_counter() - start], op="max")[0]
        coverage = passed / total if total else 0.0
        foreground_share = foreground / total if total else 0.0
        engine.state.metrics["ema_coverage"] = coverage
        engine.state.metrics["ema_foreground"] = foreground_share
        engine.state.metrics["ensemble_seconds"] = seconds
        self.epochs_run.append(engine.state.epoch)
        self.logger.info(
            f"Epoch {engine.state.epoch}, step {engine.state.iteration}: ensemble of {self._seen} items in "
            f"{seconds:.1f} s; "
            f"{100 * coverage:.1f}% of unscribbled pixels pass tau={self.tau}, {100 * foreground_share:.1f}% as "
            f"foreground"
        )
        if engine.has_registered_events(EnsembleEvents.ENSEMBLE_COMPLETED):
            engine.fire_event(EnsembleEvents.ENSEMBLE_COMPLETED)

    def _update_batch(self, evaluator: Engine) -> None:
        batch, output = evaluator.state.batch, evaluator.state.output
        if isinstance(output, (list, tuple)):  # decollated output
            preds = [o["pred"] for o in output]
            batch_items = list(batch)
        else:
            preds = list(output["pred"])
            wanted = (self.id_key, self.image_key, self.scribble_key, self.slice_key, self.num_slices_key)
            batch_items = [{k: v[i] for k, v in batch.items() if k in wanted} for i in range(len(preds))]
        for item, logits in zip(batch_items, preds):
            item_id = str(item[self.id_key])
            prob = torch.softmax(logits.detach().float(), dim=0).cpu().numpy()
            slice_index = item.get(self.slice_key)
            k = None if slice_index is None else int(slice_index)
            if k is None:
                average = self.store.update(item_id, prob, self.alpha)
                name = item_id
            else:
                if self._volume is not None and self._volume != item_id:
                    self.store.release(self._volume)  # slice items come grouped by volume: unmap the finished one
                self._volume = item_id
                average = self.store.update_slice(item_id, k, int(item[self.num_slices_key]), prob, self.alpha)
                name = f"{item_id}_z{k:04d}"
            fault_point("ensemble_item")
            scribble = np.asarray(item[self.scribble_key].detach().cpu())[0]
            unlabelled = scribble == self.unlabelled
            self._passed += int(((average.max(0) > self.tau) & unlabelled).sum())
            self._passed_foreground += int(((average[1:].max(0) > self.tau) & unlabelled).sum())
            self._unlabelled_total += int(unlabelled.sum())
            uncertainty = None
            if self.uncertainty is not None:
                uncertainty = pixel_uncertainty(average, self.store.previous, prob, scribbled=~unlabelled)
                num_slices = None if k is None else int(item[self.num_slices_key])
                self.uncertainty.add(item_id, uncertainty, unlabelled, k, num_slices)
            if self.figure_dir is not None and self._seen < self.num_figures and distributed.is_main_process():
                image = np.asarray(item[self.image_key].detach().cpu())
                save_pseudo_label_figure(
                    self.figure_dir / f"{_SAFE.sub('_', name)}_epoch{self._epoch:04d}.png",
                    image, scribble, average, tau=self.tau, unlabelled=self.unlabelled, uncertainty=uncertainty,
                )
            self._seen += 1


def register_ensemble_events(engine: Engine) -> None:
    """Register :class:`EnsembleEvents` on ``engine`` once (Ignite's ``register_events`` does not check)."""
    if not engine.has_registered_events(EnsembleEvents.ENSEMBLE_COMPLETED):
        engine.register_events(*EnsembleEvents)
