"""Where the network is unsure, from what the prediction ensemble already computes (no extra network pass).

Every ensemble folds a new softmax prediction ``p`` into the running average ``y`` (paper, section 2). The same two
arrays tell where one more scribble would help most:

* **indecision** of the average: ``u_m = 1 - (y_(1) - y_(2))``, one minus the margin between its two most likely
  classes (binary: ``1 - |2 y_1 - 1|``); a pixel fails the paper's consistency test ``max_c y_c > tau`` exactly when
  ``u_m >= 2 (1 - tau)`` (binary);
* **change** since the previous ensemble: ``u_c = 1/2 sum_c |p_c - y_prev,c|``, the total-variation distance between
  the newest prediction and the average it is folded into (0 at the first ensemble).

The pixel's uncertainty is ``u = max(u_m, u_c)`` in ``[0, 1]``, 0 on scribbled pixels (their class is known). A pixel
is *uncertain* where ``u >= 2 (1 - tau)`` (0.4 for ``tau = 0.8``): for the binary task these are the pixels left out
of the pseudo-labels, plus those whose prediction still moves by that much.

:class:`UncertaintyMaps` keeps one uint8 map per training item (``u`` quantised to 1/255, read memory-mapped like
the EMA store: the 2D maps of one ensemble packed into one file, a volume's slices in one ``DHW`` file) and a summary,
``uncertainty.json``, that every ensemble rewrites atomically: per item (per slice of a volume) the mean ``u`` over
its unscribbled pixels and the share of them that are uncertain. ``s2l suggest`` (:mod:`s2l_monai.suggestions`)
ranks the images from it.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from s2l_monai import distributed
from s2l_monai.temporary_files import remove_stale_temporaries, temporary_tag

__all__ = ["UncertaintyMaps", "pixel_uncertainty", "read_map", "uncertain_threshold", "SUMMARY_NAME"]

SUMMARY_NAME = "uncertainty.json"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def uncertain_threshold(tau: float) -> float:
    """``2 (1 - tau)``: the uncertainty from which a binary pixel fails the consistency test ``max_c y_c > tau``."""
    return float(min(1.0, max(0.0, 2.0 * (1.0 - float(tau)))))


def pixel_uncertainty(
    average: np.ndarray,
    previous: np.ndarray | None = None,
    prob: np.ndarray | None = None,
    scribbled: np.ndarray | None = None,
) -> np.ndarray:
    """Per-pixel uncertainty ``u = max(u_m, u_c)`` of one item (see the module notes).

    Args:
        average: the new averaged probabilities ``y`` after the ensemble, ``CHW`` (C >= 2).
        previous: the average before it, ``y_prev`` (``CHW``), or None at the first ensemble (then ``u_c = 0``).
        prob: the newest prediction ``p`` (``CHW``); needed with ``previous``.
        scribbled: boolean ``HW``, True on scribbled pixels (their uncertainty is 0); None for none.

    Returns:
        float32 ``HW`` in ``[0, 1]``.
    """
    average = np.asarray(average, dtype=np.float32)
    binary = average.shape[0] == 2
    if binary:  # 1 - |y_1 - y_0| = 1 - |2 y_1 - 1|, on one channel
        u = np.abs(2.0 * average[1] - 1.0)
        np.subtract(1.0, u, out=u)
    else:
        top2 = np.partition(average, average.shape[0] - 2, axis=0)[-2:]
        u = 1.0 - (top2[1] - top2[0])
    if previous is not None and prob is not None:
        prob, previous = np.asarray(prob, dtype=np.float32), np.asarray(previous, dtype=np.float32)
        # total variation 1/2 sum_c |p_c - y_c|; for two classes both terms equal |p_1 - y_1|
        change = np.abs(prob[1] - previous[1]) if binary else 0.5 * np.abs(prob - previous).sum(0)
        np.maximum(u, change, out=u)
    np.clip(u, 0.0, 1.0, out=u)
    if scribbled is not None:
        u[np.asarray(scribbled, dtype=bool)] = 0.0
    return u


def _file_name(item_id: str) -> str:
    return f"{_SAFE.sub('_', str(item_id)).lstrip('.') or 'item'}.npy"


def read_map(folder: str | os.PathLike, entry: Mapping[str, Any]) -> np.ndarray:
    """One summary entry's map, uint8 ``HW`` (0 = certain, 255 = undecided), memory-mapped.

    Args:
        folder: the folder of the summary (``<output_dir>/uncertainty``); an entry's ``map_dir`` overrides it.
        entry: an item of ``uncertainty.json`` (``map``, ``shape``, and ``offset`` for a map packed with others, or
            ``slice`` for a slice of a volume's ``DHW`` file).
    """
    path = Path(entry.get("map_dir") or folder) / entry["map"]
    if entry.get("offset") is not None:
        return np.memmap(path, dtype=np.uint8, mode="r", offset=int(entry["offset"]), shape=tuple(entry["shape"]))
    stored = np.load(path, mmap_mode="r")
    return stored[int(entry["slice"])] if entry.get("slice") is not None else stored


class UncertaintyMaps:
    """The uncertainty maps of the training items and their per-item summary, rewritten by every ensemble.

    :class:`s2l_monai.ensemble.EMAEnsembleHandler` calls :meth:`add` for every item (or volume slice) it folds into
    the EMA store, then :meth:`commit` (or :meth:`abort` when the ensemble fails). The 2D maps of
    one ensemble go, one after the other, into one file ``root/maps_<n>.u8`` (each entry holds its ``offset`` and
    ``shape``; :func:`read_map`): one file write per ensemble instead of one per image (measured: a file per image
    added 8-9% to an ensemble). A volume's map is one ``.npy`` ``DHW`` file (slices not ensembled are 0). The summary
    goes to ``root/uncertainty.json``. Everything is written to temporary files published by atomic renames, the
    summary last (the pack of the previous summary is deleted only after it), so a reader (``s2l suggest``, a
    viewer) sees the complete previous ensemble or the complete new one.

    Args:
        root: folder of the maps, e.g. ``<output_dir>/uncertainty``.
        tau: the consistency threshold of the run (sets :func:`uncertain_threshold`).
        items: the training items (datalist dicts with ``id``, ``image``, ``scribble``, for volumes ``slice`` and
            ``num_slices``); their paths go into the summary so a suggestion can show the image.
        scribble_values: the scribble files' values (``background``, ``foreground``, ``unlabelled``), recorded for
            the pictures of ``s2l suggest``.
        slice_axis: the axis volumes are sliced along (None for 2D data), recorded likewise.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        tau: float = 0.8,
        items: Sequence[Mapping[str, Any]] | None = None,
        scribble_values: Mapping[str, Any] | None = None,
        slice_axis: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.tau = float(tau)
        self.threshold = uncertain_threshold(tau)
        self.paths = {
            str(it["id"]): {"image": str(it.get("image", "")), "scribble": str(it.get("scribble", ""))}
            for it in (items or []) if "id" in it
        }
        self.scribble_values = dict(scribble_values or {"background": 0, "foreground": 1, "unlabelled": 255})
        self.slice_axis = None if slice_axis in (None, "", "none", "None") else int(slice_axis)
        self._entries: list[dict[str, Any]] = []
        self._pending: dict[str, tuple[Path, np.ndarray]] = {}
        self._ready = False  # root created (on the first map: a run with the maps off leaves no folder)
        self._pack: tuple[str, Path, Any] | None = None  # (name, temporary path, open file) of this ensemble's maps
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        """Delete temporary files of processes that no longer run (an ensemble killed half-way)."""
        remove_stale_temporaries(self.root)

    def path(self, item_id: str) -> Path:
        """The map file of an item."""
        return self.root / _file_name(item_id)

    def add(
        self,
        item_id: str,
        uncertainty: np.ndarray,
        unlabelled: np.ndarray,
        slice_index: int | None = None,
        num_slices: int | None = None,
    ) -> None:
        """Record one item's (or one volume slice's) map ``HW`` and its summary entry.

        Args:
            item_id: the item's id (a volume's, for its slices).
            uncertainty: :func:`pixel_uncertainty`, float ``HW`` in ``[0, 1]``, 0 on the scribbled pixels.
            unlabelled: boolean ``HW``, True on unscribbled pixels (the summary counts those only).
            slice_index: the slice of a volume item, or None for a 2D item.
            num_slices: the volume's slice count (with ``slice_index``).
        """
        if not self._ready:
            self.root.mkdir(parents=True, exist_ok=True)
            self._ready = True
        uncertainty = np.asarray(uncertainty, dtype=np.float32)
        u8 = (uncertainty * 255.0 + 0.5).astype(np.uint8)  # u in [0, 1]: rounded to 1/255
        offset = None
        if slice_index is None:
            if self._pack is None:
                name = f"maps_{time.time_ns()}_r{distributed.rank()}.u8"
                tmp = self.root / f".{name}.{temporary_tag()}.tmp"
                self._pack = (name, tmp, open(tmp, "wb"))  # noqa: SIM115 - closed in commit() / abort()
            name, _, handle = self._pack
            offset = handle.tell()
            handle.write(np.ascontiguousarray(u8).tobytes())
        else:
            final = self.path(item_id)
            name = final.name
            work = self._volume_work(str(item_id), final, (int(num_slices), *u8.shape))
            work[int(slice_index)] = u8
        free = np.asarray(unlabelled, dtype=bool)
        n = int(np.count_nonzero(free))
        # sums over the unscribbled pixels only: u is 0 on the scribbled ones (and 0 is below any threshold > 0)
        total = float(uncertainty.sum(dtype=np.float64)) if n else 0.0
        uncertain = int(np.count_nonzero(uncertainty >= self.threshold)) if n and self.threshold > 0 else n
        self._entries.append({
            "id": str(item_id),
            "slice": None if slice_index is None else int(slice_index),
            **self.paths.get(str(item_id), {"image": "", "scribble": ""}),
            "map": name,
            "offset": offset,
            "shape": [int(s) for s in u8.shape],
            "unlabelled_pixels": n,
            "mean": round(total / n, 5) if n else 0.0,
            "uncertain_share": round(uncertain / n, 5) if n else 0.0,
        })

    def _volume_work(self, item_id: str, final: Path, shape: tuple[int, ...]) -> np.ndarray:
        if item_id in self._pending:
            return self._pending[item_id][1]
        tmp = final.with_name(f".{final.stem}.{temporary_tag()}.tmp.npy")
        work = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        if final.exists():
            old = np.load(final, mmap_mode="r")
            if old.shape == shape:
                for k in range(shape[0]):  # slice by slice: no whole volume in memory
                    work[k] = old[k]
            del old
        self._pending[item_id] = (tmp, work)
        return work

    def commit(self, epoch: int | None = None, step: int | None = None) -> Path:
        """Publish the maps of this ensemble and rewrite the summary; returns the summary's path.

        Under ``torchrun`` each rank publishes the maps of its share; rank 0 gathers every rank's entries, writes
        the one summary (in the items' order) and deletes the packs it no longer refers to.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        pack = None
        if self._pack is not None:
            pack, tmp, handle = self._pack
            handle.close()
            os.replace(tmp, self.root / pack)
            self._pack = None
        for key, (tmp, work) in list(self._pending.items()):
            if isinstance(work, np.memmap):
                work.flush()
            del work
            os.replace(tmp, self.path(key))
        self._pending.clear()
        gathered = distributed.all_gather_objects((self._entries, pack))
        self._entries = []
        out = self.root / SUMMARY_NAME
        if not distributed.is_main_process():
            return out
        entries = [e for rank_entries, _ in gathered for e in rank_entries]
        if len(gathered) > 1:  # back into the items' order (volumes: by slice)
            order = {key: i for i, key in enumerate(self.paths)}
            entries.sort(key=lambda e: (order.get(e["id"], len(order)), -1 if e["slice"] is None else e["slice"]))
        packs = {p for _, p in gathered if p is not None}
        summary = {
            "epoch": epoch,
            "step": step,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tau": self.tau,
            "threshold": self.threshold,
            "definition": "u = max(1 - margin of the EMA average, total-variation change since the previous "
                          "ensemble); 0 on scribbled pixels; uncertain where u >= threshold = 2 (1 - tau)",
            "scribble_values": self.scribble_values,
            "slice_axis": self.slice_axis,
            "items": entries,
        }
        tmp = out.with_name(f".{out.name}.{temporary_tag()}.tmp")
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, out)
        for old in self.root.glob("maps_*.u8"):  # the packs no summary refers to any more
            if old.name not in packs:
                old.unlink(missing_ok=True)
        return out

    def abort(self) -> None:
        """Drop this ensemble's maps (a failed ensemble): the previous maps and summary stay."""
        if self._pack is not None:
            _, tmp, handle = self._pack
            handle.close()
            tmp.unlink(missing_ok=True)
            self._pack = None
        for tmp, work in self._pending.values():
            del work
            tmp.unlink(missing_ok=True)
        self._pending.clear()
        self._entries = []

    def begin(self) -> None:
        """Start an ensemble: forget anything a failed one left behind."""
        self.abort()
