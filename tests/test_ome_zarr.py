"""OME-Zarr volumes (issue 17, item 4): the format, slice reads, the chunk-wise writer, bundle inference and training
on ``.ome.zarr`` folders, and slice-wise inference with flat memory on a volume larger than the memory allowed."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from s2l_testing import run_bundle

from s2l_monai.data.checks import check_inference_items
from s2l_monai.inference_io import image_stem, list_images
from s2l_monai.ome_zarr import create_ome_zarr, open_ome_zarr
from s2l_monai.volumes import (
    VOLUME_EXTENSIONS,
    Volume,
    VolumeGeometry,
    VolumeWriter,
    is_volume_path,
    open_volume,
    read_volume,
    volume_extension,
    volume_format,
    write_volume,
)

REPO = Path(__file__).resolve().parents[1]
SPACING = (0.05, 0.004, 0.004)


def _geometry(shape, chunks=(4, 32, 16), unit="micrometer"):
    return VolumeGeometry(shape=shape, spacing=SPACING, unit=unit, extra={"chunks": chunks})


def test_names_and_stems(tmp_path):
    assert volume_format("a/x.ome.zarr") == "zarr" and volume_format("x.zarr") == "zarr"
    assert volume_extension("x.OME.zarr") == ".ome.zarr" and volume_extension("x.zarr") == ".zarr"
    assert is_volume_path("x.ome.zarr") and ".ome.zarr" in VOLUME_EXTENSIONS
    assert image_stem("a.ome.zarr") == "a" and image_stem("d/a.zarr") == "a" and image_stem("d/a.ome.zarr/") == "a"
    write_volume(tmp_path / "a.ome.zarr", np.ones((2, 8, 8), np.uint8), _geometry((2, 8, 8)))
    write_volume(tmp_path / "b.tif", np.ones((2, 8, 8), np.uint8))
    (tmp_path / "notes.zarr.txt").write_text("x")
    (tmp_path / "other_folder").mkdir()
    items = list_images(tmp_path, VOLUME_EXTENSIONS)  # the .ome.zarr folder is ONE item
    assert [(Path(i["image"]).name, i["id"]) for i in items] == [("a.ome.zarr", "a"), ("b.tif", "b")]
    good, failures = check_inference_items(items + [{"image": str(tmp_path / "gone.ome.zarr")}], volume=True)
    assert len(good) == 2 and failures == [f"{tmp_path / 'gone.ome.zarr'}: OME-Zarr folder does not exist"]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_round_trip_keeps_shape_dtype_chunks_scale_unit_axes(tmp_path, dtype):
    rng = np.random.default_rng(0)
    arr = (rng.random((10, 40, 24)) * 200).astype(dtype)
    path = write_volume(tmp_path / "v.ome.zarr", arr, _geometry(arr.shape, chunks=(4, 32, 16)))
    attrs = json.loads((path / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    assert ms["version"] == "0.4"
    assert ms["axes"] == [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    assert ms["datasets"] == [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": list(SPACING)}]}]
    zarray = json.loads((path / "0" / ".zarray").read_text())
    assert zarray["chunks"] == [4, 32, 16] and zarray["dimension_separator"] == "/"
    vol = Volume(path)
    assert vol.shape == arr.shape and vol.dtype == np.dtype(dtype)
    assert vol.geometry.format == "zarr" and vol.geometry.unit == "micrometer"
    assert vol.geometry.extra["chunks"] == (4, 32, 16)
    np.testing.assert_allclose(vol.geometry.spacing, SPACING)
    back, geometry = read_volume(path)
    np.testing.assert_array_equal(back, arr)
    assert back.dtype == np.dtype(dtype) and geometry.shape == arr.shape


def test_reads_level_0_of_a_multiscale_image_with_channel_axis(tmp_path):
    """A ``czyx`` image with two levels (as other tools write them): level 0, channel dropped, scales multiplied."""
    import zarr

    arr = np.arange(6 * 16 * 20, dtype=np.uint16).reshape(1, 6, 16, 20)
    root = zarr.open_group(str(tmp_path / "m.ome.zarr"), mode="w", zarr_format=2)
    root.create_array("s0", shape=arr.shape, chunks=(1, 2, 8, 8), dtype=arr.dtype)[...] = arr
    root.create_array("s1", shape=(1, 6, 8, 10), chunks=(1, 2, 8, 8), dtype=arr.dtype)[...] = arr[:, :, ::2, ::2]
    axes = [{"name": "c", "type": "channel"}] + [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"]
    root.attrs["multiscales"] = [{
        "version": "0.4", "axes": axes, "name": "em",
        "datasets": [
            {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [1, 40, 4, 4]}]},
            {"path": "s1", "coordinateTransformations": [{"type": "scale", "scale": [1, 40, 8, 8]}]},
        ],
        "coordinateTransformations": [{"type": "scale", "scale": [1, 2, 1, 1]}],
    }]
    view, info = open_ome_zarr(tmp_path / "m.ome.zarr")
    assert info.shape == (6, 16, 20) and info.chunks == (2, 8, 8) and info.path == "s0" and info.name == "em"
    assert info.spacing == (80.0, 4.0, 4.0) and info.unit == "nanometer" and info.axes == ["c", "z", "y", "x"]
    np.testing.assert_array_equal(view[2], arr[0, 2])
    vol = open_volume(tmp_path / "m.ome.zarr")
    np.testing.assert_array_equal(vol.slice(2, 7), arr[0, :, :, 7])


def test_slices_along_each_axis(tmp_path):
    arr = np.random.default_rng(1).integers(0, 255, (9, 20, 14), dtype=np.uint8)
    path = write_volume(tmp_path / "s.ome.zarr", arr, _geometry(arr.shape, chunks=(4, 8, 5)))
    vol = open_volume(path)
    for axis in (0, 1, 2):
        for k in (0, 3, arr.shape[axis] - 1, 4, 2):  # out of order: across chunk rows and back
            np.testing.assert_array_equal(vol.slice(axis, k), np.take(arr, k, axis=axis))
    with pytest.raises(IndexError):
        vol.slice(0, 9)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_writer_gathers_chunk_rows_in_any_order(tmp_path, axis):
    arr = np.random.default_rng(2).random((7, 12, 10)).astype(np.float32)
    writer = VolumeWriter(tmp_path / "w.ome.zarr", arr.shape, np.float32, _geometry(arr.shape, chunks=(3, 5, 4)))
    order = np.random.default_rng(3).permutation(arr.shape[axis])
    for k in order:
        writer.write_slice(axis, int(k), np.take(arr, int(k), axis=axis))
    assert writer.close() == tmp_path / "w.ome.zarr"
    np.testing.assert_array_equal(read_volume(tmp_path / "w.ome.zarr")[0], arr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.ome.zarr"]  # no temporary folder left


def test_writer_abort_leaves_nothing_and_close_replaces(tmp_path):
    shape = (4, 8, 8)
    writer = VolumeWriter(tmp_path / "x.ome.zarr", shape, np.uint8, _geometry(shape))
    writer.write_slice(0, 0, np.ones(shape[1:], np.uint8))
    assert any(p.name.endswith(".tmp.zarr") for p in tmp_path.iterdir())  # written into a temporary folder
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    write_volume(tmp_path / "x.ome.zarr", np.ones(shape, np.uint8), _geometry(shape))
    write_volume(tmp_path / "x.ome.zarr", np.full(shape, 3, np.uint8), _geometry(shape))  # over an existing one
    np.testing.assert_array_equal(read_volume(tmp_path / "x.ome.zarr")[0], 3)
    assert [p.name for p in tmp_path.iterdir()] == ["x.ome.zarr"]


def test_not_ome_zarr_is_refused(tmp_path):
    import zarr

    root = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", zarr_format=2)
    root.attrs["hello"] = 1
    with pytest.raises(ValueError, match="multiscales"):
        Volume(tmp_path / "plain.zarr")
    create_ome_zarr(tmp_path / "ok.zarr", (2, 8, 8), np.uint8)
    good, failures = check_inference_items([{"image": str(tmp_path / "plain.zarr")}], volume=True)
    assert not good and "multiscales" in failures[0]


# ---------------------------------------------------------------------------------------------------------------------
# Bundle runs (subprocesses)
# ---------------------------------------------------------------------------------------------------------------------


def _random_model(path: Path) -> Path:
    from monai.bundle import ConfigParser

    torch.manual_seed(0)
    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "inference.json"))
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


@pytest.mark.slow
def test_bundle_inference_on_ome_zarr_equals_tiff(tmp_path):
    from s2l_monai.data.synthetic import synthetic_nuclei

    shape, chunks = (6, 64, 48), (4, 32, 32)
    image = np.stack([synthetic_nuclei(shape[1:], seed=k, n_nuclei=(3, 6))[0] for k in range(shape[0])])
    write_volume(tmp_path / "zarr_in" / "vol.ome.zarr", image, _geometry(shape, chunks=chunks))
    write_volume(tmp_path / "tif_in" / "vol.tif", image, _geometry(shape, unit="micron"))
    model = _random_model(tmp_path / "model.pt")
    common = ["--slice_axis", "0", "--ckpt_path", str(model), "--infer_roi_size", "[64,64]",
              "--save_probabilities", "true", "--instance_method", "connected", "--min_size", "4"]
    for kind in ("zarr", "tif"):
        run_bundle("inference", "configs/inference.json", "--input_dir", str(tmp_path / f"{kind}_in"),
                   "--output_dir", str(tmp_path / f"{kind}_out"), *common)
    names = sorted(p.name for p in (tmp_path / "zarr_out").iterdir() if not p.name.startswith("."))
    assert {"vol_semantic.ome.zarr", "vol_instances.ome.zarr", "vol_prob.ome.zarr"} <= set(names)
    assert not [p for p in (tmp_path / "zarr_out").iterdir() if p.name.endswith(".tmp.zarr")]
    for kind, dtype in (("semantic", np.uint8), ("instances", np.uint32), ("prob", np.float32)):
        out = Volume(tmp_path / "zarr_out" / f"vol_{kind}.ome.zarr")
        assert out.shape == shape and out.dtype == dtype, kind
        assert out.geometry.extra["chunks"] == chunks and out.geometry.unit == "micrometer"
        np.testing.assert_allclose(out.geometry.spacing, SPACING)
        np.testing.assert_array_equal(out.read(), Volume(tmp_path / "tif_out" / f"vol_{kind}.tif").read())
    assert read_volume(tmp_path / "zarr_out" / "vol_semantic.ome.zarr")[0].any()


@pytest.mark.slow
def test_bundle_training_on_ome_zarr_volume(tmp_path):
    from test_volume_training import SCRIBBLED, make_volume_dataset

    from s2l_monai.data.datalist import item_id

    src = make_volume_dataset(tmp_path / "tif")
    data = tmp_path / "data"
    for sub in ("images", "scribbles", "labels"):
        arr, geometry = read_volume(src / sub / "vol.tif")
        write_volume(data / sub / "vol.ome.zarr", arr, _geometry(arr.shape, chunks=(2, 32, 32)))
    item = {"image": "images/vol.ome.zarr", "scribble": "scribbles/vol.ome.zarr", "label": "labels/vol.ome.zarr"}
    (data / "datalist.json").write_text(json.dumps({"training": [item], "validation": [item], "test": [item]}))
    proc = run_bundle(
        "training", "configs/train.json",
        "--dataset_dir", str(data), "--output_dir", str(tmp_path / "out"), "--ckpt_dir", str(tmp_path / "models"),
        "--slice_axis", "0", "--max_epochs", "2", "--warmup_epochs", "1", "--ema_every", "1", "--num_workers", "2",
        "--roi_size", "[64,64]", "--infer_roi_size", "[64,64]", "--batch_size", "4", "--num_samples", "2",
    )
    assert "s2l - INFO - epoch 2/2" in proc.stdout + proc.stderr
    ckpt = torch.load(tmp_path / "models" / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    vol_id = item_id("images/vol.ome.zarr")
    ema = ckpt["ema_store"]["items"][vol_id].numpy()
    assert ema.shape == (1, 8, 64, 64)
    assert [k for k in range(8) if not np.isnan(ema[0, k]).any()] == list(SCRIBBLED)
    assert (tmp_path / "out" / "ema" / f"{vol_id}.npy").is_file()  # one .npy per volume


# ---------------------------------------------------------------------------------------------------------------------
# Memory: a volume several times larger than the peak RSS allowed
# ---------------------------------------------------------------------------------------------------------------------

MEMORY_LIMIT_MB = 800.0


@pytest.mark.slow
def test_slice_wise_inference_on_ome_zarr_larger_than_memory(tmp_path):
    """A 384 MB OME-Zarr volume (192 x 512 x 512 float64; 8 bytes a voxel keeps the network's work at 50 Mvoxel on
    CI's 2 cores) segmented into semantic + instances + probability OME-Zarr volumes (450 MB more): the process
    tree's peak RSS stays under MEMORY_LIMIT_MB, less than the volume and its outputs together, while torch, MONAI
    and the bundle alone take ~500 MB of it. A memory-mapped or in-memory writer would need all of it resident."""
    sys.path.insert(0, str(REPO))
    from benchmarks import common
    from benchmarks.volume_memory import make_zarr_volume

    shape, chunks = (192, 512, 512), (8, 512, 512)
    images = tmp_path / "images"
    try:
        make_zarr_volume(images / "big.ome.zarr", shape, np.float64, chunks)
        volume_mb = float(np.prod(shape)) * 8 / 2**20
        outputs_mb = float(np.prod(shape)) * (1 + 4 + 4) / 2**20
        assert volume_mb + outputs_mb > MEMORY_LIMIT_MB
        model = _random_model(tmp_path / "model.pt")
        cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json",
               "--slice_axis", "0", "--input_dir", str(images), "--ckpt_path", str(model),
               "--output_dir", str(tmp_path / "out"), "--instance_method", "connected",
               "--save_probabilities", "true"]
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        res = common.run_measured(cmd, REPO, tmp_path / "log.txt", env=env)
        assert res.returncode == 0, (tmp_path / "log.txt").read_text()[-3000:]
        print(f"peak RSS {res.peak_rss_mb:.0f} MB, {res.seconds:.0f} s for a {volume_mb:.0f} MB volume")
        for kind in ("semantic", "instances", "prob"):
            out = Volume(tmp_path / "out" / f"big_{kind}.ome.zarr")
            assert out.shape == shape and out.geometry.extra["chunks"] == chunks
        assert res.peak_rss_mb < MEMORY_LIMIT_MB, f"peak RSS {res.peak_rss_mb:.0f} MB for a {volume_mb:.0f} MB volume"
    finally:
        shutil.rmtree(tmp_path / "images", ignore_errors=True)
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
