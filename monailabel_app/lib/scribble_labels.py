"""Map a MONAI Label label image (viewer segments) onto the bundle's scribble values.

A label saved through MONAI Label is one integer image: ``0`` where nothing was drawn, and one value per segment.
Which value is which segment comes from the label's ``label_info`` (sent by the viewer with the label, e.g.
``[{"name": "foreground_scribbles", "idx": 3}]``; 3D Slicer writes ``idx``, MONAI Label's own scribble transforms
read ``id``) or, without it, from MONAI Label's defaults for a model with labels ``{"nucleus": 1}``: the label
itself is ``1``, ``background_scribbles`` is ``len(labels) + 1 = 2`` and ``foreground_scribbles`` is
``len(labels) + 2 = 3``.

The bundle (``configs/train.json``, ``scribble_values``) wants ``0`` background, ``1`` foreground and ``255``
unlabelled; note that ``0`` means *unlabelled* in a MONAI Label label but *background* in the bundle.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "BACKGROUND_NAMES",
    "BUNDLE_VALUES",
    "FOREGROUND_NAMES",
    "default_label_values",
    "label_values",
    "label_values_named",
    "scribble_counts",
    "to_bundle_scribbles",
    "unknown_values",
]

#: The bundle's scribble encoding (``scribble_values`` of ``configs/train.json``).
BUNDLE_VALUES: dict[str, int] = {"background": 0, "foreground": 1, "unlabelled": 255}
#: Segment names read as background strokes. ``background_scribbles`` is MONAI Label's name; 3D Slicer's "Submit
#: Label" drops segments called ``background``, ``background_scribbles`` and ``foreground_scribbles``, so a Slicer
#: user paints ``not_nucleus`` (background) and ``nucleus`` (foreground) segments instead.
BACKGROUND_NAMES: tuple[str, ...] = ("background_scribbles", "not_nucleus", "background")
#: Segment names read as foreground strokes, besides the model's own label names (e.g. ``nucleus``).
FOREGROUND_NAMES: tuple[str, ...] = ("foreground_scribbles", "foreground")


def default_label_values(labels: Mapping[str, int]) -> dict[int, str]:
    """MONAI Label's default values of a label image for a model with ``labels``.

    Args:
        labels: the model's label names and values, e.g. ``{"nucleus": 1}``.

    Returns:
        value -> segment name: the labels themselves, ``background_scribbles`` at ``len(labels) + 1`` and
        ``foreground_scribbles`` at ``len(labels) + 2``.
    """
    values = {int(v): str(k) for k, v in labels.items()}
    values[len(labels) + 1] = "background_scribbles"
    values[len(labels) + 2] = "foreground_scribbles"
    return values


def _info_entries(label_info: Any) -> Iterable[tuple[str, int]]:
    """``(name, value)`` pairs of a ``label_info`` (a list of ``{"name", "idx"|"id"}`` or a ``{name: value}`` dict)."""
    if isinstance(label_info, Mapping):
        for name, value in label_info.items():
            yield str(name), int(value)
        return
    for entry in label_info or []:
        if not isinstance(entry, Mapping) or "name" not in entry:
            continue
        value = entry.get("idx", entry.get("id"))
        if value is not None:
            yield str(entry["name"]), int(value)


def label_values_named(label_info: Any) -> set[int]:
    """The values a ``label_info`` names (any segment name), e.g. ``{3}`` for ``[{"name": "x", "idx": 3}]``."""
    try:
        return {value for _, value in _info_entries(label_info)}
    except (TypeError, ValueError):
        return set()


def label_values(labels: Mapping[str, int], label_info: Any = None) -> dict[int, int]:
    """Value of each segment in a MONAI Label label -> the bundle's scribble value.

    Args:
        labels: the model's label names and values (all of them count as foreground, i.e. nucleus strokes).
        label_info: the ``label_info`` saved with the label, if any; its entries replace the defaults for the
            values they name.

    Returns:
        ``{label value: 0 (background) | 1 (foreground)}``; ``0`` and every value not listed are unlabelled.

    Raises:
        ValueError: one value is named both as foreground and background, or the names give no background and no
            foreground value at all.
    """
    named = default_label_values(labels)
    for name, value in _info_entries(label_info):
        named[value] = name
    foreground = {n.lower() for n in (*FOREGROUND_NAMES, *labels.keys())}
    background = {n.lower() for n in BACKGROUND_NAMES}
    out: dict[int, int] = {}
    for value, name in named.items():
        key = name.lower()
        if value == 0:
            continue  # 0 is "nothing drawn" in a MONAI Label label image
        if key in foreground and key in background:
            raise ValueError(f"segment {name!r} is both a foreground and a background name")
        if key in foreground:
            out[value] = BUNDLE_VALUES["foreground"]
        elif key in background:
            out[value] = BUNDLE_VALUES["background"]
    if not out:
        expected = FOREGROUND_NAMES + BACKGROUND_NAMES
        raise ValueError(f"no scribble segment among {named}; expected names like {expected}")
    return out


def to_bundle_scribbles(label: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """Re-encode a MONAI Label label image as a bundle scribble map (uint8, same shape).

    Args:
        label: integer label image (any shape).
        mapping: from :func:`label_values`.

    Returns:
        ``0`` background strokes, ``1`` foreground strokes, ``255`` everywhere else.
    """
    label = np.asarray(label)
    out = np.full(label.shape, BUNDLE_VALUES["unlabelled"], dtype=np.uint8)
    for value, target in mapping.items():
        out[label == value] = target
    return out


def scribble_counts(scribbles: np.ndarray) -> dict[str, int]:
    """Pixels per bundle class of a scribble map (for logs and sanity checks)."""
    return {name: int(np.count_nonzero(scribbles == value)) for name, value in BUNDLE_VALUES.items()}


def unknown_values(label: np.ndarray, mapping: Mapping[int, int]) -> Sequence[int]:
    """Values present in ``label`` that are neither 0 nor mapped (they are read as unlabelled)."""
    present = np.unique(np.asarray(label))
    return [int(v) for v in present if v != 0 and int(v) not in mapping]
