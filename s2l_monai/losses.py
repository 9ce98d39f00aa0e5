"""The Scribble2Label loss: partial cross-entropy on scribbles plus consistency-filtered pseudo-labels.

Lee & Jeong, "Scribble2Label: Scribble-Supervised Cell Segmentation via Self-Generating Pseudo-Labels with
Consistency", MICCAI 2020, eq. (1)-(3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

__all__ = ["ScribbleLoss"]


class ScribbleLoss(_Loss):
    """Scribble2Label loss ``L_total = L_sp + lambda_up * L_up`` (paper eq. 3).

    - ``L_sp`` (eq. 1): mean cross-entropy over the scribbled pixels ``Omega_s``.
    - ``L_up`` (eq. 2): mean cross-entropy against the hard pseudo-label ``argmax_c y_c`` over
      ``Omega_g = {j not in Omega_s : max_c y_{j,c} > tau}``, where ``y`` is the exponential moving average of the
      network's own softmax predictions (see :class:`s2l_monai.ensemble.EMAStore`). For two classes
      ``max_c y_c = max(y, 1 - y)``, exactly the paper's criterion.

    Pixels with no pseudo-label (an item not ensembled yet) must carry all-zero probabilities: they never pass
    ``tau`` and so never enter ``Omega_g``. Both means are taken over all selected pixels of the batch; an empty
    ``Omega_s`` or ``Omega_g`` contributes 0 (never NaN) and keeps the graph differentiable.

    During warm-up (paper: the first ``E_W`` epochs) set :attr:`pseudo_label_enabled` to False; the pseudo-label
    term is then still measured (for logging) but not added. :class:`s2l_monai.handlers.ScribbleLossHandler` does
    this from the trainer's epoch.

    After each call, :attr:`terms` holds the detached values ``loss_sp``, ``loss_up`` and ``omega_g`` (the share
    of unscribbled pixels in ``Omega_g``), for logging.

    Class weights (an extension, not in the paper; default off): scribbles are not a random sample of the
    pixels. Skeleton-like strokes put far more of their pixels on the foreground than the image holds (automatic
    DSB2018 scribbles: 36% foreground against 14% of the pixels), so an unweighted ``L_sp`` learns a foreground
    prior that is too high and the network over-segments. ``class_weights`` turns ``L_sp`` into the weighted mean
    ``sum_j w_{s_j} CE_j / sum_j w_{s_j}`` (the convention of ``torch.nn.CrossEntropyLoss(weight=...)``), so
    e.g. ``[3, 1]`` counts a background scribble pixel three times. ``pseudo_class_weights`` does the same for
    ``L_up`` (weights by the pseudo-label's class); left ``None``, ``L_up`` is the paper's plain mean.

    Args:
        tau: consistency threshold of eq. (2) (paper: 0.8; 0.95 for MoNuSeg).
        lambda_up: weight of ``L_up`` (paper: 0.5).
        class_weights: one weight per class for the scribbled pixels in ``L_sp``; ``None`` (the paper) = all 1.
        pseudo_class_weights: one weight per class for the pseudo-labelled pixels in ``L_up``; ``None`` = all 1.
        unlabelled: scribble value of unlabelled pixels (ignored by ``L_sp``).
        pseudo_label_enabled: whether ``L_up`` is added to the loss.
        reduction: only ``"mean"``: both terms are means over their pixel sets, as in the paper.
    """

    def __init__(
        self,
        tau: float = 0.8,
        lambda_up: float = 0.5,
        class_weights: Sequence[float] | None = None,
        pseudo_class_weights: Sequence[float] | None = None,
        unlabelled: int = 255,
        pseudo_label_enabled: bool = True,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if self.reduction != LossReduction.MEAN.value:
            raise ValueError(f"ScribbleLoss supports reduction='mean' only (means over pixel sets), got {reduction!r}.")
        if not 0.0 <= tau < 1.0:
            raise ValueError(f"tau must be in [0, 1), got {tau}.")
        if lambda_up < 0:
            raise ValueError(f"lambda_up must be >= 0, got {lambda_up}.")
        self.class_weights = self._check_weights("class_weights", class_weights)
        self.pseudo_class_weights = self._check_weights("pseudo_class_weights", pseudo_class_weights)
        self.tau = float(tau)
        self.lambda_up = float(lambda_up)
        self.unlabelled = int(unlabelled)
        self.pseudo_label_enabled = bool(pseudo_label_enabled)
        self.terms: dict[str, float] = {}

    def forward(self, input: torch.Tensor, target: torch.Tensor, pseudo: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the loss.

        Args:
            input: logits ``BCHW`` (or ``BCHWD``), ``C >= 2``; softmax is applied here.
            target: scribbles ``B1HW`` holding class indices and :attr:`unlabelled`; or ``B(1+C)HW`` with the
                scribbles in channel 0 and the pseudo-label probabilities in channels ``1..C`` (the layout
                :func:`s2l_monai.engine.prepare_scribble_batch` builds for MONAI's ``SupervisedTrainer``).
            pseudo: pseudo-label probabilities ``BCHW`` (all zeros where there is none); overrides the ones
                packed in ``target``.

        Returns:
            the scalar loss.
        """
        num_classes = input.shape[1]
        if num_classes < 2:
            raise ValueError(f"ScribbleLoss needs logits with at least 2 channels, got shape {tuple(input.shape)}.")
        if target.shape[1] == 1 + num_classes and pseudo is None:
            target, pseudo = target[:, :1], target[:, 1:]
        elif target.shape[1] != 1:
            raise ValueError(
                f"target must have 1 channel (scribbles) or 1 + C = {1 + num_classes} channels (scribbles and "
                f"pseudo-label), got shape {tuple(target.shape)}."
            )
        if target.shape[2:] != input.shape[2:]:
            raise ValueError(f"spatial shapes differ: input {tuple(input.shape)}, target {tuple(target.shape)}.")

        scribble = target[:, 0].round().long()
        labelled = scribble != self.unlabelled
        if labelled.any() and int(scribble[labelled].max()) >= num_classes:
            raise ValueError(
                f"scribble values must be class indices < {num_classes} or the unlabelled value {self.unlabelled}; "
                f"found {int(scribble[labelled].max())}."
            )
        log_prob = F.log_softmax(input.float(), dim=1)
        # eq. (1): cross-entropy on the scribbled pixels only (optionally class-weighted, see the class docstring)
        weight = self._pixel_weights("class_weights", self.class_weights, log_prob, scribble, labelled)
        loss_sp = self._masked_nll(log_prob, scribble, labelled, weight)

        loss_up = log_prob.sum() * 0.0
        omega_g_share = 0.0
        if pseudo is not None:
            if pseudo.shape[1] != num_classes or pseudo.shape[2:] != input.shape[2:]:
                raise ValueError(f"pseudo must have shape {tuple(input.shape)}, got {tuple(pseudo.shape)}.")
            confidence, hard = pseudo.float().max(dim=1)
            omega_g = (confidence > self.tau) & ~labelled
            # eq. (2): cross-entropy against the consistent pseudo-labels
            weight = self._pixel_weights("pseudo_class_weights", self.pseudo_class_weights, log_prob, hard, omega_g)
            loss_up = self._masked_nll(log_prob, hard, omega_g, weight)
            unlabelled_count = int((~labelled).sum())
            omega_g_share = float(omega_g.sum()) / unlabelled_count if unlabelled_count else 0.0

        loss = loss_sp + self.lambda_up * loss_up if self.pseudo_label_enabled else loss_sp
        self.terms = {"loss_sp": float(loss_sp.detach()), "loss_up": float(loss_up.detach()), "omega_g": omega_g_share}
        return loss

    @staticmethod
    def _check_weights(name: str, weights: Sequence[float] | None) -> list[float] | None:
        if weights is None:
            return None
        weights = [float(w) for w in weights]
        if not weights or min(weights) < 0 or max(weights) <= 0:
            raise ValueError(f"{name} must be >= 0 with at least one > 0, got {weights}.")
        return weights

    @staticmethod
    def _pixel_weights(
        name: str, weights: list[float] | None, log_prob: torch.Tensor, classes: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor | None:
        """Weight per pixel ``BHW`` looked up from ``weights`` by ``classes`` (0 outside ``mask``); None if off."""
        if weights is None:
            return None
        if len(weights) != log_prob.shape[1]:
            raise ValueError(f"{name} has {len(weights)} entries for {log_prob.shape[1]} classes.")
        table = torch.tensor(weights, dtype=log_prob.dtype, device=log_prob.device)
        return table[torch.where(mask, classes, torch.zeros_like(classes))]

    @staticmethod
    def _masked_nll(
        log_prob: torch.Tensor, classes: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(Weighted) mean negative log-likelihood of ``classes`` over the pixels in ``mask``.

        Args:
            log_prob: log-probabilities ``BCHW``.
            classes: class index per pixel ``BHW``.
            mask: pixels taken into the mean ``BHW``.
            weight: optional weight per pixel ``BHW``; the mean is then ``sum(w * nll) / sum(w)``.

        Returns:
            the scalar mean; 0 (with a graph) if ``mask`` (or its total weight) is empty.
        """
        w = mask.to(log_prob.dtype) if weight is None else weight * mask
        total = w.sum()
        if total == 0:
            return log_prob.sum() * 0.0
        safe = torch.where(mask, classes, torch.zeros_like(classes))
        nll = -log_prob.gather(1, safe.unsqueeze(1)).squeeze(1)
        return (nll * w).sum() / total
