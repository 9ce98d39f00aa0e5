"""Class balance of scribbles, and the class weights that correct it.

Scribbles are not a random sample of the pixels: strokes drawn along the middle of nuclei and through the
background put a far larger share of their pixels on the foreground than the image holds (automatic DSB2018
scribbles: 36% foreground against 14% of the pixels). A loss that averages over the scribbled pixels then learns
that too-high foreground prior, and the network over-segments (measured in ``benchmarks/results/dsb_analysis.md``).

Importance weighting corrects such a prior shift: weighting each scribbled pixel of class ``c`` by
``w_c = p_image(c) / p_scribble(c)`` makes the weighted scribble sample carry the image's class frequencies. For
two classes, scaled so the foreground weight is 1, the background weight is the odds ratio
``(s / (1 - s)) / (f / (1 - f))`` with ``s`` the foreground share of the scribbled pixels and ``f`` that of the
image. ``f`` comes from full masks where a datalist has them, or from the user's estimate ("nuclei cover about 15%
of the image"). The result goes into ``class_weights`` of ``configs/train.json`` (the scribble loss; the
pseudo-label loss is left unweighted by default).

No MONAI or scikit-image function counts scribble classes over a datalist, hence this small module.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from s2l_monai.data.datalist import DATALIST_NAME
from s2l_monai.data.folder import DEFAULT_VALUES, read_array

__all__ = [
    "ClassBalance",
    "PriorEstimate",
    "class_prior",
    "estimate_class_prior",
    "resolve_class_weights",
    "scribble_class_balance",
    "suggested_class_weights",
]



@dataclass(frozen=True)
class ClassBalance:
    """Pixel counts of one datalist section.

    Attributes:
        items: number of items counted.
        pixels: all pixels of their scribble maps.
        scribbled_foreground: scribble pixels marked foreground.
        scribbled_background: scribble pixels marked background.
        label_foreground: foreground pixels of the full masks (``label > 0``); None when not every item has one.
    """

    items: int
    pixels: int
    scribbled_foreground: int
    scribbled_background: int
    label_foreground: int | None

    @property
    def scribble_foreground_share(self) -> float:
        """Foreground share ``s`` of the scribbled pixels."""
        return self.scribbled_foreground / max(self.scribbled_foreground + self.scribbled_background, 1)

    @property
    def scribbled_share(self) -> float:
        """Share of all pixels that carry a scribble."""
        return (self.scribbled_foreground + self.scribbled_background) / max(self.pixels, 1)

    @property
    def label_foreground_share(self) -> float | None:
        """Foreground share ``f`` of the full masks, or None without them."""
        return None if self.label_foreground is None else self.label_foreground / max(self.pixels, 1)


def suggested_class_weights(scribble_foreground_share: float, image_foreground_share: float) -> list[float]:
    """Importance weights ``[w_background, w_foreground]`` (foreground 1) that give the scribbled pixels the image's
    class frequencies: ``w_background = (s / (1 - s)) / (f / (1 - f))``.

    Args:
        scribble_foreground_share: ``s``, foreground share of the scribbled pixels, in (0, 1).
        image_foreground_share: ``f``, foreground share of the images (full masks or an estimate), in (0, 1).

    Raises:
        ValueError: a share outside (0, 1) (e.g. scribbles of one class only).
    """
    for name, value in (("scribble foreground share", scribble_foreground_share),
                        ("image foreground share", image_foreground_share)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value}: both classes need scribbles and pixels.")
    s, f = scribble_foreground_share, image_foreground_share
    return [round((s / (1 - s)) / (f / (1 - f)), 2), 1.0]


def _read_any(path: str) -> np.ndarray:
    """Pixels of a 2D image or a volume; singleton axes dropped (a TIFF may hold one page or a stack)."""
    from s2l_monai.volumes import is_volume_path, read_volume, volume_format

    if is_volume_path(path) and volume_format(path) != "tiff":
        return np.squeeze(read_volume(path)[0])
    return np.squeeze(read_array(path))  # PNG/JPEG with Pillow, TIFF pages or stacks with tifffile


def scribble_class_balance(
    dataset_dir: str | os.PathLike, filename: str = DATALIST_NAME, split: str = "training"
) -> ClassBalance:
    """Count scribbled pixels per class (and full-mask foreground, where given) over one datalist section.

    Scribble values come from the datalist's ``scribble_values`` (default background 0, foreground 1); 2D images
    (PNG, TIFF, JPEG) and volumes (TIFF stacks, NIfTI, MHA/NRRD) are read as :mod:`s2l_monai.data.folder` and
    :mod:`s2l_monai.volumes` read them.

    Args:
        dataset_dir: folder holding the datalist (or the datalist file itself).
        filename: datalist file name, when ``dataset_dir`` is a folder.
        split: section to count.

    Raises:
        FileNotFoundError: no datalist, or a listed file is missing.
        ValueError: the section is empty, or a label's shape differs from its scribble's.
    """
    from s2l_monai.data.datalist import load_datalist

    path = Path(dataset_dir)
    datalist_path = path if path.is_file() else path / filename
    if not datalist_path.is_file():
        raise FileNotFoundError(f"no datalist at {datalist_path}")
    values: dict[str, Any] = {**DEFAULT_VALUES, **json.loads(datalist_path.read_text()).get("scribble_values", {})}
    items = load_datalist(datalist_path, split, synthesize_if_missing=False)
    if not items:
        raise ValueError(f"{datalist_path}: section {split!r} has no items.")
    pixels = fg = bg = 0
    label_fg: int | None = 0
    for item in items:
        scribble = _read_any(item["scribble"])
        pixels += scribble.size
        fg += int((scribble == values["foreground"]).sum())
        bg += int((scribble == values["background"]).sum())
        if label_fg is not None and item.get("label"):
            label = _read_any(item["label"])
            if label.shape != scribble.shape:
                raise ValueError(f"{item['label']}: shape {label.shape} differs from its scribble's {scribble.shape}.")
            label_fg += int((label > 0).sum())
        else:
            label_fg = None
    return ClassBalance(len(items), pixels, fg, bg, label_fg)


# ----------------------------------------------------------------------------------------------------------------
# The class prior without full masks
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PriorEstimate:
    """What :func:`estimate_class_prior` found.

    Attributes:
        items: items looked at.
        scribble_foreground_share: ``s``, foreground share of their scribbled pixels.
        image_foreground_share: ``f``, the estimated foreground share of their pixels.
        class_weights: ``[w_background, w_foreground]`` from :func:`suggested_class_weights`, clipped to
            ``[1/max_weight, max_weight]``.
    """

    items: int
    scribble_foreground_share: float
    image_foreground_share: float
    class_weights: list[float]

    def describe(self) -> str:
        return (
            f"class prior estimated from the scribbles of {self.items} items: nuclei (foreground) cover about "
            f"{100 * self.image_foreground_share:.1f}% of the pixels but {100 * self.scribble_foreground_share:.1f}% "
            f"of the scribbled ones, so class_weights = {self.class_weights} (background, foreground)"
        )


def _balanced_threshold(fg: np.ndarray, bg: np.ndarray, candidates: int = 256) -> tuple[float, float, float]:
    """The intensity threshold (and polarity) that best separates two samples by balanced accuracy.

    Balanced accuracy weighs both classes equally, so the threshold does not depend on how many pixels of each
    class were scribbled (which is exactly the biased quantity).

    Returns:
        ``(threshold, polarity, balanced_accuracy)``; foreground is ``polarity * (x - threshold) > 0``.
    """
    fg, bg = np.sort(fg.ravel()), np.sort(bg.ravel())
    polarity = 1.0 if np.median(fg) >= np.median(bg) else -1.0
    if polarity < 0:
        fg, bg = np.sort(-fg), np.sort(-bg)
    lo, hi = float(min(fg[0], bg[0])), float(max(fg[-1], bg[-1]))
    ts = np.linspace(lo, hi, candidates)
    tpr = 1.0 - np.searchsorted(fg, ts, side="right") / fg.size  # share of foreground above t
    tnr = np.searchsorted(bg, ts, side="right") / bg.size  # share of background at or below t
    score = 0.5 * (tpr + tnr)
    best = int(np.argmax(score))
    # the middle of the plateau of best thresholds (scribbles at nucleus centres leave a wide gap between classes)
    plateau = np.flatnonzero(score >= score[best] - 1e-12)
    t = float(ts[plateau].mean())
    return polarity * t, polarity, float(score[best])


def estimate_class_prior(
    items: Any,
    unlabelled: int = 255,
    max_items: int = 200,
    sigma: float = 1.0,
    max_weight: float = 20.0,
) -> PriorEstimate:
    """Estimate the image's foreground share from the scribbles alone, and the class weights that correct it.

    Why: the scribbles' own class shares are biased (strokes along nucleus centres over-represent the foreground,
    see the module notes), and the importance weights need the image's share ``f``, which full masks give but a
    scribble-only user does not have. Here each image gets the intensity threshold (and polarity: bright
    fluorescent or dark stained nuclei) that best separates ITS foreground scribbles from its background scribbles
    by balanced accuracy, after a light Gaussian smoothing; the share of its pixels on the foreground side of that
    threshold is its estimated ``f``. Images scribbled with one class only use the threshold pooled over the others.
    ``f`` is the pixel-weighted mean over the images. A threshold misclassifies the boundary pixels of nuclei
    both ways, which roughly cancels in a share (an error in the share, not the mask, is what matters here); no
    learned model is needed before training, so the weights are fixed from the first step.

    Args:
        items: loaded items (dicts with ``"image"`` ``CHW`` and ``"scribble"`` ``1HW`` holding class indices 0/1 and
            ``unlabelled``), e.g. the ensemble's ``CacheDataset``; at most ``max_items`` evenly spaced ones are read.
        unlabelled: scribble value of unlabelled pixels.
        max_items: cap on the items read (large datasets and volume slices).
        sigma: Gaussian smoothing of the intensity, pixels.
        max_weight: the weights are clipped to ``[1/max_weight, max_weight]``.

    Raises:
        ValueError: no foreground or no background scribble in the items looked at.
    """
    from scipy.ndimage import gaussian_filter

    n = len(items)
    if n == 0:
        raise ValueError("cannot estimate the class prior: the training list is empty.")
    picks = np.unique(np.linspace(0, n - 1, min(n, max_items)).round().astype(int))
    greys, scribbles = [], []
    s_fg = s_bg = 0
    for i in picks:
        item = items[int(i)]
        image = np.asarray(item["image"], dtype=np.float32)
        scribble = np.asarray(item["scribble"])
        scribble = scribble.reshape(scribble.shape[-2:]) if scribble.ndim > 2 else scribble
        grey = image.mean(axis=0) if image.ndim == 3 else image
        grey = gaussian_filter(grey, sigma) if sigma > 0 else grey
        greys.append(grey)
        scribbles.append(scribble)
        s_fg += int((scribble == 1).sum())
        s_bg += int((scribble == 0).sum())
    if s_fg == 0 or s_bg == 0:
        missing = "foreground" if s_fg == 0 else "background"
        raise ValueError(f"cannot estimate the class prior: no {missing} scribble in the {len(picks)} items read.")
    rng = np.random.default_rng(0)

    def pooled(label: int) -> np.ndarray:
        parts = [g[s == label] for g, s in zip(greys, scribbles)]
        parts = [p if p.size <= 5000 else rng.choice(p, 5000, replace=False) for p in parts if p.size]
        return np.concatenate(parts)

    global_t, global_pol, _ = _balanced_threshold(pooled(1), pooled(0))
    fg_pixels = total = 0
    for grey, scribble in zip(greys, scribbles):
        fg, bg = grey[scribble == 1], grey[scribble == 0]
        t, pol = (global_t, global_pol) if fg.size == 0 or bg.size == 0 else _balanced_threshold(fg, bg)[:2]
        fg_pixels += int((pol * (grey - t) > 0).sum())
        total += grey.size
    s = s_fg / (s_fg + s_bg)
    f = float(np.clip(fg_pixels / total, 1e-3, 1 - 1e-3))
    w_bg = float(np.clip(suggested_class_weights(s, f)[0], 1.0 / max_weight, max_weight))
    return PriorEstimate(len(picks), s, f, [round(w_bg, 2), 1.0])


def resolve_class_weights(
    class_weights: Any, items: Any = None, unlabelled: int = 255, output_dir: str | os.PathLike | None = None
) -> list[float] | None:
    """The ``class_weights`` of the bundle config: a list as given, None (the paper: unweighted), or ``"auto"``.

    ``"auto"`` estimates them with :func:`estimate_class_prior` from ``items``, logs what it found and, with
    ``output_dir``, writes it to ``<output_dir>/class_prior.json``. The result is cached per ``output_dir`` and
    items, so ``class_weights`` and ``pseudo_class_weights`` share one estimate.
    """
    if isinstance(class_weights, str) and class_weights.strip().lower() in ("none", "null", "off", ""):
        class_weights = None  # as typed on the command line: --class_weights none
    if class_weights is None or not isinstance(class_weights, str):
        return None if class_weights is None else [float(w) for w in class_weights]
    if class_weights != "auto":
        raise ValueError(f"class_weights must be a list of numbers, null/none or 'auto', got {class_weights!r}.")
    if items is None:
        raise ValueError("class_weights 'auto' needs the training items.")
    return list(class_prior(items, unlabelled, output_dir).class_weights)


def class_prior(items: Any, unlabelled: int = 255, output_dir: str | os.PathLike | None = None) -> PriorEstimate:
    """:func:`estimate_class_prior` of a run's training items, once per run: logged, and with ``output_dir`` written to
    ``<output_dir>/class_prior.json``. Cached per ``output_dir`` and items, so ``class_weights``,
    ``pseudo_class_weights`` and the choice of the start (:func:`s2l_monai.pretrained.resolve_pretrained`) share one
    estimate."""
    key = (str(output_dir), id(items))
    if key not in _PRIOR_CACHE:
        import logging

        estimate = estimate_class_prior(items, unlabelled=unlabelled)
        logging.getLogger("s2l_monai.prior").info(estimate.describe())
        from s2l_monai.distributed import is_main_process

        if output_dir is not None and is_main_process():  # every rank estimates the same; rank 0 records it
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "class_prior.json").write_text(json.dumps({
                "items": estimate.items,
                "scribble_foreground_share": round(estimate.scribble_foreground_share, 4),
                "image_foreground_share": round(estimate.image_foreground_share, 4),
                "class_weights": estimate.class_weights,
                "method": "per-image balanced-accuracy intensity threshold on the scribbles (s2l_monai.data.balance)",
            }, indent=2) + "\n")
        _PRIOR_CACHE[key] = estimate
    return _PRIOR_CACHE[key]


_PRIOR_CACHE: dict[tuple[str, int], PriorEstimate] = {}
