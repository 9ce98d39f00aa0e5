"""Where training starts: the shipped weights by default, a given ``model.pt``, or from scratch.

``pretrained_weights`` in ``configs/train.json`` is ``"auto"`` by default: the network starts from the weights
this project ships (``bundle/models/model.pt``: Scribble2Label trained on DSB2018 fluorescence scribbles) where
they fit the network (same layers and shapes: the default ``UNet`` with one input channel) and the data looks like
what they learned, objects on a background: the scribbles' estimate of the foreground share
(:func:`s2l_monai.data.balance.class_prior`) at most :data:`MAX_FOREGROUND_SHARE`. Otherwise from scratch: RGB
(H&E) images, another ``network_def``, or data whose "foreground" fills most of the image (ISBI EM cell interiors,
70%). Measured on validation splits the weights never saw (``docs/configuration.md``, "Starting from the shipped
weights"): better than from scratch on DSB bright-field (3 seeds) and on synthetic nuclei, worse on ISBI EM. ``""``
trains from scratch; a path fine-tunes that file and must fit the network.

MONAI's ``CheckpointLoader`` still loads the file; this module only decides which one, and says why in the log.
A resumed run (``resume_from``) loads none: its network comes from the checkpoint (``configs/train.json`` sets
``pretrained_path`` to ``""``; the start's loader fires at ``STARTED``, after the resume checkpoint was loaded, and
would overwrite it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from s2l_monai.errors import ConfigError

__all__ = ["MAX_FOREGROUND_SHARE", "SHIPPED_WEIGHTS", "fit_problem", "resolve_pretrained", "shipped_weights"]

logger = logging.getLogger(__name__)

#: Where the shipped weights lie, relative to a bundle root: the repository (``bundle/models/model.pt``) and a
#: model-zoo package (``models/pretrained.pt``: its ``models/model.pt`` is what training writes).
SHIPPED_WEIGHTS = ("bundle/models/model.pt", "models/pretrained.pt")
_NO_WEIGHTS = ("", "none", "null", "false", "scratch")
#: "auto" starts from the shipped weights only where the scribbles' estimated foreground share is at most this: the
#: nuclei they learned cover 2-20% of an image (DSB2018, synthetic), ISBI EM's cell interiors 70% (where starting
#: from them cost IoU 0.004 and DSB score 0.043 on the validation slices).
MAX_FOREGROUND_SHARE = 0.5


def shipped_weights(bundle_root: str | os.PathLike | None = None) -> Path | None:
    """The shipped weights: under ``bundle_root`` (see :data:`SHIPPED_WEIGHTS`), else beside this package's
    repository checkout (so ``s2l train`` run from another folder finds them too); ``None`` where there are none."""
    roots = [Path(bundle_root)] if bundle_root is not None else []
    roots.append(Path(__file__).resolve().parents[1])
    for root in roots:
        for relative in SHIPPED_WEIGHTS:
            path = root / relative
            if path.is_file():
                return path.resolve()
    return None


def _state_dict(path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors of every kind: the user's file is not a weights file
        raise ConfigError(f"pretrained_weights: {path} cannot be read as PyTorch weights ({exc})") from exc
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]  # a checkpoint dict holding the network under "model"
    if not isinstance(state, Mapping):
        raise ConfigError(f"pretrained_weights: {path} is not a state dict of a network")
    return state


def fit_problem(path: str | os.PathLike, network: torch.nn.Module) -> str | None:
    """Why the weights in ``path`` cannot start ``network`` (missing or extra layers, other shapes), or ``None``.

    Args:
        path: a ``model.pt`` (a state dict, or a checkpoint dict with the state dict under ``model``).
        network: the network to start.
    """
    saved = _state_dict(path)
    own = network.state_dict()
    missing = [k for k in own if k not in saved]
    extra = [k for k in saved if k not in own]
    if missing or extra:
        example = (missing or extra)[0]
        return f"other layers ({len(missing)} of this network's missing, {len(extra)} not in it, e.g. {example})"
    first_conv = next((k for k, v in own.items() if v.ndim >= 3), None)
    if first_conv is not None and saved[first_conv].shape[1] != own[first_conv].shape[1]:
        return (f"they take {saved[first_conv].shape[1]}-channel images, this network "
                f"{own[first_conv].shape[1]}-channel ones")
    for key, tensor in own.items():
        if tuple(saved[key].shape) != tuple(tensor.shape):
            return f"other shapes ({key}: {tuple(saved[key].shape)} saved, {tuple(tensor.shape)} here)"
    return None


def resolve_pretrained(
    value: str | os.PathLike | None,
    network: torch.nn.Module,
    bundle_root: str | os.PathLike | None = None,
    items: Any = None,
    unlabelled: int = 255,
    output_dir: str | os.PathLike | None = None,
) -> str:
    """The ``model.pt`` training starts from, or ``""`` (from scratch).

    Args:
        value: ``"auto"`` (the shipped weights where they fit ``network`` and ``items`` look like objects on a
            background, else from scratch), ``""`` / ``none`` (from scratch), or a path (must exist and fit
            ``network``).
        network: the network to start.
        bundle_root: where to look first for the shipped weights (see :func:`shipped_weights`).
        items: the training items (``image`` ``CHW``, ``scribble`` ``1HW``) for the foreground-share check of
            ``"auto"``; ``None`` skips the check.
        unlabelled: scribble value of unlabelled pixels in ``items``.
        output_dir: the run's output folder (shares the class-prior estimate with ``class_weights``).

    Raises:
        ConfigError: a path that does not exist, or whose weights do not fit ``network`` (the message says how).
    """
    text = "" if value is None else str(value).strip()
    if text.lower() in _NO_WEIGHTS:
        logger.info("pretrained_weights: none, the network starts from scratch")
        return ""
    if text.lower() == "auto":
        path = shipped_weights(bundle_root)
        if path is None:
            logger.info("pretrained_weights=auto: no shipped weights found, the network starts from scratch")
            return ""
        problem = fit_problem(path, network)
        if problem is not None:
            logger.info(f"pretrained_weights=auto: the shipped weights {path} do not fit this network, {problem}; "
                        "the network starts from scratch")
            return ""
        if items is not None:
            from s2l_monai.data.balance import class_prior

            share = class_prior(items, unlabelled, output_dir).image_foreground_share
            if share > MAX_FOREGROUND_SHARE:
                logger.info(f"pretrained_weights=auto: the scribbles put about {100 * share:.0f}% of the pixels in "
                            f"the foreground, not objects on a background like the nuclei of the shipped weights "
                            f"{path}; the network starts from scratch")
                return ""
        logger.info(f"pretrained_weights=auto: the network starts from the shipped weights {path} (Scribble2Label "
                    "on DSB2018 fluorescence scribbles); --pretrained_weights '' trains from scratch")
        return str(path)
    if not Path(text).is_file():
        raise ConfigError(f"pretrained_weights: {text} does not exist (\"auto\": the shipped weights where they fit, "
                          "\"\": from scratch)")
    problem = fit_problem(text, network)
    if problem is not None:
        raise ConfigError(f"pretrained_weights: {text} does not fit this network: {problem}")
    logger.info(f"pretrained_weights: the network starts from {text}")
    return text
