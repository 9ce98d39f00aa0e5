"""Tests of s2l_monai.instances: connected components and distance-transform watershed post-processing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from skimage.draw import disk, ellipse

from s2l_monai.instances import Instancesd, connected_instances, instances_from_mask, watershed_instances


def _two_touching_discs(radius: int = 12, separation: int = 20) -> np.ndarray:
    """Two discs whose centres are ``separation`` px apart (< 2 * radius, so they overlap into one blob)."""
    m = np.zeros((64, 96), dtype=bool)
    m[disk((32, 30), radius)] = True
    m[disk((32, 30 + separation), radius)] = True
    return m


@pytest.mark.parametrize(("radius", "separation"), [(12, 20), (12, 18), (8, 14), (15, 26)])
def test_touching_discs_watershed_splits_connected_merges(radius: int, separation: int) -> None:
    m = _two_touching_discs(radius, separation)
    assert connected_instances(m).max() == 1
    ws = watershed_instances(m)
    assert ws.max() == 2
    assert ws.dtype == np.int32
    # The split follows the neck: each disc centre lies in a different instance, and no foreground is lost.
    assert ws[32, 30] != ws[32, 30 + separation]
    assert np.array_equal(ws > 0, m)
    assert watershed_instances(m, markers="peaks").max() == 2


@pytest.mark.parametrize(("radius", "separation"), [(8, 12), (10, 14), (12, 15)])
def test_default_dynamic_splits_shallow_necks(radius: int, separation: int) -> None:
    """The default h = 1 px (chosen on the DSB-Fluo validation split: DSB score 0.582 vs 0.575 with h = 2) splits
    two strongly overlapping discs, whose neck leaves a distance dynamic between 1 and 2 px, that h = 2 merges."""
    m = _two_touching_discs(radius, separation)
    assert watershed_instances(m).max() == 2
    assert watershed_instances(m, h=2.0).max() == 1


@pytest.mark.parametrize(("a", "b"), [(25, 10), (30, 8), (40, 12), (15, 6)])
@pytest.mark.parametrize("rotation", np.linspace(0, np.pi, 7)[:-1].tolist())
def test_single_elongated_nucleus_not_oversegmented(a: int, b: int, rotation: float) -> None:
    # Elongated ellipses up to aspect 3.75 at 6 orientations: the distance ridge has pixelation bumps (twin maxima
    # at rotated angles), which the h-maxima markers must ignore.
    m = np.zeros((100, 100), dtype=bool)
    m[ellipse(50, 50, a, b, rotation=rotation)] = True
    assert watershed_instances(m).max() == 1
    assert connected_instances(m).max() == 1


def test_small_objects_removed_at_min_size() -> None:
    m = np.zeros((40, 40), dtype=bool)
    m[2:9, 2:9] = True  # 7 x 7 = 49 px < 64: removed
    m[20:28, 20:28] = True  # 8 x 8 = 64 px, not "under 64": kept
    for method in ("connected", "watershed"):
        lab = instances_from_mask(m, method=method)
        assert lab.max() == 1
        assert not lab[2:9, 2:9].any()
        assert (lab[20:28, 20:28] > 0).all()
    # min_size=1 keeps everything.
    assert connected_instances(m, min_size=1).max() == 2


def test_holes_filled() -> None:
    m = np.zeros((50, 50), dtype=bool)
    m[disk((25, 25), 15)] = True
    full = m.copy()
    m[disk((25, 25), 5)] = False  # hole inside the nucleus
    lab = connected_instances(m)
    assert lab.max() == 1
    assert np.array_equal(lab > 0, full)
    assert np.array_equal(watershed_instances(m) > 0, full)
    assert not (connected_instances(m, fill_holes=False)[25, 25])


def test_probability_input_is_thresholded() -> None:
    prob = np.zeros((40, 40), dtype=np.float32)
    prob[5:20, 5:20] = 0.9
    prob[25:38, 25:38] = 0.4  # below 0.5: background
    assert connected_instances(prob).max() == 1
    assert connected_instances(prob, threshold=0.3).max() == 2


def test_3d_connected_components() -> None:
    vol = np.zeros((10, 30, 30), dtype=bool)
    vol[1:6, 2:8, 2:8] = True  # 5*6*6 = 180 voxels
    vol[4:9, 15:25, 15:25] = True
    vol[0, 28, 28] = True  # single voxel: removed
    lab = connected_instances(vol)
    assert lab.shape == vol.shape and lab.dtype == np.int32
    assert lab.max() == 2
    assert watershed_instances(vol).max() == 2


def test_empty_and_full_masks() -> None:
    empty = np.zeros((32, 32), dtype=bool)
    assert connected_instances(empty).max() == 0
    assert watershed_instances(empty).max() == 0
    full = np.ones((32, 32), dtype=bool)
    assert watershed_instances(full).max() == 1 and (watershed_instances(full) == 1).all()


def test_dispatch_unknown_method() -> None:
    m = _two_touching_discs()
    assert instances_from_mask(m, "connected").max() == 1
    assert instances_from_mask(m).max() == 2  # watershed is the default
    with pytest.raises(ValueError, match="unknown instance method"):
        instances_from_mask(m, "stardist")
    with pytest.raises(ValueError, match="unknown markers"):
        watershed_instances(m, markers="random")


def test_instancesd_binary_and_softmax_inputs() -> None:
    m = _two_touching_discs()
    binary = torch.as_tensor(m[None].astype(np.float32))  # 1HW
    fg = torch.as_tensor(m, dtype=torch.float32)
    softmax = torch.stack([1.0 - 0.9 * fg - 0.05, 0.9 * fg + 0.05])  # 2HW, channel 1 = foreground
    out = Instancesd(keys=["pred", "prob"], method="watershed")({"pred": binary, "prob": softmax})
    for key in ("pred_instances", "prob_instances"):
        assert isinstance(out[key], torch.Tensor)
        assert out[key].dtype == torch.int32
        assert tuple(out[key].shape) == (1, *m.shape)
        assert int(out[key].max()) == 2
    assert out["pred"] is binary  # input kept

    conn = Instancesd(keys="pred", method="connected", output_key="pred")({"pred": m[None].astype(np.uint8)})
    assert int(conn["pred"].max()) == 1 and conn["pred"].dtype == torch.int32


@pytest.mark.parametrize("channels", [2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint8, bool])
def test_instancesd_foreground_is_argmax_one(channels, dtype) -> None:
    """The foreground of a C-channel map is np.argmax(axis=0) == 1, ties (to the first channel) and NaN (the first
    NaN wins) included."""
    rng = np.random.default_rng(channels)
    maps = (rng.random((channels, 40, 50)) * 3).astype(dtype)
    if np.issubdtype(maps.dtype, np.floating):
        maps[rng.random(maps.shape) < 0.1] = np.nan
    maps[:, 5:9] = maps[:1, 5:9]  # ties across every channel
    maps[1, 20:22] = maps[0, 20:22]  # ties of channels 0 and 1 only
    step = Instancesd(keys="pred", method="connected", min_size=1)
    expected = np.argmax(maps, axis=0) == 1
    for value in (maps, torch.as_tensor(maps)):
        assert np.array_equal(step._foreground(value), expected)


def test_instancesd_in_compose_keeps_meta() -> None:
    m = _two_touching_discs()
    img = MetaTensor(torch.as_tensor(m[None], dtype=torch.float32), meta={"filename_or_obj": "x.png"})
    post = Compose([Instancesd(keys="pred", min_size=64, h=2.0)])
    out = post({"pred": img})["pred_instances"]
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "x.png"
    assert int(out.max()) == 2
    with pytest.raises(ValueError, match="unknown instance method"):
        Instancesd(keys="pred", method="nope")
    with pytest.raises(ValueError, match="output keys"):
        Instancesd(keys=["a", "b"], output_key="c")


# ---------------------------------------------------------------------------------------------------------------------
# h_maxima_transform: per-object reconstruction equals scikit-image's whole-image one, bit for bit
# ---------------------------------------------------------------------------------------------------------------------


def _blobs(shape: tuple[int, ...], density: float, seed: int) -> np.ndarray:
    """Random blobs: smoothed noise above a quantile (objects touch the border, have holes, vary in size)."""
    from scipy import ndimage as ndi

    noise = ndi.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 3.0)
    return noise > np.quantile(noise, 1.0 - density)


def _blob_distance(shape: tuple[int, ...], density: float, seed: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_blobs` and their distance transform, smoothed by ``sigma`` (0: none) and 0 outside the blobs, as the
    watershed computes it."""
    from scipy import ndimage as ndi

    fg = _blobs(shape, density, seed)
    dist = ndi.distance_transform_edt(fg)
    if sigma:
        dist = ndi.gaussian_filter(dist, sigma)
        dist[~fg] = 0.0
    return fg, dist


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("density", [0.03, 0.15, 0.4])
@pytest.mark.parametrize(("h", "sigma"), [(2.0, 1.0), (0.5, 0.0), (6.0, 1.0)])
def test_h_maxima_transform_equals_skimage_reconstruction(seed: int, density: float, h: float, sigma: float) -> None:
    from skimage.measure import label
    from skimage.morphology import reconstruction

    from s2l_monai.instances import h_maxima_transform

    for shape in ((97, 131), (14, 40, 37)):
        fg, dist = _blob_distance(shape, density, seed, sigma)
        expected = reconstruction(dist - h, dist, method="dilation")
        components = label(fg, connectivity=fg.ndim)
        for share in (1.0, 0.5, 0.0):  # always split, the default, split only where no object has two maxima
            got = h_maxima_transform(dist, h, fg, components, max_share=share)
            assert got.dtype == expected.dtype
            assert np.array_equal(got, expected), (shape, share, np.abs(got - expected).max())


def test_single_maximum_objects_and_their_closed_form(monkeypatch) -> None:
    """Objects with one regional maximum (plateaus count once) skip the reconstruction: hand-made cases."""
    from scipy import ndimage as ndi
    from skimage.measure import label
    from skimage.morphology import reconstruction

    from s2l_monai.instances import _single_maximum_objects, h_maxima_transform

    fg = np.zeros((40, 60), dtype=bool)
    fg[2:7, 2:11] = True  # 5x9 rectangle: the maximum is a plateau of 5 pixels along the middle row -> one
    yy, xx = np.mgrid[:40, :60]
    fg |= (yy - 20) ** 2 + (xx - 12) ** 2 <= 36  # two discs of radius 6 joined by a 3-pixel neck -> two maxima
    fg |= (yy - 20) ** 2 + (xx - 30) ** 2 <= 36
    fg[19:22, 17:26] = True
    fg[35, 50] = True  # a single pixel: its own maximum -> one
    dist = ndi.distance_transform_edt(fg)
    components = label(fg, connectivity=2)
    assert components.max() == 3
    single = _single_maximum_objects(dist, fg, components)
    ids = [components[4, 6], components[20, 12], components[35, 50]]
    assert single.tolist() == [False] + [i != ids[1] for i in (1, 2, 3)]
    # only the two-disc object is reconstructed; the other two take the closed form min(dist, max_C - h), with
    # maxima below h (the pixel), equal to it (the rectangle's 3) and above it, and the result is scikit-image's
    import s2l_monai.instances as inst

    calls = []
    def counted(seed: np.ndarray, mask: np.ndarray, **kw: object) -> np.ndarray:
        calls.append(1)
        return reconstruction(seed, mask, **kw)

    monkeypatch.setattr(inst, "reconstruction", counted)
    for h in (0.5, 3.0, 8.0):
        calls.clear()
        got = h_maxima_transform(dist, h, fg, components, max_share=1.0)
        assert len(calls) == 1
        assert np.array_equal(got, reconstruction(dist - h, dist, method="dilation"))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("density", [0.03, 0.15, 0.4, 0.7])
@pytest.mark.parametrize(("h", "sigma"), [(1.0, 1.0), (0.5, 0.0), (2.0, 1.0), (6.0, 0.0)])
def test_h_maxima_seeds_equal_maxima_of_the_reconstruction(seed: int, density: float, h: float, sigma: float) -> None:
    """The markers in closed form (or by one reconstruction per object with many levels) are the regional maxima
    of scikit-image's reconstruction, pixel for pixel."""
    from skimage.measure import label
    from skimage.morphology import local_maxima, reconstruction

    from s2l_monai.instances import h_maxima_seeds

    for shape in ((97, 131), (14, 40, 37)):
        fg, dist = _blob_distance(shape, density, seed, sigma)
        rec = reconstruction(dist - h, dist, method="dilation")
        expected = local_maxima(rec, connectivity=fg.ndim, allow_borders=True) & fg
        for max_levels in (16, 0):  # a labelling per level; every object by one reconstruction of its box
            got = h_maxima_seeds(dist, h, fg, label(fg, connectivity=fg.ndim), max_levels=max_levels)
            if dist.max() - h <= 0:
                assert got is None
                continue
            assert got is not None
            assert np.array_equal(got, expected), (shape, max_levels, np.count_nonzero(got != expected))


def test_h_maxima_seeds_hand_made() -> None:
    """Two discs of radius 6 joined by a neck of half-width 1 (dynamic 5), a rectangle (one plateau maximum) and
    a pixel: markers per object, by h; None where the reconstruction is all floor."""
    from scipy import ndimage as ndi
    from skimage.measure import label

    from s2l_monai.instances import h_maxima_seeds

    yy, xx = np.mgrid[:40, :60]
    fg = ((yy - 20) ** 2 + (xx - 12) ** 2 <= 36) | ((yy - 20) ** 2 + (xx - 30) ** 2 <= 36)
    fg[19:22, 17:26] = True
    fg[2:7, 2:11] = True  # 5x9: distance 3 on its middle row
    fg[35, 50] = True
    dist = ndi.distance_transform_edt(fg)
    components = label(fg, connectivity=2)
    discs, rect, pixel = components[20, 12], components[4, 6], components[35, 50]

    def markers(h: float) -> dict[int, int]:
        seeds = h_maxima_seeds(dist, h, fg, components)
        assert seeds is not None
        lab = label(seeds, connectivity=2)
        return {c: len(np.unique(lab[(components == c) & seeds])) for c in (discs, rect, pixel)}

    assert markers(0.5) == {discs: 2, rect: 1, pixel: 1}  # every maximum above h: the pixel's is 1
    assert markers(2.5) == {discs: 2, rect: 1, pixel: 0}  # the pixel's 1 - 2.5 < 0: merged into the floor
    assert markers(5.5) == {discs: 1, rect: 0, pixel: 0}  # dynamic 5 < h: the two discs give one marker
    seeds = h_maxima_seeds(dist, 5.5, fg, components)
    on_discs = components == discs  # their one marker is K = {f >= max - 5.5}, joined through the neck (f = 2)
    level = dist[on_discs].max() - 5.5
    assert seeds is not None and np.array_equal(seeds & on_discs, (dist >= level) & on_discs)
    assert seeds[20, 20] and label(seeds & on_discs, connectivity=2).max() == 1
    assert h_maxima_seeds(dist, 7.0, fg, components) is None  # max f - h = 0: the caller reconstructs
    assert h_maxima_seeds(dist, 0.0, fg, components) is None
    assert h_maxima_seeds(np.zeros((5, 5)), 1.0, np.zeros((5, 5), bool), np.zeros((5, 5), int)) is None


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kwargs", [{}, {"fill_holes": False}, {"h": 5.0}, {"connectivity": 1}, {"sigma": 0.0}])
def test_watershed_instances_unchanged_by_per_object_reconstruction(monkeypatch, seed: int, kwargs: dict) -> None:
    from skimage.morphology import reconstruction

    import s2l_monai.instances as inst

    masks = [_blobs((120, 150), 0.12, seed), _blobs((120, 150), 0.45, seed), _blobs((9, 40, 50), 0.1, seed)]
    fast = [inst.watershed_instances(m, **kwargs) for m in masks]
    from scipy import ndimage as ndi

    # the algorithm as it was: SciPy's hole filling and distance transform, scikit-image's reconstruction
    monkeypatch.setattr(inst, "h_maxima_seeds", lambda dist, h, fg, components: None)
    monkeypatch.setattr(inst, "h_maxima_transform",
                        lambda dist, h, fg, components=None: reconstruction(dist - h, dist, method="dilation"))
    monkeypatch.setattr(inst, "distance_transform", lambda fg, objects=None: ndi.distance_transform_edt(fg))
    monkeypatch.setattr(inst, "fill_holes_by_labels", ndi.binary_fill_holes)
    for m, got in zip(masks, fast):
        expected = inst.watershed_instances(m, **kwargs)
        assert got.dtype == expected.dtype and np.array_equal(got, expected)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("density", [0.05, 0.3, 0.6, 0.9])
def test_fill_holes_and_distance_transform_equal_scipy(seed: int, density: float) -> None:
    from scipy import ndimage as ndi
    from skimage.measure import label

    from s2l_monai.instances import distance_transform, fill_holes_by_labels

    for shape in ((83, 121), (11, 30, 27)):
        fg = _blobs(shape, density, seed)
        assert np.array_equal(fill_holes_by_labels(fg), ndi.binary_fill_holes(fg))
        objects = label(fg, connectivity=fg.ndim)
        expected = ndi.distance_transform_edt(fg)
        for share in (1.0, 0.5):
            got = distance_transform(fg, objects, max_share=share)
            assert got.dtype == expected.dtype and np.array_equal(got, expected)
    for fg in (np.zeros((5, 6), bool), np.ones((5, 6), bool)):
        assert np.array_equal(fill_holes_by_labels(fg), ndi.binary_fill_holes(fg))
        assert np.array_equal(distance_transform(fg, label(fg)), ndi.distance_transform_edt(fg))
