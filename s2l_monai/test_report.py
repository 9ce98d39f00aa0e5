"""How good the model is, said at the end of training: the labelled test split against Otsu's threshold.

When the training datalist has a ``test`` split with full masks (the built-in synthetic set has one), the last step
of ``configs/train.json`` segments it with the trained model through ``configs/inference.json`` +
``configs/evaluate.json`` (the same pipeline as ``python -m monai.bundle run evaluating``), runs the Otsu baseline
(:func:`s2l_monai.evaluation.otsu_baseline`) on the same images, logs both in one line and writes a picture of the
first test image: image | scribbles (or the full mask where the item has none) | model | Otsu.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["comparison_figure", "evaluate_after_training"]

logger = logging.getLogger("s2l")


def _configs_dir(bundle_root: str | os.PathLike) -> Path | None:
    for folder in (Path(bundle_root) / "configs", Path(__file__).resolve().parents[1] / "configs"):
        if (folder / "inference.json").is_file() and (folder / "evaluate.json").is_file():
            return folder
    return None


def _mask_panel(mask: np.ndarray) -> np.ndarray:
    return np.repeat(np.where(mask > 0, np.uint8(255), np.uint8(0))[..., None], 3, axis=-1)


def comparison_figure(
    image: np.ndarray, guide: np.ndarray, prediction: np.ndarray, otsu: np.ndarray, scribbles: bool, unlabelled: int
) -> np.ndarray:
    """uint8 RGB panels ``image | scribbles or mask | model | Otsu`` separated by grey bars.

    Args:
        image: ``HW``/``CHW`` image.
        guide: ``HW`` scribble map (``scribbles``) or full mask.
        prediction: ``HW`` foreground of the model.
        otsu: ``HW`` foreground of Otsu's threshold.
        scribbles: whether ``guide`` is a scribble map (drawn gold / azure on the image) or a mask.
        unlabelled: scribble value of unlabelled pixels.
    """
    from s2l_monai.figures import BACKGROUND_SCRIBBLE, FOREGROUND_SCRIBBLE, to_display

    rgb = to_display(image)
    if scribbles:
        second = rgb.copy()
        second[guide == 0] = BACKGROUND_SCRIBBLE
        second[(guide != 0) & (guide != unlabelled)] = FOREGROUND_SCRIBBLE
    else:
        second = _mask_panel(guide)
    gap = np.full((rgb.shape[0], 4, 3), 128, dtype=np.uint8)
    panels = [rgb, second, _mask_panel(prediction), _mask_panel(otsu)]
    return np.concatenate([x for p in panels for x in (p, gap)][:-1], axis=1)


def evaluate_after_training(
    dataset_dir: str | os.PathLike,
    datalist_name: str,
    model_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    bundle_root: str | os.PathLike = ".",
    slice_axis: Any = None,
    in_channels: int = 1,
    scribble_values: dict[str, int] | None = None,
    enabled: Any = True,
) -> dict[str, Any] | None:
    """Evaluate the trained model and Otsu on the datalist's labelled ``test`` split; log one line.

    Args:
        dataset_dir: the training's dataset folder (or datalist file).
        datalist_name: datalist file name in it.
        model_path: the trained weights (``model.pt``).
        output_dir: where ``summary.json`` / ``metrics.csv`` of both methods and ``comparison.png`` go.
        bundle_root: the bundle folder (its ``configs/`` is used, else the package's).
        slice_axis: the training's ``slice_axis``; volumes are not evaluated here (see ``evaluate.json``).
        in_channels: the network's input channels.
        scribble_values: the datalist's scribble values (for the picture).
        enabled: config flag ``test_evaluation``.

    Returns:
        ``{"model": summary, "otsu": summary, "figure": path}``, or None when skipped (flag off, volumes, no
        labelled test split, configs not found).
    """
    from s2l_monai.data.checks import is_volume_axis
    from s2l_monai.inference_io import as_bool

    if not as_bool(enabled) or is_volume_axis(slice_axis) or not Path(model_path).is_file():
        return None
    from s2l_monai.evaluation import labelled_items, otsu_baseline
    from s2l_monai.metrics import summarise, write_reports

    try:
        items = labelled_items(dataset_dir, "test", datalist_name)
    except ValueError:
        logger.info("no labelled test split in the datalist: no test evaluation at the end of training")
        return None
    configs = _configs_dir(bundle_root)
    if configs is None:
        return None
    from monai.bundle import ConfigParser

    out = Path(output_dir)
    parser = ConfigParser()
    parser.read_config([str(configs / "inference.json"), str(configs / "evaluate.json")])
    parser.update({
        "bundle_root": str(bundle_root), "dataset_dir": str(dataset_dir), "datalist_name": datalist_name,
        "ckpt_path": str(model_path), "output_dir": str(out / "model"), "in_channels": int(in_channels),
        "handlers": [h for h in parser.get("handlers") if not (isinstance(h, dict) and h.get("_target_") ==
                                                                  "StatsHandler")],
    })
    evaluator = parser.get_parsed_content("evaluator")
    evaluator.run()
    model = parser.get_parsed_content("metrics_handler").summary
    otsu_records = otsu_baseline(items, prediction_dir=out / "otsu" / "predictions")
    write_reports(otsu_records, out / "otsu")
    otsu = summarise(otsu_records)

    from s2l_monai.inference_io import image_stem

    first = items[0]
    name = image_stem(first["image"])
    values = scribble_values or {"background": 0, "foreground": 1, "unlabelled": 255}
    image = np.asarray(Image.open(first["image"]))
    guide_path = first.get("scribble") or first["label"]
    guide = np.asarray(Image.open(guide_path))
    prediction = np.asarray(Image.open(out / "model" / "predictions" / f"{name}_semantic.png"))
    otsu_mask = np.asarray(Image.open(out / "otsu" / "predictions" / f"{name}_semantic.png"))
    figure = out / "comparison.png"
    Image.fromarray(
        comparison_figure(image if image.ndim == 2 else np.moveaxis(image, -1, 0), guide, prediction, otsu_mask,
                          scribbles="scribble" in first, unlabelled=int(values["unlabelled"]))
    ).save(figure)
    (out / "comparison.json").write_text(json.dumps({"model": _short(model), "otsu": _short(otsu)}, indent=1))
    logger.info(
        f"test split ({len(items)} images with full masks): this model IoU {model.get('iou', float('nan')):.3f}, "
        f"DSB score {model.get('dsb', float('nan')):.3f}; Otsu threshold IoU {otsu.get('iou', float('nan')):.3f}, "
        f"DSB score {otsu.get('dsb', float('nan')):.3f}. Picture (image | scribbles | model | Otsu): {figure}"
    )
    return {"model": model, "otsu": otsu, "figure": str(figure)}


def _short(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: summary[k] for k in ("n_images", "iou", "mdice", "dsb", "pq", "aji") if k in summary}
