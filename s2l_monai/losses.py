"""The Scribble2Label loss: partial cross-entropy on scribbles plus consistency-filtered pseudo-labels.

Lee & Jeong, "Scribble2Label: Scribble-Supervised Cell Segmentation via Self-Generating Pseudo-Labels with
Consistency", MICCAI 2020, eq. (1)-(3). Also the CRF regulariser of the paper's "rLoss" baseline (Tang et al.,
"On Regularized Losses for Weakly-supervised CNN Segmentation", ECCV 2018), :class:`CRFLoss`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from s2l_monai.crf import MIN_EXPONENT, window_pairs

__all__ = ["CRFLoss", "ScribbleLoss"]


class CRFLoss(_Loss):
    """Relaxed Potts (dense CRF) regulariser of Tang et al., ECCV 2018, truncated to a local window.

    With ``S_k`` the softmax of class ``k`` over the pixels, Tang et al.'s CRF loss is the relaxed Potts energy
    ``sum_k S_k^T W (1 - S_k)`` with the bilateral affinity

    ``W_ij = exp(-|x_i - x_j|^2 / (2 sigma_xy^2) - |I_i - I_j|^2 / (2 sigma_intensity^2))``

    (``x`` pixel positions, ``I`` intensities; with several image channels ``|I_i - I_j|^2`` sums over them).
    It penalises class changes between near pixels of similar intensity, so it pulls the prediction of the
    unlabelled pixels towards the image edges. Here ``W`` is truncated to the square (cubic in 3D) window of
    ``radius`` pixels around ``i``, ``j != i``, as in the "gated CRF loss" (Obukhov et al., 2019): a fully dense
    ``W`` needs a permutohedral lattice, which PyTorch does not have. Offsets are taken by slicing, so pixels at
    the border have fewer neighbours (no wrap-around). The loss is normalised to

    ``L_crf = 1 / (|M| N) sum_{i in M} sum_{j in window(i)} W_ij sum_k p_ik (1 - p_jk)``,

    ``M`` the pixels of ``mask`` (default all), ``N = (2 radius + 1)^d - 1`` the number of offsets; as
    ``W_ij <= 1`` and ``sum_k p_ik (1 - p_jk) = 1 - <p_i, p_j> in [0, 1]`` it lies in ``[0, 1]`` whatever the
    image size, and is 0 for a hard prediction constant over each window.

    Why hand-written: MONAI has no CRF *loss* (``monai.networks.blocks.CRF`` is a mean-field CRF layer). The
    forward pass visits each unordered pair once and accumulates the gradient on the way (one tensor the size of
    the logits instead of one saved tensor per offset): logits 16x2x128x128, radius 5, take about 50 ms forward
    and backward on two CPU threads. The image is a constant: it gets no gradient.

    Args:
        sigma_xy: spatial bandwidth in pixels (Tang et al.: 100, which makes ``W`` nearly flat over the window).
        sigma_intensity: intensity bandwidth in image units (Tang et al.: 15 on 0-255 intensities; this project
            scales images to [0, 1], so 15/255).
        radius: half-width of the window in pixels (window ``2 radius + 1`` wide), >= 1.
        reduction: only ``"mean"`` (the normalised mean above).
    """

    def __init__(
        self,
        sigma_xy: float = 100.0,
        sigma_intensity: float = 15.0 / 255.0,
        radius: int = 5,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if self.reduction != LossReduction.MEAN.value:
            raise ValueError(f"CRFLoss supports reduction='mean' only, got {reduction!r}.")
        if sigma_xy <= 0 or sigma_intensity <= 0:
            raise ValueError(f"sigma_xy and sigma_intensity must be > 0, got {sigma_xy}, {sigma_intensity}.")
        if int(radius) != radius or radius < 1:
            raise ValueError(f"radius must be an integer >= 1, got {radius}.")
        self.sigma_xy = float(sigma_xy)
        self.sigma_intensity = float(sigma_intensity)
        self.radius = int(radius)

    def forward(self, input: torch.Tensor, image: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the loss.

        Args:
            input: logits ``BCHW`` (or ``BCHWD``), ``C >= 2``; softmax is applied here.
            image: the network's input ``BC'HW`` (or ``BC'HWD``), same batch and spatial shape.
            mask: optional ``B1HW`` (``B1HWD``): the pixels ``i`` taken into the mean (nonzero = in); their
                neighbours ``j`` may lie outside it. ``None`` = all pixels.

        Returns:
            the scalar loss, float32; 0 (with a graph) if ``mask`` is empty.
        """
        if input.ndim < 3 or input.shape[1] < 2:
            raise ValueError(f"CRFLoss needs logits B C spatial with C >= 2, got shape {tuple(input.shape)}.")
        if image.ndim != input.ndim or image.shape[0] != input.shape[0] or image.shape[2:] != input.shape[2:]:
            raise ValueError(f"image shape {tuple(image.shape)} does not match logits {tuple(input.shape)}.")
        if mask is not None and (mask.ndim != input.ndim or mask.shape[1] != 1 or mask.shape[2:] != input.shape[2:]):
            raise ValueError(f"mask must have shape B1 + spatial {tuple(input.shape[2:])}, got {tuple(mask.shape)}.")
        prob = F.softmax(input.float(), dim=1).contiguous()
        num_offsets = (2 * self.radius + 1) ** (input.ndim - 2) - 1
        if mask is None:
            count = float(prob[:, 0].numel())
        else:
            mask = (mask.detach() != 0).to(prob.dtype).expand(prob.shape[0], 1, *prob.shape[2:]).contiguous()
            count = float(mask.sum())
            if count == 0:
                return prob.sum() * 0.0
        total = _PairwisePotts.apply(
            prob,
            image.detach().float() / (math.sqrt(2.0) * self.sigma_intensity),
            mask,
            self.radius,
            1.0 / (2.0 * self.sigma_xy**2),
        )
        return total / (count * num_offsets)


class _PairwisePotts(torch.autograd.Function):
    """``sum_{i in M} sum_{j in window(i)} W_ij (1 - <p_i, p_j>)`` with its gradient built in the forward pass.

    Each unordered pair ``{i, j = i + d}`` is visited once (one of ``d`` and ``-d``) with the weight
    ``w = W_ij (m_i + m_j)`` (both ordered pairs). ``G_i = sum_{pairs (i, j)} w p_j`` is accumulated into one tensor
    the size of ``p``; since ``sum_k p_jk = 1``, ``sum_k G_ik`` is the total weight at ``i`` and the energy is
    ``<1 - p, G> / 2``, its gradient ``-G``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        prob: torch.Tensor,
        image: torch.Tensor,
        mask: torch.Tensor | None,
        radius: int,
        spatial_scale: float,
    ) -> torch.Tensor:
        """``image`` is pre-divided by ``sqrt(2) sigma_intensity``; ``spatial_scale = 1 / (2 sigma_xy^2)``."""
        spatial = prob.shape[2:]
        gathered = torch.zeros_like(prob)
        per_channel = image[:, :1].numel()
        diff_buffer = image.new_empty(image.numel())
        weight_buffer = image.new_empty(per_channel)
        shift_tensor = image.new_empty(())
        # without a mask both ordered pairs count: a factor 2 folded into the exponent
        log_pair_factor = math.log(2.0) if mask is None else 0.0
        for slice_a, slice_b, squared_distance in window_pairs(spatial, radius):
            image_a, image_b = image[slice_a], image[slice_b]
            diff = torch.sub(image_a, image_b, out=diff_buffer[: image_a.numel()].view(image_a.shape))
            shape = (image_a.shape[0], 1, *image_a.shape[2:])
            exponent = weight_buffer[: math.prod(shape)].view(shape)
            # w = exp(-|dI|^2 / (2 s_I^2) - |d|^2 / (2 s_xy^2)) (m_i + m_j); the exponent in one fused op for grey
            # images (sub, addcmul, clamp, exp: a third less memory traffic than separate mul/add/neg)
            shift = log_pair_factor - spatial_scale * squared_distance
            if image.shape[1] == 1:
                torch.addcmul(shift_tensor.fill_(shift), diff, diff, value=-1.0, out=exponent)
            else:
                torch.sum(diff.mul_(diff), dim=1, keepdim=True, out=exponent).neg_().add_(shift)
            weight = exponent.clamp_(min=MIN_EXPONENT).exp_()
            if mask is not None:
                weight.mul_(mask[slice_a] + mask[slice_b])
            gathered[slice_a].addcmul_(weight, prob[slice_b])
            gathered[slice_b].addcmul_(weight, prob[slice_a])
        ctx.save_for_backward(gathered)
        return 0.5 * ((1.0 - prob) * gathered).sum()

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        (gathered,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return -grad_output * gathered, None, None, None, None


class ScribbleLoss(_Loss):
    """Scribble2Label loss ``L_total = L_sp + lambda_up * L_up (+ crf_weight * L_crf)`` (paper eq. 3).

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

    After each call, :attr:`terms` holds the detached values ``loss_sp``, ``loss_up``, ``loss_crf`` (0 when off) and
    ``omega_g`` (the share of unscribbled pixels in ``Omega_g``), for logging.

    CRF regulariser (the paper's "rLoss" baseline, Tang et al. 2018; default off): ``crf_weight > 0`` adds
    ``crf_weight * L_crf``, :class:`CRFLoss` over all pixels of the batch, from the first step (no warm-up);
    with ``lambda_up = 0`` this is the rLoss baseline (partial cross-entropy plus CRF loss). It needs the image:
    pass ``image=`` or pack it as the last ``image_channels`` channels of ``target``
    (:class:`s2l_monai.engine.PrepareScribbleBatch` with ``image_in_target=True``).

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
        crf_weight: weight of the CRF term ``L_crf``; 0 (default) = off, not computed.
        crf_sigma_xy: :class:`CRFLoss` spatial bandwidth in pixels.
        crf_sigma_intensity: :class:`CRFLoss` intensity bandwidth in image units (images scaled to [0, 1]).
        crf_radius: :class:`CRFLoss` window half-width in pixels.
        image_channels: number of trailing image channels packed in ``target`` (0 = none); set it to the
            network's input channels when ``PrepareScribbleBatch(image_in_target=True)``. They are stripped (and
            ignored when ``crf_weight == 0``).
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
        crf_weight: float = 0.0,
        crf_sigma_xy: float = 100.0,
        crf_sigma_intensity: float = 15.0 / 255.0,
        crf_radius: int = 5,
        image_channels: int = 0,
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
        if crf_weight < 0:
            raise ValueError(f"crf_weight must be >= 0, got {crf_weight}.")
        if int(image_channels) != image_channels or image_channels < 0:
            raise ValueError(f"image_channels must be an integer >= 0, got {image_channels}.")
        self.crf_weight = float(crf_weight)
        self.crf = CRFLoss(sigma_xy=crf_sigma_xy, sigma_intensity=crf_sigma_intensity, radius=crf_radius)
        self.image_channels = int(image_channels)
        self.terms: dict[str, float] = {}

    def forward(
        self,
        input: torch.Tensor,
        target: torch.Tensor,
        pseudo: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            input: logits ``BCHW`` (or ``BCHWD``), ``C >= 2``; softmax is applied here.
            target: scribbles ``B1HW`` holding class indices and :attr:`unlabelled`; or ``B(1+C)HW`` with the
                scribbles in channel 0 and the pseudo-label probabilities in channels ``1..C`` (the layout
                :class:`s2l_monai.engine.PrepareScribbleBatch` builds for MONAI's ``SupervisedTrainer``). With
                ``image_channels = C' > 0`` the last ``C'`` channels are the image: ``B(1+C')HW`` or
                ``B(1+C+C')HW``.
            pseudo: pseudo-label probabilities ``BCHW`` (all zeros where there is none); overrides the ones
                packed in ``target``.
            image: the network input ``BC'HW`` for the CRF term; overrides the one packed in ``target``.

        Returns:
            the scalar loss.
        """
        num_classes = input.shape[1]
        if num_classes < 2:
            raise ValueError(f"ScribbleLoss needs logits with at least 2 channels, got shape {tuple(input.shape)}.")
        if self.image_channels:
            if target.shape[1] not in (1 + self.image_channels, 1 + num_classes + self.image_channels):
                raise ValueError(
                    f"target must have 1 + image_channels = {1 + self.image_channels} channels (scribbles and image) "
                    f"or 1 + C + image_channels = {1 + num_classes + self.image_channels} (scribbles, pseudo-label "
                    f"and image), got shape {tuple(target.shape)}."
                )
            if image is None:
                image = target[:, target.shape[1] - self.image_channels :]
            target = target[:, : target.shape[1] - self.image_channels]
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
        loss_crf = 0.0
        if self.crf_weight > 0:
            if image is None:
                raise ValueError(
                    "crf_weight > 0 needs the image: pass image= or pack it in target (image_channels > 0)."
                )
            crf = self.crf(input, image)
            loss = loss + self.crf_weight * crf
            loss_crf = float(crf.detach())
        self.terms = {
            "loss_sp": float(loss_sp.detach()),
            "loss_up": float(loss_up.detach()),
            "loss_crf": loss_crf,
            "omega_g": omega_g_share,
        }
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
