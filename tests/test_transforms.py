from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose, EnsureTyped
from monai.utils import set_determinism
from PIL import Image

from s2l_monai.ensemble import EMAStore
from s2l_monai.transforms import EnsureImageChannelsd, LoadPseudoLabeld

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train.json"
SHAPE = (96, 80)  # not square, so a transposition would show


def _pattern() -> np.ndarray:
    rows, cols = np.indices(SHAPE)
    return (((rows // 16) + (cols // 16)) % 2).astype(np.uint8)


@pytest.fixture()
def pipeline(tmp_path):
    """The training transforms exactly as configs/train.json wires them, on a block pattern in image, scribble
    (fully labelled) and pseudo-label."""
    pattern = _pattern()
    Image.fromarray((50 + 150 * pattern).astype(np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(pattern).save(tmp_path / "scr.png")
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser["output_dir"] = str(tmp_path / "out")
    store = parser.get_parsed_content("ema_store")
    fg = 0.05 + 0.9 * pattern.astype(np.float32)
    store.update("item", np.stack([1 - fg, fg]), alpha=1.0)
    load = parser.get_parsed_content("load_transforms")
    augment = parser.get_parsed_content("train#augmentation")
    item = {"id": "item", "image": str(tmp_path / "img.png"), "scribble": str(tmp_path / "scr.png")}
    return load, augment, item


def _agreement(sample) -> tuple[float, float]:
    image = sample["image"][0].numpy()
    scribble = sample["scribble"][0].numpy()
    pseudo = sample["pseudo"][1].numpy()
    assert set(np.unique(scribble)) <= {0.0, 1.0}, "padding or interpolation invented scribble values"
    bright = image > (image.min() + image.max()) / 2
    return float((bright == (scribble == 1)).mean()), float(((pseudo > 0.5) == (scribble == 1)).mean())


def _spatial(augment):
    return [t for t in augment if set(getattr(t, "keys", ())) >= {"image", "scribble", "pseudo"}
            and not isinstance(t, (LoadPseudoLabeld, EnsureTyped))]


def test_loaded_in_numpy_orientation(pipeline):
    load, _, item = pipeline
    data = Compose(load)(item)
    assert tuple(data["image"].shape) == (1, *SHAPE)
    np.testing.assert_array_equal(data["scribble"][0].numpy(), _pattern())


@pytest.mark.parametrize("index", range(6))
def test_each_spatial_augmentation_keeps_alignment(pipeline, index):
    load, augment, item = pipeline
    spatial = _spatial(augment)
    assert len(spatial) == 6, [type(t).__name__ for t in spatial]
    transform = copy.deepcopy(spatial[index])
    if hasattr(transform, "prob"):
        transform.prob = 1.0
    if hasattr(transform, "rand_affine"):
        transform.rand_affine.prob = 1.0
    data = augment[0](Compose(load)(item))
    if index > 0:  # the patch sampler and later transforms see images padded to the patch size
        data = spatial[0](data)
    for seed in range(5):
        if hasattr(transform, "set_random_state"):
            transform.set_random_state(seed)
        out = transform(data)
        for sample in out if isinstance(out, list) else [out]:
            image_agree, pseudo_agree = _agreement(sample)
            assert image_agree > 0.95 and pseudo_agree > 0.95, (type(transform).__name__, seed)


def test_full_pipeline_alignment_and_a_negative_control(pipeline):
    load, augment, item = pipeline
    set_determinism(0)
    full = Compose(load + augment)
    scores = [min(_agreement(s)) for _ in range(8) for s in full(item)]
    assert min(scores) > 0.95
    # negative control: the pseudo-label left out of the rotation/affine transform must be caught by this check
    broken = copy.deepcopy(augment)
    affine = next(t for t in broken if type(t).__name__ == "RandAffined")
    affine.keys = ("image", "scribble")
    affine.mode = affine.mode[:2]
    affine.padding_mode = affine.padding_mode[:2]
    affine.prob = affine.rand_affine.prob = 1.0
    affine.rand_affine.rand_affine_grid.rotate_range = ((0.6, 0.6),)
    set_determinism(0)
    bad = [_agreement(s)[1] for _ in range(4) for s in Compose(load + broken)(item)]
    assert min(bad) < 0.9


def test_pseudo_label_defaults_to_zero_and_is_not_cached(tmp_path):
    store = EMAStore(tmp_path, num_classes=2)
    transform = LoadPseudoLabeld("pseudo", store=store)
    data = {"id": "x", "image": torch.zeros(1, 4, 5)}
    assert torch.equal(transform(data)["pseudo"], torch.zeros(2, 4, 5))
    store.update("x", np.full((2, 4, 5), 0.5, np.float32), alpha=1.0)
    assert torch.allclose(transform(data)["pseudo"], torch.full((2, 4, 5), 0.5))
    from monai.transforms.traits import RandomizableTrait

    assert isinstance(transform, RandomizableTrait)
    with pytest.raises(ValueError, match="shape"):
        transform({"id": "x", "image": torch.zeros(1, 6, 5)})


@pytest.mark.parametrize("channels_in,channels_out", [(1, 1), (2, 1), (3, 1), (4, 1), (1, 3), (4, 3), (3, 3)])
def test_ensure_image_channels(channels_in, channels_out):
    image = torch.rand(channels_in, 5, 6)
    out = EnsureImageChannelsd("image", channels=channels_out)({"image": image})["image"]
    assert out.shape == (channels_out, 5, 6)
    if channels_in in (3, 4) and channels_out == 1:
        expected = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]
        torch.testing.assert_close(out[0], expected)


def test_default_weights_the_scribbles_not_the_pseudo_labels():
    """The default recipe (chosen on the DSB-Fluo validation split, benchmarks/README.md) corrects the scribbles'
    class prior in L_sp (``class_weights "auto"``) but leaves L_up the paper's plain mean: the pseudo-labels cover
    ~95% of the unscribbled pixels, so they already carry the image's prior, and weighting them as well made the
    network under-segment (best threshold 0.3 instead of 0.5)."""
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    assert parser["class_weights"] == "auto"
    assert parser["pseudo_class_weights"] is None
    parser["class_weights"] = [3.0, 1.0]  # as "auto" would resolve, without data
    loss = parser.get_parsed_content("loss")
    assert loss.class_weights == [3.0, 1.0] and loss.pseudo_class_weights is None


@pytest.mark.parametrize("ratios, expected", [([0, 1], 1.0), ([1, 0], 0.0)])
def test_crop_ratios_key_picks_the_class_under_each_patch_centre(ratios, expected):
    """``crop_ratios`` in train.json reaches MONAI's RandCropByLabelClassesd: [0, 1] centres every patch on a
    foreground scribble, [1, 0] on a background one; and the class-weight keys reach the loss."""
    from monai.transforms import RandCropByLabelClassesd

    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser["crop_ratios"] = ratios
    parser["num_samples"] = 16
    parser["roi_size"] = [9, 9]  # odd, so the patch centre is one pixel
    parser["class_weights"] = [3.0, 1.0]
    parser["pseudo_class_weights"] = [2.0, 1.0]
    loss = parser.get_parsed_content("loss")
    assert (loss.class_weights, loss.pseudo_class_weights) == ([3.0, 1.0], [2.0, 1.0])
    crop = next(t for t in parser.get_parsed_content("train#augmentation") if isinstance(t, RandCropByLabelClassesd))
    crop.set_random_state(0)
    rows, cols = np.indices(SHAPE)
    # scribbles: a foreground stroke and a background stroke, the rest unlabelled; the image holds coordinates
    scribble = np.full(SHAPE, 255, np.float32)
    scribble[20, 10:60] = 1
    scribble[70, 10:60] = 0
    data = {"image": torch.as_tensor(np.stack([rows, cols]).astype(np.float32)),
            "scribble": torch.as_tensor(scribble[None]), "pseudo": torch.zeros(2, *SHAPE)}
    patches = crop(data)
    assert len(patches) == 16
    centres = [(int(p["image"][0, 4, 4]), int(p["image"][1, 4, 4])) for p in patches]
    on_fg = [scribble[r, c] == 1 for r, c in centres]
    assert all(scribble[r, c] != 255 for r, c in centres)
    assert float(np.mean(on_fg)) == expected


@pytest.mark.parametrize("shape", [(1, 256, 256), (3, 97, 131), (1, 7, 5)])
def test_percentile_scaling_by_selection_matches_monai(shape):
    """The selection-based percentiles give MONAI's values (torch.quantile, a sort) on float images, channel-wise."""
    from monai.data import MetaTensor
    from monai.transforms import ScaleIntensityRangePercentilesd as MonaiScale

    from s2l_monai.transforms import ScaleIntensityRangePercentilesd

    image = MetaTensor(torch.as_tensor(np.random.default_rng(3).random(shape).astype(np.float32) * 1000))
    args = ("image", 1, 99.8, 0.0, 1.0)
    ours = ScaleIntensityRangePercentilesd(*args, channel_wise=True)({"image": image})["image"]
    theirs = MonaiScale(*args, channel_wise=True)({"image": image})["image"]
    assert isinstance(ours, MetaTensor) and ours.dtype == torch.float32 and ours.shape == image.shape
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_percentile_scaling_by_selection_hand_computed():
    """0..99 in one channel: the 1st and 99th percentiles (linear interpolation) are 0.99 and 98.01; clip."""
    from s2l_monai.transforms import ScaleIntensityRangePercentilesd

    image = torch.arange(100, dtype=torch.float32).reshape(1, 10, 10)
    out = ScaleIntensityRangePercentilesd("image", 1, 99, 0.0, 1.0, clip=True)({"image": image})["image"]
    expected = np.clip((np.arange(100) - 0.99) / (98.01 - 0.99), 0, 1).reshape(1, 10, 10)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-6)
    uint8 = ScaleIntensityRangePercentilesd("image", 1, 99, 0.0, 1.0, clip=True)({"image": image.to(torch.uint8)})
    np.testing.assert_allclose(np.asarray(uint8["image"]), expected, atol=1e-6)


@pytest.mark.parametrize("relative", [False, True])
def test_percentile_scaling_in_one_call_equals_monai_numpy_path_bit_for_bit(relative):
    """Both percentiles from one ``np.percentile`` call give exactly MONAI's NumPy-path values (two calls)."""
    from monai.transforms import ScaleIntensityRangePercentilesd as MonaiScale

    from s2l_monai.transforms import ScaleIntensityRangePercentilesd

    image = (np.random.default_rng(5).random((3, 61, 47)) * 4000).astype(np.float32)
    for kwargs in ({"channel_wise": True}, {"channel_wise": False, "clip": True}):
        args = ("image", 2.5, 97.0, -1.0, 2.0)
        ours = ScaleIntensityRangePercentilesd(*args, relative=relative, **kwargs)({"image": image})["image"]
        theirs = MonaiScale(*args, relative=relative, **kwargs)({"image": image})["image"]  # NumPy in: np.percentile
        assert ours.dtype == theirs.dtype and np.asarray(ours).tobytes() == np.asarray(theirs).tobytes()


def test_replace_non_finite_skips_finite_images_and_catches_an_overflowing_sum():
    """A finite image whose sum overflows (float32 near its maximum, float16 above 65504) is left as it is; one NaN
    among such values is still replaced by the channel's finite median."""
    from s2l_monai.transforms import ReplaceNonFinited

    step = ReplaceNonFinited("image")
    big = torch.full((1, 8, 8), 3e38)
    assert not torch.isfinite(big.sum()) and torch.equal(step({"image": big})["image"], big)
    half = torch.full((1, 16, 16), 60000.0, dtype=torch.float16)
    assert torch.equal(step({"image": half})["image"], half)
    bad = big.clone()
    bad[0, 2, 3] = float("nan")
    fixed = step({"image": bad})["image"]
    assert torch.isfinite(fixed).all() and float(fixed[0, 2, 3]) == pytest.approx(3e38, rel=1e-6)
