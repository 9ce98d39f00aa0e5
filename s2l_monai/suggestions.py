"""Where to scribble next: the training images ranked by the ensemble's uncertainty, with the regions to draw in.

``s2l suggest --run <output_dir>`` reads what the last ensemble of a training wrote (``uncertainty/uncertainty.json``
and the maps beside it, :mod:`s2l_monai.uncertainty`) and ranks the images (the slices, for volumes) by the share of
their unscribbled pixels that are uncertain; for each suggested image it finds the few largest uncertain regions
(connected components of ``u >= threshold``, scored by their summed uncertainty) and draws them as boxes on a
picture: image | scribbles | uncertainty with boxes.

Images nobody has scribbled yet are not in the training, so no ensemble has seen them: with ``--candidates DIR``
the trained model predicts each of them under the four flips of the image (one network pass per flip, the
inference config's sliding window) and :func:`candidate_uncertainty` takes the indecision of the flip average and
the flips' disagreement (the largest total-variation distance of one flip's prediction from the average) in place
of the ensemble's two terms. Candidates and scribbled images are ranked together on the same threshold.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from s2l_monai.figures import BACKGROUND_SCRIBBLE, FOREGROUND_SCRIBBLE, heat, to_display
from s2l_monai.uncertainty import SUMMARY_NAME, UncertaintyMaps, pixel_uncertainty, read_map, uncertain_threshold

__all__ = [
    "BOX_COLOUR",
    "candidate_uncertainty",
    "load_summary",
    "rank_items",
    "suggest",
    "suggestion_figure",
    "uncertain_regions",
]

BOX_COLOUR = (0, 255, 128)  # spring green: apart from the scribble colours and the heat scale


def load_summary(run_dir: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """The last ensemble's summary of a training's output folder (or of its ``uncertainty`` folder).

    Returns:
        the summary and the folder of the maps.

    Raises:
        FileNotFoundError: no summary (no ensemble has run yet, or the run was made with ``uncertainty_maps`` off).
    """
    run_dir = Path(run_dir)
    for folder in (run_dir / "uncertainty", run_dir):
        if (folder / SUMMARY_NAME).is_file():
            return json.loads((folder / SUMMARY_NAME).read_text()), folder
    raise FileNotFoundError(
        f"{run_dir}: no {SUMMARY_NAME} (expected under {run_dir / 'uncertainty'}); every ensemble of a training "
        "writes it (into the output_dir of `s2l train`), so the run must have passed its first ensemble"
    )


def rank_items(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The summary's entries, most useful first: by the share of uncertain unscribbled pixels, then the mean."""
    return sorted(summary.get("items", []), key=lambda e: (-float(e["uncertain_share"]), -float(e["mean"]),
                                                            str(e["id"]), e.get("slice") or 0))


def uncertain_regions(
    uncertainty: np.ndarray, threshold: float, max_regions: int = 3, min_pixels: int = 16, pad: int = 4
) -> list[dict[str, Any]]:
    """The largest uncertain regions of one map, best first.

    Uncertain pixels (``u >= threshold``) are closed with a 3x3 square (one-pixel gaps do not split a region),
    labelled as 8-connected components (SciPy), scored by their summed uncertainty, and the ``max_regions`` best with
    at least ``min_pixels`` pixels are returned with their bounding box (padded by ``pad``, clipped to the image).

    Args:
        uncertainty: ``HW`` in ``[0, 1]``.
        threshold: the uncertain threshold of the run.
        max_regions: how many regions.
        min_pixels: smaller regions are left out.
        pad: margin added to each box, in pixels.

    Returns:
        dicts with ``box`` ``[y0, x0, y1, x1]`` (end exclusive), ``pixels`` and ``score`` (summed ``u``).
    """
    u = np.asarray(uncertainty, dtype=np.float32)
    mask = ndimage.binary_closing(u >= threshold, structure=np.ones((3, 3), bool)) & (u > 0)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    pixels = ndimage.sum_labels(np.ones_like(u), labels, index)
    scores = ndimage.sum_labels(u, labels, index)
    boxes = ndimage.find_objects(labels)
    regions = []
    for i in np.argsort(-scores, kind="stable"):
        if pixels[i] < min_pixels:
            continue
        ys, xs = boxes[i]
        box = [max(0, ys.start - pad), max(0, xs.start - pad), min(u.shape[0], ys.stop + pad),
               min(u.shape[1], xs.stop + pad)]
        regions.append({"box": [int(v) for v in box], "pixels": int(pixels[i]), "score": round(float(scores[i]), 2)})
        if len(regions) == max_regions:
            break
    return regions


def _draw_box(rgb: np.ndarray, box: Sequence[int], colour: tuple[int, int, int], width: int = 2) -> None:
    y0, x0, y1, x1 = box
    rgb[y0:min(y0 + width, y1), x0:x1] = colour
    rgb[max(y1 - width, y0):y1, x0:x1] = colour
    rgb[y0:y1, x0:min(x0 + width, x1)] = colour
    rgb[y0:y1, max(x1 - width, x0):x1] = colour


def suggestion_figure(
    image: np.ndarray,
    scribble: np.ndarray | None,
    uncertainty: np.ndarray,
    regions: Sequence[Mapping[str, Any]],
    scribble_values: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Picture of one suggestion: image | image with its scribbles and the boxes | uncertainty with the boxes.

    Args:
        image: ``HW``, ``HWC`` (C <= 4) or ``CHW`` as read from the file.
        scribble: ``HW`` raw scribble values, or None.
        uncertainty: ``HW`` in ``[0, 1]``.
        regions: from :func:`uncertain_regions`.
        scribble_values: the scribble file's ``background``/``foreground`` values (default 0 and 1).

    Returns:
        uint8 RGB ``H(3W+8)3``.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] <= 4 and image.shape[0] > 4:
        image = np.moveaxis(image[..., :3], -1, 0)
    rgb = to_display(image)
    values = dict(scribble_values or {})
    drawn = rgb.copy()
    if scribble is not None:
        scribble = np.asarray(scribble)
        drawn[scribble == values.get("background", 0)] = BACKGROUND_SCRIBBLE
        drawn[scribble == values.get("foreground", 1)] = FOREGROUND_SCRIBBLE
    hot = heat(uncertainty)
    for region in regions:
        _draw_box(drawn, region["box"], BOX_COLOUR)
        _draw_box(hot, region["box"], BOX_COLOUR)
    gap = np.full((rgb.shape[0], 4, 3), 128, dtype=np.uint8)
    return np.concatenate([rgb, gap, drawn, gap, hot], axis=1)


#: the four flips of a 2D image (spatial axes of a ``BCHW`` tensor), as the inference's test-time augmentation
FLIPS: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (2, 3))


def candidate_uncertainty(
    images: Sequence[str | os.PathLike],
    ckpt_path: str | os.PathLike,
    in_channels: int = 1,
    bundle_root: str | os.PathLike | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Uncertainty ``HW`` of images without scribbles, from the trained model's predictions under the four flips.

    ``u = max(1 - margin of the flip average, max_f 1/2 sum_c |p_f,c - mean_c|)``: the ensemble's indecision and
    change terms (:func:`s2l_monai.uncertainty.pixel_uncertainty`) with the flips in place of the ensembles. The
    network, its preprocessing and the sliding window are those of ``configs/inference.json``.

    Args:
        images: 2D image files.
        ckpt_path: the trained weights (``model.pt``).
        in_channels: the model's input channels (1 grey, 3 RGB).
        bundle_root: the bundle folder holding ``configs/`` (default: the repository or ``.``).

    Yields:
        ``(path, u)`` per image, float32 ``HW`` in ``[0, 1]``.
    """
    import torch
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    from s2l_monai.cli import _configs_dir

    root = Path(bundle_root) if bundle_root is not None else _configs_dir().parent
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser["bundle_root"] = str(root)
    parser["in_channels"] = int(in_channels)
    parser["device"] = "$torch.device('cpu')"
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(str(ckpt_path), map_location="cpu"))
    network.eval()
    load = Compose(parser.get_parsed_content("load_transforms"))
    inferer = parser.get_parsed_content("window_inferer")
    for path in images:
        x = torch.as_tensor(load({"image": str(path)})["image"])[None]
        probs = []
        with torch.no_grad():
            for dims in FLIPS:
                out = inferer(torch.flip(x, dims) if dims else x, network)
                out = torch.softmax(torch.as_tensor(out).float(), dim=1)
                probs.append((torch.flip(out, dims) if dims else out)[0])
        stacked = torch.stack(probs).numpy()
        mean = stacked.mean(0)
        disagreement = (0.5 * np.abs(stacked - mean[None]).sum(1)).max(0)
        yield str(path), np.maximum(pixel_uncertainty(mean), disagreement).astype(np.float32)


def _candidate_entries(
    candidates: Sequence[str | os.PathLike],
    known: set[str],
    ckpt_path: str | os.PathLike,
    in_channels: int,
    folder: Path,
    tau: float,
) -> list[dict[str, Any]]:
    """Summary entries for the candidate images that are not among the scribbled ones: their maps and statistics
    written by :class:`s2l_monai.uncertainty.UncertaintyMaps` into ``folder``, as an ensemble writes them."""
    from s2l_monai.inference_io import image_stem

    todo = [str(Path(c).resolve()) for c in candidates if str(Path(c).resolve()) not in known]
    maps = UncertaintyMaps(folder, tau=tau, items=[{"id": image_stem(p), "image": p} for p in todo])
    maps.begin()
    for path, u in candidate_uncertainty(todo, ckpt_path, in_channels):
        maps.add(image_stem(path), u, np.ones(u.shape, dtype=bool))  # no scribbles: every pixel counts
    entries = json.loads(maps.commit().read_text())["items"]
    return [{**e, "map_dir": str(folder), "source": "flips of the trained model (no scribbles yet)"} for e in entries]


def _read_slice(path: str, slice_index: int | None, axis: int | None) -> np.ndarray | None:
    if not path or not Path(path).is_file():
        return None
    if slice_index is None:
        from s2l_monai.data.checks import read_array

        return read_array(path)
    from s2l_monai.volumes import open_volume

    return np.asarray(open_volume(path).slice(0 if axis is None else int(axis), int(slice_index)))


def _map(folder: Path, entry: Mapping[str, Any]) -> np.ndarray:
    return np.asarray(read_map(folder, entry), dtype=np.float32) / 255.0


def suggest(
    run_dir: str | os.PathLike,
    top: int = 5,
    max_regions: int = 3,
    out_dir: str | os.PathLike | None = None,
    figures: bool = True,
    candidates: Sequence[str | os.PathLike] = (),
    ckpt_path: str | os.PathLike | None = None,
    in_channels: int = 1,
) -> tuple[list[dict[str, Any]], Path]:
    """Rank the images of a training's last ensemble (and unscribbled candidates) and write the suggestions.

    Writes ``suggestions.json`` (the ranked entries with their regions), ``suggestions.csv`` (one row per image) and,
    with ``figures``, one picture per suggested image (``<rank>_<name>.png``, :func:`suggestion_figure`) into
    ``out_dir`` (default ``<run_dir>/suggestions``).

    Args:
        run_dir: the training's ``output_dir`` (``runs/train`` for the default run).
        top: how many images (slices) to suggest.
        max_regions: regions per image.
        out_dir: where to write.
        figures: also write the pictures.
        candidates: 2D images without scribbles to rank as well (:func:`candidate_uncertainty`); images of the run
            are skipped. Their maps go to ``<out_dir>/candidates``.
        ckpt_path: the trained weights, needed with ``candidates``.
        in_channels: the model's input channels, with ``candidates``.

    Returns:
        the suggestions (best first) and the output folder.

    Raises:
        FileNotFoundError: no ensemble summary in ``run_dir`` and no candidates, or candidates without weights.
    """
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "suggestions"
    try:
        summary, folder = load_summary(run_dir)
    except FileNotFoundError:
        if not candidates:
            raise
        summary, folder = {"tau": 0.8, "threshold": uncertain_threshold(0.8), "items": []}, out
    out.mkdir(parents=True, exist_ok=True)
    threshold = float(summary.get("threshold", 0.4))
    if candidates:
        if ckpt_path is None or not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"candidates need the trained weights: no model at {ckpt_path}")
        known = {str(Path(e["image"]).resolve()) for e in summary.get("items", []) if e.get("image")}
        extra = _candidate_entries(candidates, known, ckpt_path, in_channels, out / "candidates",
                                   float(summary.get("tau", 0.8)))
        summary = {**summary, "items": [*summary.get("items", []), *extra]}
    chosen = []
    for rank, entry in enumerate(rank_items(summary)[: max(0, int(top))], start=1):
        u = _map(folder, entry)
        regions = uncertain_regions(u, threshold, max_regions=max_regions)
        name = Path(entry.get("image") or entry["id"]).name
        suggestion = {"rank": rank, **entry, "name": name, "regions": regions}
        if figures:
            image = _read_slice(entry.get("image", ""), entry.get("slice"), summary.get("slice_axis"))
            if image is not None:
                scribble = _read_slice(entry.get("scribble", ""), entry.get("slice"), summary.get("slice_axis"))
                stem = Path(name).stem if entry.get("slice") is None else f"{Path(name).stem}_z{entry['slice']:04d}"
                picture = out / f"{rank:02d}_{stem}.png"
                Image.fromarray(suggestion_figure(image, scribble, u, regions, summary.get("scribble_values"))).save(
                    picture)
                suggestion["picture"] = str(picture)
        chosen.append(suggestion)
    meta = {k: summary.get(k) for k in ("epoch", "step", "tau", "threshold", "definition")}
    (out / "suggestions.json").write_text(json.dumps({**meta, "suggestions": chosen}, indent=1))
    with open(out / "suggestions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "image", "slice", "scribbled", "uncertain_share", "mean_uncertainty",
                         "regions (y0 x0 y1 x1)", "picture"])
        for s in chosen:
            boxes = "; ".join(" ".join(map(str, r["box"])) for r in s["regions"])
            writer.writerow([s["rank"], s.get("image") or s["id"], "" if s.get("slice") is None else s["slice"],
                             "no" if s.get("source") else "yes", s["uncertain_share"], s["mean"], boxes,
                             s.get("picture", "")])
    return chosen, out
