"""Batch preparation for MONAI's ``SupervisedTrainer`` with scribbles and pseudo-labels."""

from __future__ import annotations

from typing import Any

import torch
from monai.engines.utils import PrepareBatch
from monai.utils import CommonKeys

__all__ = ["PrepareScribbleBatch"]


class PrepareScribbleBatch(PrepareBatch):
    """Turn a batch dict into ``(image, target)`` for ``SupervisedTrainer`` and :class:`~s2l_monai.losses.ScribbleLoss`.

    ``SupervisedTrainer`` hands the loss one target, so the scribbles ``B1HW`` and, when present, the pseudo-label
    probabilities ``BCHW`` travel concatenated as ``B(1+C)HW``; ``ScribbleLoss`` splits them again.
    With ``image_in_target`` the image ``BC'HW`` is appended last, ``B(1+C')HW`` or ``B(1+C+C')HW``, for the CRF
    term (``ScribbleLoss(crf_weight > 0, image_channels=C')``).

    Args:
        image_key: key of the network input.
        scribble_key: key of the scribbles (class indices, unlabelled value elsewhere).
        pseudo_key: key of the pseudo-label probabilities; missing from the batch means none.
        image_in_target: append the image to the target, after the pseudo-label.
    """

    def __init__(
        self,
        image_key: str = CommonKeys.IMAGE,
        scribble_key: str = "scribble",
        pseudo_key: str = "pseudo",
        image_in_target: bool = False,
    ) -> None:
        self.image_key, self.scribble_key, self.pseudo_key = image_key, scribble_key, pseudo_key
        self.image_in_target = bool(image_in_target)

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image = batchdata[self.image_key]
        target = batchdata[self.scribble_key].float()
        if self.pseudo_key in batchdata:
            target = torch.cat([target, batchdata[self.pseudo_key].float()], dim=1)
        if self.image_in_target:
            target = torch.cat([target, image.float()], dim=1)
        return (
            image.to(device=device, non_blocking=non_blocking, **kwargs),
            target.to(device=device, non_blocking=non_blocking, **kwargs),
        )
