"""Dictionary transforms for scribble-supervised training."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, get_track_meta
from monai.transforms import MapTransform, ScaleIntensityRange, ScaleIntensityRangePercentiles
from monai.transforms import ScaleIntensityRangePercentilesd as _MonaiScaleIntensityRangePercentilesd
from monai.transforms.traits import RandomizableTrait
from monai.transforms.utils_pytorch_numpy_unification import percentile
from monai.utils import convert_to_tensor

from s2l_monai.crf import mean_field_refine
from s2l_monai.ensemble import EMAStore
from s2l_monai.instances import second_channel_wins

__all__ = [
    "Argmaxd",
    "EnsureImageChannelsd",
    "LoadPseudoLabeld",
    "MeanFieldRefined",
    "ReplaceNonFinited",
    "ScaleIntensityRangePercentilesd",
    "SelectPercentiles",
    "channel_argmax",
]

# ITU-R BT.601 luma weights, as PIL's "L" conversion uses.
_LUMA = (0.299, 0.587, 0.114)


class ReplaceNonFinited(MapTransform):
    """Replace NaN and infinite pixels of each channel by that channel's finite median (a no-op on finite images).

    MONAI's intensity transforms propagate NaN (a percentile of an array holding NaN is NaN), so one bad pixel turns
    the whole normalised image, and after one step every weight, into NaN. Files with non-finite pixels are refused
    at the door (:mod:`s2l_monai.data.checks`) unless the config key ``nonfinite_pixels`` is ``"replace"``; this
    transform then does the replacement, before the intensity scaling. A channel with no finite pixel becomes 0.

    Args:
        keys: keys of channel-first images.
        allow_missing_keys: do not raise if a key is missing.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key])
            if not torch.is_floating_point(image):
                continue  # integer images hold no NaN
            if bool(torch.isfinite(image.sum())):
                continue  # a NaN or infinity makes the sum non-finite (0.1 of the cost of a mask of every pixel)
            finite = torch.isfinite(image)
            if bool(finite.all()):
                continue
            fixed = image.clone()
            for c in range(fixed.shape[0]):
                good = fixed[c][finite[c]]
                fixed[c][~finite[c]] = good.median() if good.numel() else 0.0
            d[key] = fixed
        return d


class SelectPercentiles(ScaleIntensityRangePercentiles):
    """MONAI's ``ScaleIntensityRangePercentiles`` with its percentiles found by selection instead of sorting.

    MONAI computes each percentile of a tensor with ``torch.quantile``, a full sort of every pixel, and uses
    ``np.percentile`` (introselect, the same linear interpolation) for NumPy arrays and above 10^6 elements.
    Profiled on idle cores (200 images of 256x256, no flips, whole-image inference, watershed instances): the two
    sorts took 7.5 ms per image, 11.5% of the end-to-end time. Handing MONAI's own normalisation a NumPy view of the
    channel takes it down its ``np.percentile`` path, and both percentiles come from one call (one selection pass
    for the two: 1.5 against 2.6 ms per 256x256 channel, measured beside a training); the rest (relative ranges,
    clipping, dtype) is MONAI's ``ScaleIntensityRange`` as MONAI's ``_normalize`` calls it (same values, bit for bit:
    ``tests/test_transforms.py``). Integer channels are handed over as float32: MONAI casts a NumPy percentile to
    the input's dtype, which would truncate it for integer images (the tensor path refuses them).
    """

    def _normalize(self, img: Any) -> Any:
        array = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        if not np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float32)
        # MONAI's _normalize (monai 1.6), its two percentile calls made one
        a_min, a_max = (np.asarray(v) for v in percentile(array, [self.lower, self.upper]))
        b_min, b_max = self.b_min, self.b_max
        if self.relative:
            if (self.b_min is None) or (self.b_max is None):
                raise ValueError("If it is relative, b_min and b_max should not be None.")
            b_min = ((self.b_max - self.b_min) * (self.lower / 100.0)) + self.b_min
            b_max = ((self.b_max - self.b_min) * (self.upper / 100.0)) + self.b_min
        scaled = ScaleIntensityRange(a_min=a_min, a_max=a_max, b_min=b_min, b_max=b_max, clip=self.clip,
                                     dtype=self.dtype)(array)
        return convert_to_tensor(scaled, track_meta=False)


class ScaleIntensityRangePercentilesd(_MonaiScaleIntensityRangePercentilesd):
    """MONAI's ``ScaleIntensityRangePercentilesd`` (same arguments) with :class:`SelectPercentiles` inside."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = self.scaler
        self.scaler = SelectPercentiles(s.lower, s.upper, s.b_min, s.b_max, s.clip, s.relative, s.channel_wise,
                                        s.dtype)


def channel_argmax(x: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(x, dim=0, keepdim=True)`` as ``x``'s dtype, one comparison per channel.

    Same values as ``torch.argmax`` (the first channel wins ties; a NaN counts as the maximum, the first NaN wins),
    but a CPU ``torch.argmax`` over a short leading axis walks memory across the channels for every pixel: measured
    43 ms for a ``2x520x696`` softmax on one thread, against 0.3 ms for the comparison.

    Args:
        x: ``C`` + spatial tensor, ``C >= 1``.

    Returns:
        ``1`` + spatial tensor of channel indices, in ``x``'s dtype (as MONAI's ``AsDiscrete(argmax=True)``).
    """
    if x.shape[0] == 2:
        return second_channel_wins(x[0], x[1])[None].to(x.dtype)
    best = x[0]
    index = torch.zeros_like(best, dtype=torch.int64)
    best_nan = torch.isnan(best) if best.is_floating_point() else None
    for c in range(1, x.shape[0]):
        value = x[c]
        better = value > best
        if best_nan is not None:
            value_nan = torch.isnan(value)
            better = (better & ~best_nan) | (value_nan & ~best_nan)
            best_nan = best_nan | value_nan
        index[better] = c
        best = torch.where(better, value, best)
    return index[None].to(x.dtype)


class Argmaxd(MapTransform):
    """MONAI's ``AsDiscreted(argmax=True)`` (keeping the channel axis), computed with :func:`channel_argmax`.

    Equal values and dtype, 150 times faster on a two-class CPU prediction (see :func:`channel_argmax`); it was
    the inference post-processing's second largest cost after the watershed.

    With ``foreground_threshold`` other than 0.5, a two-class probability map is read as foreground where channel 1
    exceeds it (the calibrated threshold of :mod:`s2l_monai.calibration`); at 0.5 that is the argmax.

    Args:
        keys: keys of ``C`` + spatial predictions (tensors or arrays); replaced by ``1`` + spatial class indices.
        foreground_threshold: for two-channel probabilities (softmax), foreground where ``x[1] > threshold``.
        allow_missing_keys: do not raise if a key is missing.
    """

    def __init__(self, keys: Any, foreground_threshold: float = 0.5, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.foreground_threshold = float(foreground_threshold)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            x = value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)
            if x.shape[0] == 2 and self.foreground_threshold != 0.5:
                out = (x[1:] > self.foreground_threshold).to(x.dtype)
            else:
                out = channel_argmax(x)
            if isinstance(value, MetaTensor):
                out = MetaTensor(out, meta=dict(value.meta), applied_operations=list(value.applied_operations))
            d[key] = out
        return d


class MeanFieldRefined(MapTransform):
    """Refine predicted class probabilities against the image with a few mean-field CRF steps.

    :func:`s2l_monai.crf.mean_field_refine` on each item (``C`` + spatial probabilities, with the item's image
    under ``image_key``): the outline of each object is pulled onto the image's intensity edges. Placed after the
    softmax and before the threshold (``configs/inference.json``'s ``refine_weight``); 0 leaves the prediction as
    it is. A volume read slice-wise by the bundle arrives here one 2D slice at a time; a whole ``CZYX`` volume
    segmented slice by slice (MONAI Label's 3D task) is refined slice by slice with ``slice_axis``.

    Args:
        keys: keys of ``C`` + spatial probabilities; replaced by the refined ones (same type and metadata).
        image_key: key of the ``C'`` + spatial image the network saw (scaled to [0, 1]).
        weight: strength of the pairwise term (0 = off).
        radius, sigma_xy, sigma_intensity, iterations: see :func:`s2l_monai.crf.mean_field_refine`.
        slice_axis: ``None``: refine in all spatial dimensions; else the spatial axis (0 = the first after the
            channels) whose slices are refined one by one (2D windows).
        allow_missing_keys: do not raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        weight: float = 2.0,
        radius: int = 5,
        sigma_xy: float = 5.0,
        sigma_intensity: float = 0.05,
        iterations: int = 3,
        slice_axis: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.weight = float(weight)
        self.slice_axis = slice_axis
        self.kwargs = {"radius": int(radius), "sigma_xy": float(sigma_xy), "sigma_intensity": float(sigma_intensity),
                       "iterations": int(iterations)}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.weight == 0:
            return d
        image = d[self.image_key]
        image = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(np.asarray(image))
        for key in self.key_iterator(d):
            value = d[key]
            x = value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)
            with torch.no_grad():
                if self.slice_axis is None:
                    out = mean_field_refine(x[None], image[None].to(x.device), self.weight, **self.kwargs)[0]
                else:  # the slices as a batch: C Z Y X -> Z C Y X and back
                    axis = 1 + int(self.slice_axis)
                    out = mean_field_refine(x.movedim(axis, 0), image.movedim(axis, 0).to(x.device), self.weight,
                                            **self.kwargs).movedim(0, axis)
            out = out.to(x.dtype)
            if isinstance(value, MetaTensor):
                out = MetaTensor(out, meta=dict(value.meta), applied_operations=list(value.applied_operations))
            d[key] = out
        return d


class EnsureImageChannelsd(MapTransform):
    """Give every image the channel count the network expects: ``CHW`` in, ``channels`` x ``HW`` out.

    Microscopy files come grey, grey+alpha, RGB or RGBA (the DSB2018 PNGs are RGBA even when grey); MONAI's
    ``EnsureChannelFirstd`` keeps whatever the file has, so this transform drops alpha, turns RGB into grey
    (luma weights) for 1-channel networks and repeats grey for 3-channel ones.

    Args:
        keys: keys of the channel-first images.
        channels: 1 (grey) or 3 (RGB).
        allow_missing_keys: do not raise if a key is missing.
    """

    def __init__(self, keys: KeysCollection, channels: int = 1, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}.")
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.convert(d[key], key)
        return d

    def convert(self, image: torch.Tensor, key: Hashable = "image") -> torch.Tensor:
        c = image.shape[0]
        if c in (2, 4):  # drop alpha
            image = image[: c - 1]
            c -= 1
        if c not in (1, 3):
            raise ValueError(f"{key!r} has {image.shape[0]} channels; expected grey, grey+alpha, RGB or RGBA.")
        if c == self.channels:
            return image
        if self.channels == 1:
            weights = torch.as_tensor(_LUMA, dtype=torch.float32).view(3, *([1] * (image.ndim - 1)))
            return (image.float() * weights).sum(0, keepdim=True)
        return image.repeat(3, *([1] * (image.ndim - 1)))


class LoadPseudoLabeld(MapTransform, RandomizableTrait):
    """Load an item's current pseudo-label probabilities from an :class:`~s2l_monai.ensemble.EMAStore`.

    Adds ``key`` as a float32 ``CHW`` tensor (with the reference image's metadata, so every later spatial transform
    given this key moves it exactly like the image and the scribbles; leave it out of intensity transforms). Items
    not ensembled yet get all-zero probabilities, which never pass ``tau`` in :class:`~s2l_monai.losses.ScribbleLoss`.

    The store changes during training, so this transform is a ``RandomizableTrait``: ``CacheDataset`` caches only
    the transforms before it and re-runs it for every sample.

    Args:
        keys: the output key (one), e.g. ``"pseudo"``.
        store: the EMA store.
        id_key: key of the item's id.
        ref_key: key of the image whose spatial shape and metadata the map takes.
        slice_key: key of the slice index of a volume item (:func:`s2l_monai.volumes.slice_items`): its slice of the
            item's pseudo-label volume is read (memory-mapped); items without it are 2D.
    """

    def __init__(
        self,
        keys: KeysCollection,
        store: EMAStore,
        id_key: str = "id",
        ref_key: str = "image",
        slice_key: str = "slice",
    ) -> None:
        super().__init__(keys)
        self.store = store
        self.id_key = id_key
        self.ref_key = ref_key
        self.slice_key = slice_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ref = d[self.ref_key]
        spatial = tuple(ref.shape[1:])
        index = d.get(self.slice_key)
        prob = self.store.probabilities(str(d[self.id_key]), None if index is None else int(index))
        if prob is None:
            prob = np.zeros((self.store.num_classes, *spatial), dtype=np.float32)
        elif prob.shape[1:] != spatial:
            raise ValueError(
                f"pseudo-label of {d[self.id_key]!r} has shape {prob.shape[1:]}, its image {spatial}: the store "
                "must be filled from un-augmented images (same preprocessing up to this transform)."
            )
        tensor = torch.from_numpy(np.ascontiguousarray(prob))
        tracked = isinstance(ref, MetaTensor) and get_track_meta()  # off in the training data-loader workers
        for key in self.keys:
            d[key] = MetaTensor(tensor, meta=dict(ref.meta)) if tracked else tensor
        return d
