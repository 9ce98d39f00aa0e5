"""The widget's project folder: napari layers in, bundle datasets and runs out, results back as arrays (no Qt here).

A project folder holds everything one napari session trains and segments::

    <project>/dataset/datalist.json        the training items written from the layers (bundle scribble values)
    <project>/dataset/images/, scribbles/  one file per image layer (PNG for 2D, TIFF for stacks)
    <project>/run/                         the training's output_dir: ema/ (pseudo-labels), uncertainty/, ...
    <project>/models/model.pt              the trained weights (and the bundle's resumable checkpoints)
    <project>/segment/                     inputs and outputs of Segment
    <project>/train.log                    what the last training printed

Everything the user can get wrong is checked by :func:`check_training_set` before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BUNDLE_VALUES",
    "LayerImage",
    "Project",
    "TrainingSet",
    "check_training_set",
    "content_digest",
    "image_kind",
    "item_id",
    "model_in_channels",
    "pseudo_label_map",
    "read_result",
    "scribble_map",
]

#: scribble values of the written scribble files (the bundle's defaults: ``configs/train.json``)
BUNDLE_VALUES = {"background": 0, "foreground": 1, "unlabelled": 255}
#: values of the pseudo-label layer
PSEUDO_NUCLEUS, PSEUDO_UNSURE = 1, 2
_SAFE = re.compile(r"[^A-Za-z0-9_-]+")
_MIN_SIDE = 8


@dataclass
class LayerImage:
    """One image layer with its scribble layer, as the widget hands them over.

    Attributes:
        name: the image layer's name.
        data: the image, ``HW`` (grey), ``HWC`` (``rgb``) or ``ZYX`` (a stack, trained slice by slice).
        rgb: whether the last axis holds colour channels.
        scribbles: the Labels layer's data (napari label values, 0 = unlabelled), or None when none was chosen.
        scribble_name: the Labels layer's name, for messages.
    """

    name: str
    data: np.ndarray
    rgb: bool = False
    scribbles: np.ndarray | None = None
    scribble_name: str = ""

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[:-1] if self.rgb else self.data.shape)


@dataclass
class TrainingSet:
    """What :func:`check_training_set` found: the usable images, the problems and the notes for the user."""

    images: list[LayerImage] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    volumes: bool = False
    in_channels: int = 1


def item_id(name: str) -> str:
    """The item id (and file stem) of a layer: its name made safe for file names, plus a short hash of it."""
    stem = _SAFE.sub("_", name).strip("_-")[:40] or "layer"
    return f"{stem}-{hashlib.sha1(name.encode('utf-8')).hexdigest()[:6]}"


def image_kind(image: LayerImage) -> str | None:
    """``"2d"``, ``"rgb"`` or ``"stack"``, or None for a shape the widget cannot train on."""
    data = image.data
    if image.rgb:
        return "rgb" if data.ndim == 3 and data.shape[-1] in (3, 4) else None
    return {2: "2d", 3: "stack"}.get(data.ndim)


def scribble_map(labels: np.ndarray, nucleus: int, background: int) -> np.ndarray:
    """napari scribbles (``nucleus`` / ``background`` label values, anything else unlabelled) -> bundle values."""
    labels = np.asarray(labels)
    out = np.full(labels.shape, BUNDLE_VALUES["unlabelled"], dtype=np.uint8)
    out[labels == background] = BUNDLE_VALUES["background"]
    out[labels == nucleus] = BUNDLE_VALUES["foreground"]
    return out


def check_training_set(images: Sequence[LayerImage], nucleus: int, background: int) -> TrainingSet:
    """Check the layers chosen for training without writing anything.

    Problems (training cannot start): no image, an image without a scribble layer, a scribble layer whose shape
    differs from its image's, an image shape the bundle cannot read, 2D images mixed with stacks or grey with
    colour, equal or zero label values, no scribbles at all, or only one of the two classes painted. Notes (it can):
    images without strokes (left out) and label values that are neither class (read as unlabelled).

    Args:
        images: the chosen image layers with their scribbles.
        nucleus: the label value painted on nuclei.
        background: the label value painted on background.
    """
    found = TrainingSet()
    if nucleus == background:
        found.problems.append(f"the nucleus and background label values are both {nucleus}: choose two values")
    if nucleus <= 0 or background <= 0:
        found.problems.append("label value 0 means 'not scribbled' in napari: nucleus and background need values > 0")
    if not images:
        found.problems.append("no image chosen: tick at least one image layer")
    kinds: dict[str, str] = {}
    totals = {"nucleus": 0, "background": 0}
    for image in images:
        kind = image_kind(image)
        if kind is None:
            found.problems.append(f"image '{image.name}' has shape {image.data.shape}: expected a 2D image (grey or "
                                  "RGB) or a 3D stack")
            continue
        if min(image.spatial_shape[-2:]) < _MIN_SIDE:
            found.problems.append(f"image '{image.name}' is {image.spatial_shape}: at least {_MIN_SIDE} px a side")
            continue
        kinds[image.name] = kind
        if image.scribbles is None:
            found.problems.append(f"image '{image.name}' has no scribble layer: choose a Labels layer for it (or "
                                  "press 'New scribble layers')")
            continue
        if tuple(image.scribbles.shape) != image.spatial_shape:
            found.problems.append(
                f"scribble layer '{image.scribble_name}' has shape {tuple(image.scribbles.shape)} but image "
                f"'{image.name}' is {image.spatial_shape}: choose the Labels layer painted on this image"
            )
            continue
        labels = np.asarray(image.scribbles)
        n_fg, n_bg = int(np.count_nonzero(labels == nucleus)), int(np.count_nonzero(labels == background))
        others = sorted(set(np.unique(labels).tolist()) - {0, nucleus, background})
        if others:
            found.notes.append(f"'{image.scribble_name}': label values {others[:5]} are neither nucleus ({nucleus}) "
                               f"nor background ({background}); read as unlabelled")
        if n_fg + n_bg == 0:
            found.notes.append(f"'{image.name}' has no strokes yet: left out of the training")
            continue
        totals["nucleus"] += n_fg
        totals["background"] += n_bg
        found.images.append(image)
    if len(set(kinds.values()) & {"stack"}) and len(set(kinds.values())) > 1:
        found.problems.append("2D images and 3D stacks cannot train together: tick one kind at a time")
    elif {"2d", "rgb"} <= set(kinds.values()):
        found.problems.append("grey and colour (RGB) images cannot train together: tick one kind at a time")
    if not found.problems:
        if totals["nucleus"] + totals["background"] == 0:
            found.problems.append(f"no scribbles yet: paint some nuclei with label {nucleus} and some background "
                                  f"with label {background} in the scribble layer(s)")
        elif totals["background"] == 0:
            found.problems.append(f"only nucleus strokes (label {nucleus}) found: paint some background with label "
                                  f"{background} too")
        elif totals["nucleus"] == 0:
            found.problems.append(f"only background strokes (label {background}) found: paint some nuclei with label "
                                  f"{nucleus} too")
    if found.problems:
        found.images = []
    else:
        found.volumes = any(kinds[i.name] == "stack" for i in found.images)
        found.in_channels = 3 if any(i.rgb for i in found.images) else 1
    return found


def _as_uint(data: np.ndarray, rgb: bool) -> np.ndarray:
    """An image as PNG can hold it: uint8/uint16 kept, anything else rescaled (min..max) to uint16 (uint8 for RGB).

    The bundle rescales intensities by percentiles anyway, so a linear rescale changes nothing it learns from.
    """
    data = np.asarray(data)
    if rgb:
        data = data[..., :3]
        if data.dtype == np.uint8:
            return np.ascontiguousarray(data)
        target, top = np.uint8, 255.0
    else:
        if data.dtype in (np.uint8, np.uint16):
            return np.ascontiguousarray(data)
        target, top = np.uint16, 65535.0
    values = np.nan_to_num(data.astype(np.float64))
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) * top if high > low else np.zeros_like(values)
    return np.rint(scaled).astype(target)


def _write_image(path_stem: Path, image: LayerImage) -> Path:
    """Write an image layer's data for the bundle: a PNG (2D) or a TIFF stack; returns the path."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    if image_kind(image) == "stack":
        from s2l_monai.volumes import write_volume

        return write_volume(path_stem.with_suffix(".tif"), np.asarray(image.data))
    from PIL import Image

    path = path_stem.with_suffix(".png")
    Image.fromarray(_as_uint(image.data, image.rgb)).save(path, format="PNG")
    return path


def _write_scribbles(path_stem: Path, scribbles: np.ndarray, volume: bool) -> Path:
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    if volume:
        from s2l_monai.volumes import write_volume

        return write_volume(path_stem.with_suffix(".tif"), scribbles)
    from s2l_monai.inference_io import write_array

    return write_array(path_stem.with_suffix(".png"), scribbles)


def content_digest(data: np.ndarray) -> str:
    """SHA-256 of an array's shape, dtype and values (whether an image changed since its pseudo-label was made)."""
    data = np.ascontiguousarray(data)
    digest = hashlib.sha256(f"{data.shape}{data.dtype}".encode())
    digest.update(data.tobytes())
    return digest.hexdigest()


def model_in_channels(path: str | Path) -> int:
    """The input channels of a saved ``model.pt`` (its first convolution's ``weight``)."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    for key, value in state.items():
        if key.endswith("weight") and getattr(value, "ndim", 0) == 4:
            return int(value.shape[1])
    raise ValueError(f"{path}: no convolution weight found; is it a model.pt of this bundle?")


def pseudo_label_map(prob: np.ndarray, tau: float) -> np.ndarray:
    """The pseudo-label layer of averaged probabilities ``C...``: 1 = nucleus, 2 = not confident, 0 = background.

    A pixel is in the pseudo-label set (the paper's Ωg) where its top class probability exceeds ``tau``; NaN
    (a slice of a stack never ensembled) reads as not confident.
    """
    prob = np.nan_to_num(np.asarray(prob, dtype=np.float32), nan=0.0)
    out = np.full(prob.shape[1:], PSEUDO_UNSURE, dtype=np.uint8)
    confident = prob.max(0) > tau
    out[confident & (prob.argmax(0) == 1)] = PSEUDO_NUCLEUS
    out[confident & (prob.argmax(0) == 0)] = 0
    return out


class Project:
    """A project folder (see the module notes) and what the widget reads and writes in it.

    Args:
        root: the folder (created on the first write, not before).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    @property
    def dataset_dir(self) -> Path:
        return self.root / "dataset"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def model_path(self) -> Path:
        return self.models_dir / "model.pt"

    @property
    def segment_dir(self) -> Path:
        return self.root / "segment"

    @property
    def log_path(self) -> Path:
        return self.root / "train.log"

    @property
    def sources_path(self) -> Path:
        """Digest of each item's image when its pseudo-label was made (``run/ema_sources.json``)."""
        return self.run_dir / "ema_sources.json"

    def write_training_set(self, found: TrainingSet, nucleus: int, background: int) -> list[dict[str, Any]]:
        """Write the checked images and scribbles and ``dataset/datalist.json``; returns the datalist's items.

        The dataset folder is rewritten (images no longer chosen are removed).
        """
        if found.problems or not found.images:
            raise ValueError("the training set has problems; check it with check_training_set first")
        if self.dataset_dir.exists():
            shutil.rmtree(self.dataset_dir)
        items = []
        for image in found.images:
            name = item_id(image.name)
            image_path = _write_image(self.dataset_dir / "images" / name, image)
            scribbles = scribble_map(image.scribbles, nucleus, background)
            scribble_path = _write_scribbles(self.dataset_dir / "scribbles" / name, scribbles, found.volumes)
            items.append({
                "image": image_path.relative_to(self.dataset_dir).as_posix(),
                "scribble": scribble_path.relative_to(self.dataset_dir).as_posix(),
                "id": name,
            })
        datalist = {"scribble_values": BUNDLE_VALUES, "training": items}
        (self.dataset_dir / "datalist.json").write_text(json.dumps(datalist, indent=1) + "\n")
        return items

    def refresh_ema_store(self, found: TrainingSet) -> dict[str, list[str]]:
        """Keep the stored pseudo-labels of images that did not change; drop those of changed images.

        As the MONAI Label app does (``monailabel_app/lib/training_set.py``): the store is keyed by item id, and an
        item's average is kept only where the image's content digest is the one recorded when it was made. New
        strokes do not reset it (the scribbles are not part of the average).

        Returns:
            ``{"reused": [...layer names], "reset": [...layer names]}``.
        """
        ema = self.run_dir / "ema"
        known: dict[str, str] = json.loads(self.sources_path.read_text()) if self.sources_path.is_file() else {}
        reused, reset = [], []
        current = {}
        for image in found.images:
            name = item_id(image.name)
            digest = content_digest(image.data)
            current[name] = digest
            stored = ema / f"{name}.npy"
            if stored.exists():
                if known.get(name) == digest:
                    reused.append(image.name)
                else:
                    stored.unlink()
                    reset.append(image.name)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.sources_path.write_text(json.dumps({**known, **current}, indent=1))
        return {"reused": reused, "reset": reset}

    def record_sources(self, found: TrainingSet) -> None:
        """Record the content digest of every training image (a new training made its pseudo-labels afresh)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        current = {item_id(i.name): content_digest(i.data) for i in found.images}
        self.sources_path.write_text(json.dumps(current, indent=1))

    def pseudo_label(self, layer_name: str, tau: float, num_classes: int = 2) -> np.ndarray | None:
        """The current pseudo-label map of an image layer (:func:`pseudo_label_map`), or None before its first
        ensemble."""
        from s2l_monai.ensemble import EMAStore

        root = self.run_dir / "ema"
        if not (root / f"{item_id(layer_name)}.npy").exists():
            return None
        prob = EMAStore(root, num_classes=num_classes).probabilities(item_id(layer_name))
        return None if prob is None else pseudo_label_map(prob, tau)

    def uncertainty(self, layer_name: str) -> np.ndarray | None:
        """The image's uncertainty map of the last ensemble, float32 in ``[0, 1]`` (1 = undecided), or None."""
        from s2l_monai.uncertainty import SUMMARY_NAME, read_map

        folder = self.run_dir / "uncertainty"
        try:
            summary = json.loads((folder / SUMMARY_NAME).read_text())
            entries = [e for e in summary.get("items", []) if e.get("id") == item_id(layer_name)]
            if not entries:
                return None
            if entries[0].get("slice") is not None:  # a stack: one DHW file
                stored = np.load(Path(entries[0].get("map_dir") or folder) / entries[0]["map"])
            else:
                stored = np.array(read_map(folder, entries[0]))
        except (OSError, ValueError, KeyError):
            return None  # none yet, or replaced by the next ensemble while being read: the next one will do
        return stored.astype(np.float32) / 255.0

    def write_segment_inputs(self, images: Sequence[LayerImage]) -> dict[str, tuple[Path, dict[str, Path]]]:
        """Write the images to segment into ``segment/input_2d`` and ``segment/input_3d``.

        Returns:
            ``{layer name: (its input folder, {"semantic": path, "instances": path} the bundle will write)}``.
        """
        if self.segment_dir.exists():
            shutil.rmtree(self.segment_dir)
        out = {}
        for image in images:
            stack = image_kind(image) == "stack"
            folder = self.segment_dir / ("input_3d" if stack else "input_2d")
            path = _write_image(folder / item_id(image.name), image)
            results = self.segment_dir / ("output_3d" if stack else "output_2d")
            outputs = {k: results / f"{path.stem}_{k}{path.suffix}" for k in ("semantic", "instances")}
            out[image.name] = (folder, outputs)
        return out

    def save_bundle(self, target: str | Path, configs_dir: Path) -> Path:
        """Copy the trained model into a bundle folder ``target`` (``models/model.pt`` and ``configs/``)."""
        if not self.model_path.is_file():
            raise FileNotFoundError(f"no trained model in {self.models_dir} yet: train first")
        target = Path(target)
        (target / "models").mkdir(parents=True, exist_ok=True)
        shutil.copy2(self.model_path, target / "models" / "model.pt")
        _copy_calibration(self.model_path, target / "models" / "model.pt")
        if configs_dir.is_dir():
            shutil.copytree(configs_dir, target / "configs", dirs_exist_ok=True)
        return target / "models" / "model.pt"

    def load_model(self, source: str | Path) -> Path:
        """Make a ``model.pt`` (or a bundle folder holding ``models/model.pt``) this project's model."""
        source = Path(source)
        if source.is_dir():
            source = source / "models" / "model.pt"
        if not source.is_file():
            raise FileNotFoundError(f"{source}: no such model file (a model.pt, or a bundle folder with models/)")
        model_in_channels(source)  # readable and a network of this bundle
        self.models_dir.mkdir(parents=True, exist_ok=True)
        if source.resolve() != self.model_path.resolve():
            shutil.copy2(source, self.model_path)
            _copy_calibration(source, self.model_path)
        return self.model_path


def _copy_calibration(source: Path, target: Path) -> None:
    """The model's foreground threshold goes with it (``<model>.calibration.json``); a stale one at the target is
    removed, so a model without one is read at the argmax."""
    from s2l_monai.calibration import calibration_path

    src, dst = calibration_path(source), calibration_path(target)
    if src.is_file():
        shutil.copy2(src, dst)
    elif dst.is_file():
        dst.unlink()


def read_result(path: Path) -> np.ndarray:
    """Read a mask written by the inference bundle (PNG or TIFF, 2D or a stack)."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        return np.asarray(tifffile.imread(path))
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)

