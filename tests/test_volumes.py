"""Volumes: readers / writers round trip (TIFF, NIfTI, MHA), slice sampling, the per-volume EMA store, 3D instances."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from s2l_monai.ensemble import EMAStore
from s2l_monai.instances import connected_instances
from s2l_monai.transforms import LoadPseudoLabeld
from s2l_monai.volumes import (
    LoadVolumeSliced,
    SaveVolumeSliced,
    Volume,
    VolumeGeometry,
    open_volume,
    read_volume,
    slice_items,
    volume_instances_3d,
    write_volume,
)

SHAPE = (5, 12, 9)  # Z, Y, X: all different, so a transposition cannot go unnoticed


def _ramp(dtype=np.uint8) -> np.ndarray:
    z, y, x = np.indices(SHAPE)
    return (z * 40 + y * 3 + x).astype(dtype)


@pytest.mark.parametrize("name", ["v.tif", "v.nii", "v.nii.gz", "v.mha", "v.nrrd"])
def test_write_read_roundtrip_keeps_shape_spacing_and_geometry(tmp_path, name):
    array = _ramp()
    geometry = VolumeGeometry(shape=SHAPE, spacing=(2.5, 0.5, 0.25))
    if name.endswith("tif"):
        geometry.unit = "micron"
    if ".nii" in name:
        geometry.affine = np.array([[0, 0, 0.25, 5.0], [0, 0.5, 0, -3.0], [2.5, 0, 0, 7.0], [0, 0, 0, 1.0]])
    if name.endswith(("mha", "nrrd")):
        geometry.origin = (1.0, -2.0, 3.5)
        geometry.direction = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    write_volume(tmp_path / name, array, geometry)
    back, found = read_volume(tmp_path / name)
    np.testing.assert_array_equal(back, array)
    assert found.shape == SHAPE and back.dtype == np.uint8
    np.testing.assert_allclose(found.spacing, (2.5, 0.5, 0.25), rtol=1e-6)
    if name.endswith("tif"):
        assert found.unit == "micron"
        with tifffile.TiffFile(tmp_path / name) as tif:  # readable by ImageJ / Fiji with its z spacing
            assert tif.is_imagej and tif.imagej_metadata["spacing"] == pytest.approx(2.5)
    if ".nii" in name:
        np.testing.assert_allclose(found.affine, geometry.affine)
    if name.endswith(("mha", "nrrd")):
        np.testing.assert_allclose(found.origin, geometry.origin)
        np.testing.assert_allclose(found.direction, geometry.direction)
    # an output written with the input's geometry has the same geometry
    write_volume(tmp_path / f"out_{name}", (array > 100).astype(np.uint8), found)
    again = Volume(tmp_path / f"out_{name}").geometry
    np.testing.assert_allclose(again.spacing, found.spacing, rtol=1e-6)
    if found.affine is not None:
        np.testing.assert_allclose(again.affine, found.affine)


def test_nifti_axes_are_zyx(tmp_path):
    import nibabel as nib

    ijk = np.arange(9 * 12 * 5, dtype=np.int16).reshape(9, 12, 5)  # nibabel order i, j, k
    nib.save(nib.Nifti1Image(ijk, np.diag([0.25, 0.5, 2.5, 1.0])), str(tmp_path / "n.nii"))
    vol = Volume(tmp_path / "n.nii")
    assert vol.shape == (5, 12, 9) and vol.geometry.spacing == (2.5, 0.5, 0.25)
    np.testing.assert_array_equal(vol.slice(0, 3), ijk[:, :, 3].T)
    np.testing.assert_array_equal(vol.read(), ijk.T)


@pytest.mark.parametrize("compressed", [False, True])
def test_tiff_slices_along_every_axis(tmp_path, compressed):
    array = _ramp(np.uint16)
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, array, compression="zlib" if compressed else None)
    vol = Volume(path)
    assert vol.shape == SHAPE and (vol._pages is not None) == compressed
    for axis in range(3):
        for k in (0, SHAPE[axis] - 1):
            np.testing.assert_array_equal(vol.slice(axis, k), np.take(array, k, axis=axis))
    with pytest.raises(IndexError):
        vol.slice(0, SHAPE[0])
    vol.close()


def _scribbled_dataset(tmp_path, scribbled=(1, 3)):
    image = _ramp()
    scribble = np.full(SHAPE, 255, np.uint8)
    for k in scribbled:
        scribble[k, 2:4, 2:6] = 1
        scribble[k, 8, :] = 0
    write_volume(tmp_path / "img.tif", image)
    write_volume(tmp_path / "scr.tif", scribble)
    return [{"image": str(tmp_path / "img.tif"), "scribble": str(tmp_path / "scr.tif"), "id": "img"}], image, scribble


def test_slice_items_keep_only_scribbled_slices_and_load_the_right_content(tmp_path):
    items, image, scribble = _scribbled_dataset(tmp_path)
    assert slice_items(items, None) == items  # 2D: unchanged
    slices = slice_items(items, 0, unlabelled=255)
    assert [(s["id"], s["slice"], s["num_slices"]) for s in slices] == [("img", 1, 5), ("img", 3, 5)]
    assert len(slice_items(items, 0, scribbled_only=False)) == SHAPE[0]
    # along Y every row that crosses a scribble counts
    assert [s["slice"] for s in slice_items(items, 1)] == [2, 3, 8]
    out = LoadVolumeSliced(["image", "scribble"], axis=0)(slices[1])
    assert out["image"].shape == (1, 12, 9) and out["image"].dtype == torch.float32
    np.testing.assert_array_equal(out["image"][0].numpy(), image[3])  # rows = Y, columns = X: not transposed
    np.testing.assert_array_equal(out["scribble"][0].numpy(), scribble[3])
    assert out["image"].meta["slice_index"] == 3 and out["image"].meta["filename_or_obj"].endswith("img.tif")
    side = LoadVolumeSliced("image", axis=2)({"image": items[0]["image"], "slice": 4})
    np.testing.assert_array_equal(side["image"][0].numpy(), image[:, :, 4])  # rows = Z, columns = Y


def test_slice_items_errors(tmp_path):
    items, _, _ = _scribbled_dataset(tmp_path, scribbled=())
    with pytest.raises(ValueError, match="no slice"):
        slice_items(items, 0)
    write_volume(tmp_path / "small.tif", np.zeros((2, 12, 9), np.uint8))
    with pytest.raises(ValueError, match="differs"):
        slice_items([{**items[0], "scribble": str(tmp_path / "small.tif")}], 0)


def _prob(fg: np.ndarray) -> np.ndarray:
    return np.stack([1 - fg, fg]).astype(np.float32)


def test_volume_ema_store_follows_the_formula_per_slice_and_commits_atomically(tmp_path):
    store = EMAStore(tmp_path / "ema", num_classes=2)
    rng = np.random.default_rng(0)
    p1, p2, p3 = (rng.random((12, 9)).astype(np.float32) for _ in range(3))
    # ensemble 1: slices 1 and 3 of a 5-slice volume
    store.update_slice("v", 1, 5, _prob(p1), alpha=0.2)
    store.update_slice("v", 3, 5, torch.from_numpy(_prob(p2)), alpha=0.2)
    assert "v" not in store  # nothing visible before the commit
    store.commit()
    assert store.ids() == ["v"] and not list((tmp_path / "ema").glob(".*"))
    on_disk = np.load(store.path("v"), mmap_mode="r")
    assert on_disk.shape == (1, 5, 12, 9) and on_disk.dtype == np.float16
    assert store.probabilities("v", slice_index=0) is None  # never ensembled: no pseudo-label
    np.testing.assert_allclose(store.probabilities("v", slice_index=1)[1], p1, atol=1e-3)  # y_0 = p
    # ensemble 2 on slice 1: y = 0.2 p3 + 0.8 y_0; a reader sees the old average until the commit
    new = store.update_slice("v", 1, 5, _prob(p3), alpha=0.2)
    np.testing.assert_allclose(new[1], 0.2 * p3 + 0.8 * p1, atol=2e-3)
    np.testing.assert_allclose(store.probabilities("v", slice_index=1)[1], p1, atol=1e-3)
    store.commit()
    got = store.probabilities("v", slice_index=1)
    np.testing.assert_allclose(got[1], 0.2 * p3 + 0.8 * p1, atol=2e-3)
    np.testing.assert_allclose(got.sum(0), 1.0, atol=1e-6)
    np.testing.assert_allclose(store.probabilities("v", slice_index=3)[1], p2, atol=1e-3)  # untouched slice
    # a failed ensemble leaves the stored average as it was
    store.update_slice("v", 3, 5, _prob(p1), alpha=1.0)
    store.abort()
    np.testing.assert_allclose(store.probabilities("v", slice_index=3)[1], p2, atol=1e-3)
    assert not list((tmp_path / "ema").glob(".*"))
    # state dict round trip (NaN slices included) and the pseudo-label transform reading one slice
    other = EMAStore(tmp_path / "other", num_classes=2)
    other.load_state_dict(store.state_dict())
    np.testing.assert_array_equal(np.load(other.path("v")), np.load(store.path("v")))
    ref = torch.zeros(1, 12, 9)
    out = LoadPseudoLabeld("pseudo", other)({"id": "v", "slice": 3, "image": ref})
    np.testing.assert_allclose(out["pseudo"][1].numpy(), p2, atol=1e-3)
    empty = LoadPseudoLabeld("pseudo", other)({"id": "v", "slice": 0, "image": ref})
    assert float(empty["pseudo"].abs().sum()) == 0.0


def test_volume_ema_store_errors(tmp_path):
    with pytest.raises(ValueError, match="float16"):
        EMAStore(tmp_path / "u8", dtype="uint8").update_slice("v", 0, 2, _prob(np.zeros((3, 3))), 0.2)
    store = EMAStore(tmp_path / "f16")
    store.update_slice("v", 0, 2, _prob(np.zeros((3, 3))), 0.2)
    store.commit()
    with pytest.raises(ValueError, match="changed shape"):
        store.update_slice("v", 0, 3, _prob(np.zeros((3, 3))), 0.2)
    store.update("a", _prob(np.zeros((3, 3))), 0.2)  # a 2D item
    with pytest.raises(ValueError, match="not a volume"):
        store.probabilities("a", slice_index=0)


def test_volume_instances_3d_match_connected_instances():
    rng = np.random.default_rng(1)
    from scipy import ndimage as ndi

    mask = ndi.gaussian_filter(rng.random((10, 30, 30)), 1.5) > 0.52
    mask[4, 10:15, 10:15] = True
    mask[4, 12, 12] = False  # a hole
    ours = volume_instances_3d(mask, min_size=10, connectivity=3)
    ref = connected_instances(mask, min_size=10, fill_holes=True)
    assert ours.dtype == np.int32
    # same partition (ids may be numbered differently)
    pairs = set(zip(ours.ravel().tolist(), ref.ravel().tolist()))
    assert len(pairs) == len(np.unique(ours)) == len(np.unique(ref))


def test_save_volume_sliced_slice_mode_makes_unique_ids(tmp_path):
    from monai.data import MetaTensor

    write_volume(tmp_path / "in.tif", np.zeros((2, 6, 6), np.uint8), VolumeGeometry((2, 6, 6), (3.0, 1.0, 1.0)))
    saver = SaveVolumeSliced(output_dir=tmp_path / "out", axis=0, instance_mode="slice")
    for k in (1, 0):  # any order
        inst = np.zeros((1, 6, 6), np.int32)
        inst[0, :2, :2], inst[0, 4:, 4:] = 1, 2
        meta = {"filename_or_obj": str(tmp_path / "in.tif"), "slice_index": k, "num_slices": 2}
        saver({"image": MetaTensor(torch.zeros(1, 6, 6), meta=meta), "pred": torch.as_tensor(inst > 0).to(torch.uint8),
               "instances": torch.as_tensor(inst), "slice": k})
    assert not saver.open and len(saver.finished) == 1
    out, geometry = read_volume(tmp_path / "out" / "in_instances.tif")
    assert out.dtype == np.uint32 and sorted(np.unique(out).tolist()) == [0, 1, 2, 3, 4]
    assert geometry.spacing[0] == pytest.approx(3.0)


def test_isbi2012_reader(shared_data):
    path = shared_data / "isbi2012" / "train-volume.tif"
    labels = shared_data / "isbi2012" / "train-labels.tif"
    if not path.is_file() or not labels.is_file():
        pytest.skip(f"{path.parent} is absent")
    vol, lab = open_volume(path), open_volume(labels)
    assert vol.shape == lab.shape == (30, 512, 512) and vol.dtype == np.uint8
    first = lab.slice(0, 0)
    assert set(np.unique(first).tolist()) <= {0, 255}
    # cell interiors (255) dominate, membranes (0) are thin: about 3/4 of the pixels are 255
    assert 0.6 < float((first == 255).mean()) < 0.9
    # membranes are dark in the EM image: orientation of image and label agree
    image = vol.slice(0, 0)
    assert image[first == 0].mean() < image[first == 255].mean()
    np.testing.assert_array_equal(first, tifffile.imread(labels, key=0))
