"""The foreground threshold chosen without labels (s2l_monai.calibration): edge scores against hand-computed values,
the choice, the file inference reads, and the post-processing that applies it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.inferers import SimpleInferer
from scipy import ndimage as ndi

from s2l_monai.calibration import (
    DEFAULT_THRESHOLD,
    MAX_FOREGROUND_SHARE,
    THRESHOLDS,
    ThresholdCalibration,
    calibrate_after_training,
    calibration_path,
    choose_threshold,
    edge_alignment,
    resolve_refinement,
    resolve_threshold,
)
from s2l_monai.crf import mean_field_refine
from s2l_monai.errors import ConfigError
from s2l_monai.instances import Instancesd
from s2l_monai.transforms import Argmaxd


def _step_case():
    """A vertical step edge between columns 7 and 8 of a 16x16 image, and a probability that rises 0.05 per column
    with p(8) = 0.325: ``p > t`` is the columns ``x >= c(t)`` (t 0.25 -> 7, 0.3 -> 8, 0.35 -> 9, ...)."""
    image = np.zeros((16, 16), np.float32)
    image[:, 8:] = 1.0
    prob = np.tile(0.325 + 0.05 * (np.arange(16, dtype=np.float32) - 8), (16, 1))
    return image, prob


def test_edge_alignment_is_the_gradient_under_the_outline():
    image, prob = _step_case()
    scores = edge_alignment(prob, image)
    # the image is constant along y, so its Gaussian gradient magnitude is |d/dx (G * step)| of the profile; the
    # outline of columns x >= c (image borders are not outlines) is column c alone
    g = np.abs(ndi.gaussian_filter1d(image[0], 1.0, order=1))
    for t, score in zip(THRESHOLDS, scores):
        columns = np.flatnonzero(prob[0] > t)
        if len(columns) in (0, 16):
            assert np.isnan(score)  # empty mask, or one that fills the image: no outline
        else:
            assert score == pytest.approx(g[columns[0]], rel=1e-5)
    # the strongest edge is on both sides of the step: columns 7 and 8 (t 0.25 and 0.3) tie; the one closer to 0.5
    t, curve = choose_threshold([scores])
    assert curve[THRESHOLDS.index(0.25)] == pytest.approx(curve[THRESHOLDS.index(0.3)], rel=1e-6)
    assert t == 0.3


def test_edge_alignment_averages_channels_and_checks_shapes():
    image, prob = _step_case()
    rgb = np.stack([image, image, image])
    np.testing.assert_allclose(edge_alignment(prob, rgb), edge_alignment(prob, image), rtol=1e-6)
    with pytest.raises(ValueError, match="differs"):
        edge_alignment(prob[:8], image)


def test_choose_threshold_scores_images_alike_and_ignores_incomplete_ones():
    n = len(THRESHOLDS)
    a = np.linspace(1.0, 2.0, n)  # best at 0.8
    b = np.linspace(3.0, 0.0, n)  # best at 0.2
    t, score = choose_threshold([a, b])
    np.testing.assert_allclose(score, (a + b) / 2)  # equal weights per image: 2 - k/(n-1), best at 0.2
    assert t == 0.2
    # an image without an outline at some threshold does not vote (otherwise it would move the mean there)
    c = np.full(n, np.nan)
    c[-1] = 100.0
    assert choose_threshold([a, b, c])[0] == 0.2
    # no complete image: each threshold over the images that have an outline there
    only = np.full(n, np.nan)
    only[3] = 1.0
    assert choose_threshold([only])[0] == THRESHOLDS[3]
    # nothing at all: the argmax
    t, score = choose_threshold([np.full(n, np.nan)])
    assert t == DEFAULT_THRESHOLD and np.isnan(score).all()
    # a flat curve: the candidate closest to 0.5
    assert choose_threshold([np.ones(n)])[0] == 0.5


def test_resolve_threshold(tmp_path):
    model = tmp_path / "model.pt"
    assert calibration_path(model) == tmp_path / "model.calibration.json"
    assert resolve_threshold("auto", model) == DEFAULT_THRESHOLD  # no calibration yet: the argmax
    assert resolve_threshold("AUTO", None) == DEFAULT_THRESHOLD
    calibration_path(model).write_text(json.dumps({"foreground_threshold": 0.35}))
    assert resolve_threshold("auto", model) == 0.35
    assert resolve_threshold(0.6, model) == 0.6 and resolve_threshold("0.4", model) == 0.4
    for bad in (0, 1.0, -0.2, "nan", "high", None):
        with pytest.raises(ConfigError, match="foreground_threshold"):
            resolve_threshold(bad, model)
    calibration_path(model).write_text("{not json")
    with pytest.raises(ConfigError, match="model.calibration.json"):
        resolve_threshold("auto", model)
    calibration_path(model).write_text(json.dumps({"foreground_threshold": 1.5}))
    with pytest.raises(ConfigError, match="not in"):
        resolve_threshold("auto", model)


def test_resolve_refinement(tmp_path):
    model = tmp_path / "model.pt"
    assert resolve_refinement("auto", model) == 0.0  # no calibration: no refinement
    assert resolve_refinement("auto", None) == 0.0
    calibration_path(model).write_text(json.dumps({"foreground_threshold": 0.35}))
    assert resolve_refinement("auto", model) == 0.0  # calibrated before refinement existed
    calibration_path(model).write_text(json.dumps({"foreground_threshold": 0.35, "refine_weight": 2.0}))
    assert resolve_refinement("Auto", model) == 2.0
    assert resolve_refinement(0, model) == 0.0 and resolve_refinement("1.5", model) == 1.5
    for bad in (-1, "strong", None, "nan"):
        with pytest.raises(ConfigError, match="refine_weight"):
            resolve_refinement(bad, model)
    calibration_path(model).write_text(json.dumps({"foreground_threshold": 0.35, "refine_weight": "x"}))
    with pytest.raises(ConfigError, match="model.calibration.json"):
        resolve_refinement("auto", model)


def test_post_processing_applies_the_threshold():
    prob = torch.tensor([[[0.6, 0.3, 0.9]], [[0.4, 0.7, 0.1]]])  # 2 x 1 x 3 softmax: foreground 0.4, 0.7, 0.1
    assert Argmaxd("pred")({"pred": prob})["pred"].tolist() == [[[0.0, 1.0, 0.0]]]
    assert Argmaxd("pred", foreground_threshold=0.35)({"pred": prob})["pred"].tolist() == [[[1.0, 1.0, 0.0]]]
    assert Argmaxd("pred", foreground_threshold=0.75)({"pred": prob})["pred"].tolist() == [[[0.0, 0.0, 0.0]]]
    # instances: a disc whose foreground probability is 0.4 is no object at the argmax, one at 0.35
    yy, xx = np.mgrid[:32, :32]
    fg = np.where((yy - 16) ** 2 + (xx - 16) ** 2 < 64, 0.4, 0.05).astype(np.float32)
    pred = torch.as_tensor(np.stack([1 - fg, fg]))
    assert int(Instancesd("pred", method="connected", min_size=4)({"pred": pred})["pred_instances"].max()) == 0
    out = Instancesd("pred", method="connected", min_size=4, foreground_threshold=0.35)({"pred": pred})
    assert int(out["pred_instances"].max()) == 1


class _Fixed(torch.nn.Module):
    """Logits ``[0, a * x + b]`` of the image ``x``: foreground probability ``sigmoid(a x + b)``."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), self.a * x + self.b], dim=1)


def _discs(n_images: int = 3, seed: int = 0) -> list[dict]:
    """Images of 16 anti-aliased discs (radius 5-9 px, sub-pixel centres) blurred by a Gaussian of 1 px."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:96, :96]
    items = []
    for _ in range(n_images):
        image = np.zeros((96, 96), np.float32)
        for cy, cx in np.stack(np.meshgrid(np.arange(12, 96, 24), np.arange(12, 96, 24)), -1).reshape(-1, 2):
            d = np.hypot(yy - cy - rng.uniform(-1, 1), xx - cx - rng.uniform(-1, 1))
            image = np.maximum(image, np.clip(rng.uniform(5, 9) - d + 0.5, 0, 1))
        items.append({"image": ndi.gaussian_filter(image, 1.0)[None]})
    return items


def test_calibration_undoes_a_shift_of_the_logits(tmp_path):
    """Two models that differ only by their bias (one says foreground 0.35, the other 0.65 where the image is at 0.3
    of its height) give different argmax masks but, read at their calibrated thresholds, the same masks: the
    threshold follows the image's edges, not the model's bias. The record is written where inference reads it."""
    items = _discs()
    masks, argmax, chosen = {}, {}, {}
    for level in (0.35, 0.65):
        net = _Fixed(8.0, float(np.log(level / (1 - level))) - 8.0 * 0.3)
        model = tmp_path / f"model_{level}.pt"
        model.write_bytes(b"weights")
        record = ThresholdCalibration(net, SimpleInferer(), max_items=2, refine_weight=0.0)(items, model)
        assert record["items"] == 2  # evenly spaced: the first and the last item
        chosen[level] = record["foreground_threshold"]
        assert resolve_threshold("auto", model) == chosen[level]
        saved = json.loads(calibration_path(model).read_text())
        assert saved["thresholds"] == list(THRESHOLDS) and len(saved["edge_score"]) == len(THRESHOLDS)
        # the flips change nothing for a pixel-wise model: the curve is that of the probabilities themselves
        probs = [torch.sigmoid(net.a * torch.as_tensor(items[i]["image"]) + net.b)[0].numpy() for i in (0, 2)]
        expected, _ = choose_threshold([edge_alignment(p, items[i]["image"]) for p, i in zip(probs, (0, 2))])
        assert chosen[level] == expected
        masks[level] = np.stack([p > chosen[level] for p in probs])
        argmax[level] = np.stack([p > 0.5 for p in probs])

    def iou(a, b):
        return (a & b).sum() / (a | b).sum()

    assert chosen[0.35] < 0.5 < chosen[0.65]
    assert iou(argmax[0.35], argmax[0.65]) < 0.9
    assert iou(masks[0.35], masks[0.65]) > 0.98


def test_calibrate_after_training_writes_skips_and_removes(tmp_path):
    items = _discs(1)
    net = _Fixed(8.0, -3.0)
    model = tmp_path / "model.pt"
    assert calibrate_after_training(net, items, SimpleInferer(), "cpu", model) is None  # nothing trained
    assert not calibration_path(model).exists()
    model.write_bytes(b"weights")
    record = calibrate_after_training(net, items, SimpleInferer(), "cpu", model, flips="true")
    assert record == ThresholdCalibration(net, SimpleInferer(), flips=False)(items)  # flips: same for this model
    assert record["refine_weight"] == 2.0 and resolve_refinement("auto", model) == 2.0  # the default refinement
    # the curve is scored on the refined probabilities, as inference thresholds them
    prob = torch.softmax(net(torch.as_tensor(items[0]["image"])[None]), dim=1)
    refined = mean_field_refine(prob, torch.as_tensor(items[0]["image"])[None], 2.0)[0, 1].numpy()
    assert record["edge_score"] == [None if np.isnan(v) else round(float(v), 6) for v in edge_alignment(
        refined, items[0]["image"])]
    record = calibrate_after_training(net, items, SimpleInferer(), "cpu", model, refine_weight=0)
    assert record["refine_weight"] == 0.0 and resolve_refinement("auto", model) == 0.0
    assert resolve_threshold("auto", model) == record["foreground_threshold"] != DEFAULT_THRESHOLD
    # data whose foreground fills most of the image (cells between membranes): the argmax, and why
    record = calibrate_after_training(net, items, SimpleInferer(), "cpu", model, foreground_share=0.7)
    assert record["foreground_threshold"] == DEFAULT_THRESHOLD and "70%" in record["not_calibrated"]
    assert resolve_threshold("auto", model) == DEFAULT_THRESHOLD and resolve_refinement("auto", model) == 0.0
    assert calibrate_after_training(net, items, SimpleInferer(), "cpu", model,
                                    foreground_share=MAX_FOREGROUND_SHARE)["foreground_threshold"] != 0.5
    # calibrate_threshold false: no file (a stale one would apply an old model's threshold to this one)
    assert calibrate_after_training(net, items, SimpleInferer(), "cpu", model, enabled="false") is None
    assert not calibration_path(model).exists()


def test_s2l_calibrate_on_saved_weights(tmp_path, capsys):
    """``s2l calibrate`` builds the network, data and inferer of configs/train.json, loads a saved model.pt and writes
    its calibration; on data whose foreground fills most of the image it keeps the argmax and says why."""
    from s2l_testing import default_network

    from s2l_monai.cli import main
    from s2l_monai.data.synthetic import make_synthetic_dataset

    torch.manual_seed(0)
    model = tmp_path / "model.pt"
    torch.save(default_network().state_dict(), model)
    make_synthetic_dataset(tmp_path / "sparse", n_train=3, n_val=0, n_test=0, shape=(160, 160), seed=3)
    assert main(["calibrate", "--ckpt", str(model), "--dataset_dir", str(tmp_path / "sparse")]) == 0
    record = json.loads(calibration_path(model).read_text())
    assert record["items"] == 3 and record["foreground_threshold"] in THRESHOLDS and record["refine_weight"] == 2.0
    assert f"foreground threshold {record['foreground_threshold']:.2f} (3 training images" in capsys.readouterr().out
    assert main(["calibrate", "--ckpt", str(model), "--dataset_dir", str(tmp_path / "sparse"),
                 "--refine_weight", "0"]) == 0
    assert resolve_refinement("auto", model) == 0.0 and "refinement weight 0;" in capsys.readouterr().out
    make_synthetic_dataset(tmp_path / "crowded", n_train=3, n_val=0, n_test=0, shape=(96, 96), seed=3)
    assert main(["calibrate", "--ckpt", str(model), "--dataset_dir", str(tmp_path / "crowded")]) == 0
    assert "not objects on a background" in capsys.readouterr().out
    assert resolve_threshold("auto", model) == DEFAULT_THRESHOLD
    # a missing file: one short error naming it
    assert main(["calibrate", "--ckpt", str(tmp_path / "absent.pt"), "--dataset_dir", str(tmp_path / "sparse")]) != 0
    assert f"{tmp_path / 'absent.pt'}: no such model file" in capsys.readouterr().err
