"""Inferers: whole-image inference for fully convolutional networks (the EMA ensemble's default), flip averaging,
mixed precision."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from monai.inferers import Inferer

__all__ = ["AutocastInferer", "FlipAveragingInferer", "WholeImageInferer"]


class WholeImageInferer(Inferer):
    """Run the network once on the whole image, padded to a multiple of ``divisible`` and cropped back.

    The Scribble2Label ensemble (paper, Sec. 2.2) predicts every training image every γ epochs, so its cost grows
    with the dataset. MONAI's ``SlidingWindowInferer`` pads an image smaller than the window up to the window and
    overlaps windows on larger ones; for a fully convolutional U-Net neither is needed. Measured on the 328
    DSB-Fluo training images (46.6 M pixels, the 2-level UNet that was the default until v0.14, 2 CPU cores):
    sliding windows of 256x256 with 25% overlap and Gaussian blending 26.0 s, whole images 12.8 s. MONAI has no
    inferer that pads to the
    network's divisor, runs once and crops (``SimpleInferer`` fails on sizes the network cannot halve), hence this
    class. Images above ``max_pixels`` (per sample) go to ``fallback`` so that memory stays bounded.

    Args:
        divisible: pad each spatial size up to a multiple of this (the product of the network's strides; 32 covers
            ResNet/EfficientNet encoders, 4 the default UNet).
        max_pixels: largest spatial size (pixels or voxels per sample) run whole; larger inputs use ``fallback``.
        fallback: inferer for larger inputs, e.g. a ``SlidingWindowInferer``; None runs every input whole.
        mode: padding mode of ``torch.nn.functional.pad`` (``"reflect"`` falls back to ``"replicate"`` where a pad
            is not smaller than the size it pads, which reflection cannot do).

    Example::

        inferer = WholeImageInferer(divisible=32, fallback=SlidingWindowInferer((256, 256)))
        logits = inferer(images_BCHW, network)  # BC'HW, same H and W as the input
    """

    def __init__(
        self,
        divisible: int = 32,
        max_pixels: int | None = 2**21,
        fallback: Inferer | None = None,
        mode: str = "reflect",
    ) -> None:
        super().__init__()
        if divisible < 1:
            raise ValueError(f"divisible must be >= 1, got {divisible}.")
        self.divisible = int(divisible)
        self.max_pixels = None if max_pixels is None else int(max_pixels)
        self.fallback = fallback
        self.mode = mode

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Predict ``inputs`` (``BC`` + spatial) with ``network``; returns ``BC'`` + the same spatial size."""
        spatial = tuple(int(s) for s in inputs.shape[2:])
        if self.fallback is not None and self.max_pixels is not None and math.prod(spatial) > self.max_pixels:
            return self.fallback(inputs, network, *args, **kwargs)
        pads = [(-s) % self.divisible for s in spatial]
        # a plain tensor through the network: a MetaTensor would route each of its ~130 operations through
        # MetaTensor.__torch_function__ (measured: 1.6 of 16.8 ms per 256x256 forward pass of the default UNet)
        data = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
        if not any(pads):
            return network(data, *args, **kwargs)
        mode = self.mode
        if mode == "reflect" and any(p >= s for p, s in zip(pads, spatial)):
            mode = "replicate"
        # F.pad takes (last_lo, last_hi, ..., first_lo, first_hi); pad only at the high end so cropping is [:s]
        flat = [v for p in reversed(pads) for v in (0, p)]
        out = network(F.pad(data, flat, mode=mode), *args, **kwargs)
        crop = (slice(None), slice(None), *(slice(0, s) for s in spatial))
        return out[crop]


class FlipAveragingInferer(Inferer):
    """Average the predictions of ``inferer`` over the flips of the input (test-time augmentation).

    For each flip ``F`` in ``flips`` (tuples of spatial axes; ``()`` is the identity), predict ``F(x)``, flip the
    logits back and average: ``mean_F F^-1(net(F(x)))``. Flips are exact symmetries of the pixel grid, so no
    interpolation enters. MONAI's ``TestTimeAugmentation`` draws random transforms and inverts them through the
    metadata of a dictionary pipeline, for uncertainty estimates; a fixed, deterministic flip average inside an
    inferer (usable by any engine, the EMA ensemble included) is not in MONAI, hence this class.

    Args:
        inferer: the inferer run on each flipped input (e.g. ``SlidingWindowInferer`` or :class:`WholeImageInferer`).
        flips: spatial axes to flip, counted from the first spatial axis (0 = H, 1 = W); default the identity, both
            single flips and their combination (4 passes in 2D).
    """

    def __init__(
        self, inferer: Inferer, flips: tuple[tuple[int, ...], ...] = ((), (0,), (1,), (0, 1))
    ) -> None:
        super().__init__()
        if not flips:
            raise ValueError("flips must hold at least one entry (() is the identity).")
        self.inferer = inferer
        self.flips = tuple(tuple(int(a) for a in f) for f in flips)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Predict ``inputs`` (``BC`` + spatial); returns the mean logits ``BC'`` + the same spatial size."""
        total = None
        for flip in self.flips:
            dims = [2 + a for a in flip]
            x = torch.flip(inputs, dims) if dims else inputs
            out = self.inferer(x, network, *args, **kwargs)
            out = torch.flip(out, dims) if dims else out
            total = out if total is None else total + out
        return total / len(self.flips)


class AutocastInferer(Inferer):
    """Run ``inferer`` under ``torch.autocast`` and hand back float32 outputs.

    The training forward pass in bfloat16 where the hardware has it (:func:`s2l_monai.precision.resolve_precision`):
    convolutions run in bfloat16, the weights and their optimiser state stay float32, and the loss sees float32
    logits. The backward pass runs outside the autocast context, as PyTorch's AMP recipe prescribes (it reuses the
    forward's dtypes). MONAI's ``SupervisedTrainer(amp=True)`` autocasts on CUDA only and with float16 and a
    gradient scaler; an inferer is the one place of its ``_iteration`` that sees the forward call on any device,
    and wrapping it there leaves the network itself (and DDP's wrapper of it) unchanged, hence this class.

    Args:
        inferer: the inferer to wrap (MONAI's ``SimpleInferer`` in training).
        dtype: the autocast dtype, e.g. ``torch.bfloat16``; None runs ``inferer`` unchanged (float32).

    Example::

        inferer = AutocastInferer(SimpleInferer(), torch.bfloat16)
        logits = inferer(images_BCHW, network)  # float32 BC'HW
    """

    def __init__(self, inferer: Inferer, dtype: torch.dtype | None = torch.bfloat16) -> None:
        super().__init__()
        self.inferer = inferer
        self.dtype = dtype

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Predict ``inputs`` (``BC`` + spatial) with ``network``; returns float32 ``BC'`` + spatial."""
        if self.dtype is None:
            return self.inferer(inputs, network, *args, **kwargs)
        with torch.autocast(device_type=inputs.device.type, dtype=self.dtype):
            out = self.inferer(inputs, network, *args, **kwargs)
        return out.float() if torch.is_tensor(out) else out
