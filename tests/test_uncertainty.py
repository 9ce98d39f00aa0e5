"""Uncertainty maps from the ensemble and ``s2l suggest`` (where to scribble next)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator
from monai.inferers import SimpleInferer
from PIL import Image

from s2l_monai import cli
from s2l_monai.ensemble import EMAEnsembleHandler, EMAStore
from s2l_monai.suggestions import load_summary, rank_items, suggest, uncertain_regions
from s2l_monai.uncertainty import UncertaintyMaps, pixel_uncertainty, read_map, uncertain_threshold


def _binary(fg: float | np.ndarray) -> np.ndarray:
    fg = np.asarray(fg, dtype=np.float32).reshape(1, 1, -1)
    return np.concatenate([1 - fg, fg], 0)


def test_pixel_uncertainty_hand_computed():
    # indecision 1 - |2 y1 - 1|: 0.5 -> 1, 0.9 -> 0.2, 0.0 -> 0
    np.testing.assert_allclose(pixel_uncertainty(_binary([0.5, 0.9, 0.0]))[0], [1.0, 0.2, 0.0], atol=1e-6)
    # change since the previous average: 1/2 sum_c |p_c - y_prev,c| = |0.9 - 0.2| = 0.7 > indecision 0.2
    u = pixel_uncertainty(_binary([0.9, 0.9]), previous=_binary([0.2, 0.85]), prob=_binary([0.9, 0.95]))
    np.testing.assert_allclose(u[0], [0.7, 0.2], atol=1e-6)
    # three classes: one minus the margin of the two best, 1 - (0.5 - 0.3)
    three = np.array([0.5, 0.3, 0.2], np.float32).reshape(3, 1, 1)
    np.testing.assert_allclose(pixel_uncertainty(three), [[0.8]], atol=1e-6)
    # scribbled pixels are known: 0
    assert pixel_uncertainty(_binary([0.5, 0.5]), scribbled=np.array([[True, False]])).tolist() == [[0.0, 1.0]]


def test_threshold_is_the_consistency_test():
    """For two classes, u >= 2 (1 - tau) exactly where the average fails max_c y_c > tau (no change term)."""
    assert uncertain_threshold(0.8) == pytest.approx(0.4)
    fg = np.linspace(0, 1, 1001, dtype=np.float64)
    average = _binary(fg).astype(np.float64)
    u = 1.0 - np.abs(average[1] - average[0])
    fails = average.max(0) <= 0.8
    margin = np.abs(fg - 0.8) > 1e-6  # leave out the tie at exactly tau (float rounding)
    assert np.array_equal((u >= uncertain_threshold(0.8) - 1e-9)[0][margin], fails[0][margin])


def test_maps_commit_atomically_and_abort_keeps_the_previous(tmp_path):
    maps = UncertaintyMaps(tmp_path / "u", tau=0.8, items=[{"id": "a", "image": "/x/a.png", "scribble": "/x/sa.png"}])
    u = np.zeros((4, 5), np.float32)
    u[1:3, 1:4] = 0.5
    free = np.ones((4, 5), bool)
    free[0] = False
    maps.begin()
    maps.add("a", u, free)
    quarter = np.full((4, 5), 0.25, np.float32)
    quarter[0] = 0  # scribbled: 0, as pixel_uncertainty gives
    maps.add("vol", quarter, free, slice_index=2, num_slices=3)
    summary_path = maps.commit(epoch=3, step=30)
    summary = json.loads(summary_path.read_text())
    a, vol = summary["items"]
    assert (a["id"], a["image"], a["slice"], a["unlabelled_pixels"]) == ("a", "/x/a.png", None, 15)
    assert a["mean"] == pytest.approx(6 * 0.5 / 15, abs=1e-4) and a["uncertain_share"] == pytest.approx(6 / 15)
    assert (vol["slice"], vol["uncertain_share"], vol["mean"]) == (2, 0.0, pytest.approx(0.25, abs=3e-3))
    assert summary["threshold"] == pytest.approx(0.4) and (summary["epoch"], summary["step"]) == (3, 30)
    np.testing.assert_array_equal(read_map(tmp_path / "u", a), np.rint(u * 255).astype(np.uint8))
    assert a["map"].startswith("maps_") and a["offset"] == 0  # the 2D maps of an ensemble share one file
    volume = np.load(tmp_path / "u" / "vol.npy")
    np.testing.assert_array_equal(read_map(tmp_path / "u", vol), volume[2])
    assert volume.shape == (3, 4, 5) and volume[2].max() == 64 and volume[[0, 1]].max() == 0
    # a failed ensemble: nothing it added is published
    maps.begin()
    maps.add("a", np.ones((4, 5), np.float32), free)
    maps.abort()
    assert json.loads(summary_path.read_text()) == summary
    np.testing.assert_array_equal(read_map(tmp_path / "u", a), np.rint(u * 255).astype(np.uint8))
    assert not list((tmp_path / "u").glob(".*tmp*"))
    # the next ensemble: two maps packed one after the other; the previous pack is gone once the summary is replaced
    maps.begin()
    maps.add("a", np.full((4, 5), 0.5, np.float32), free)
    maps.add("b", np.full((2, 3), 1.0, np.float32), np.ones((2, 3), bool))
    new = json.loads(maps.commit(epoch=4, step=40).read_text())["items"]
    assert new[1]["offset"] == 20 and read_map(tmp_path / "u", new[1]).tolist() == [[255] * 3] * 2
    assert sorted(p.name for p in (tmp_path / "u").glob("maps_*.u8")) == [new[0]["map"]] != [a["map"]]


def test_regions_best_first_with_padded_boxes():
    u = np.zeros((40, 50), np.float32)
    u[5:10, 5:10] = 0.5    # 25 px, score 12.5
    u[20:30, 30:40] = 0.9  # 100 px, score 90: first
    u[35, 2:5] = 1.0       # 3 px: too small
    regions = uncertain_regions(u, 0.4, max_regions=3, min_pixels=16, pad=2)
    assert [r["box"] for r in regions] == [[18, 28, 32, 42], [3, 3, 12, 12]]
    assert [r["pixels"] for r in regions] == [100, 25] and regions[0]["score"] == pytest.approx(90.0)
    assert uncertain_regions(np.zeros((8, 8), np.float32), 0.4) == []


class _Threshold(torch.nn.Module):
    """A 'network' whose foreground logit is 12 (x - 0.5): sure on dark and bright pixels, undecided at 0.5."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        fg = 12.0 * (x[:, :1] - 0.5)
        return torch.cat([torch.zeros_like(fg), fg], 1)


def _write_item(folder, name, image, scribble):
    Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"{name}.png")
    Image.fromarray(scribble.astype(np.uint8)).save(folder / f"{name}_s.png")
    return {"id": name, "image": str(folder / f"{name}.png"), "scribble": str(folder / f"{name}_s.png")}


def test_ensemble_writes_maps_and_suggest_ranks_the_ambiguous_image_first(tmp_path, capsys):
    """Three images with clear nuclei; one also holds a grey patch the network cannot decide: it is suggested first,
    with a box around that patch, and the figures and tables are written."""
    shape = (48, 64)
    images = {}
    for name in ("clear0", "ambiguous", "clear1"):
        image = np.zeros(shape, np.float32)
        image[8:18, 8:18] = 1.0
        image[30:40, 40:52] = 1.0
        images[name] = image
    images["ambiguous"][26:42, 6:26] = 0.5
    scribble = np.full(shape, 255, np.uint8)
    scribble[12:14, 10:16] = 1
    scribble[0:2, :] = 0
    paths = [_write_item(tmp_path, n, im, scribble) for n, im in images.items()]
    items = [{"id": p["id"], "image": torch.from_numpy(images[p["id"]][None]),
              "scribble": torch.from_numpy(scribble[None].astype(np.float32))} for p in paths]
    net = _Threshold()
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=DataLoader(items, batch_size=1),
                                    network=net, inferer=SimpleInferer(), decollate=False)
    maps = UncertaintyMaps(tmp_path / "run" / "uncertainty", tau=0.8, items=paths)
    handler = EMAEnsembleHandler(evaluator, EMAStore(tmp_path / "run" / "ema"), every=1, alpha=0.5, tau=0.8,
                                 figure_dir=tmp_path / "run" / "fig", num_figures=1, uncertainty=maps)
    trainer = Engine(lambda engine, batch: None)
    trainer.network = net
    handler.attach(trainer)
    trainer.run(range(1), max_epochs=2)

    summary, folder = load_summary(tmp_path / "run")
    assert summary["epoch"] == 2 and [e["id"] for e in rank_items(summary)][0] == "ambiguous"
    by_id = {e["id"]: e for e in summary["items"]}
    assert by_id["ambiguous"]["uncertain_share"] > 0.05 > by_id["clear0"]["uncertain_share"]
    # the pseudo-label figure has the uncertainty as a third panel
    assert np.asarray(Image.open(tmp_path / "run" / "fig" / "clear0_epoch0002.png")).shape == (48, 3 * 64 + 8, 3)

    assert cli.main(["suggest", "--run", str(tmp_path / "run"), "--top", "2", "--regions", "2"]) == 0
    printed = capsys.readouterr().out
    assert "1. " + paths[1]["image"] in printed
    out = tmp_path / "run" / "suggestions"
    chosen = json.loads((out / "suggestions.json").read_text())["suggestions"]
    assert [s["id"] for s in chosen][0] == "ambiguous" and len(chosen) == 2
    y0, x0, y1, x1 = chosen[0]["regions"][0]["box"]
    assert y0 <= 26 and x0 <= 6 and y1 >= 42 and x1 >= 26 and y1 - y0 < 30 and x1 - x0 < 32
    rows = list(csv.reader(open(out / "suggestions.csv")))
    assert rows[0][0] == "rank" and rows[1][1] == paths[1]["image"]
    picture = np.asarray(Image.open(chosen[0]["picture"]))
    assert picture.shape == (48, 3 * 64 + 8, 3)
    assert (picture[y0, x0 + 64 + 4] == (0, 255, 128)).all()  # the box, drawn on the scribbled image


def test_suggest_without_an_ensemble_says_so(tmp_path, capsys):
    assert cli.main(["suggest", "--run", str(tmp_path)]) == 2
    assert "uncertainty.json" in capsys.readouterr().err


def test_volume_slices_are_ranked_and_drawn(tmp_path):
    import tifffile

    volume = np.zeros((4, 32, 40), np.float32)
    tifffile.imwrite(tmp_path / "vol.tif", volume)
    tifffile.imwrite(tmp_path / "vol_s.tif", np.full((4, 32, 40), 255, np.uint8))
    maps = UncertaintyMaps(tmp_path / "u", items=[{"id": "vol", "image": str(tmp_path / "vol.tif"),
                                                   "scribble": str(tmp_path / "vol_s.tif")}], slice_axis=0)
    free = np.ones((32, 40), bool)
    for k, level in ((0, 0.1), (2, 0.9)):
        u = np.zeros((32, 40), np.float32)
        u[4:20, 4:30] = level
        maps.add("vol", u, free, slice_index=k, num_slices=4)
    maps.commit(1, 1)
    chosen, out = suggest(tmp_path / "u", top=1)
    assert (chosen[0]["slice"], chosen[0]["regions"][0]["box"]) == (2, [0, 0, 24, 34])
    assert (out / "01_vol_z0002.png").is_file()
