from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from s2l_monai.cli import main
from s2l_monai.data.balance import scribble_class_balance, suggested_class_weights


def _datalist(tmp_path, with_labels: bool = True, values: dict | None = None) -> str:
    """Two 10x10 items: 6 foreground + 14 background scribble pixels in all, 40 of 200 pixels foreground."""
    values = values or {"background": 0, "foreground": 1, "unlabelled": 255}
    u, fg, bg = values["unlabelled"], values["foreground"], values["background"]
    items = []
    for k, (n_fg, n_bg, n_true) in enumerate([(4, 6, 30), (2, 8, 10)]):
        scribble = np.full((10, 10), u, np.uint8)
        scribble.flat[:n_fg] = fg
        scribble.flat[50:50 + n_bg] = bg
        label = np.zeros((10, 10), np.uint16)
        label.flat[:n_true] = 1 + k
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / f"i{k}.png")
        Image.fromarray(scribble).save(tmp_path / f"s{k}.png")
        tifffile.imwrite(tmp_path / f"l{k}.tif", label)
        item = {"image": f"i{k}.png", "scribble": f"s{k}.png"}
        if with_labels:
            item["label"] = f"l{k}.tif"
        items.append(item)
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"scribble_values": values, "training": items}))
    return str(path)


def test_counts_and_shares_by_hand(tmp_path):
    counts = scribble_class_balance(_datalist(tmp_path))
    assert (counts.items, counts.pixels) == (2, 200)
    assert (counts.scribbled_foreground, counts.scribbled_background, counts.label_foreground) == (6, 14, 40)
    assert counts.scribble_foreground_share == pytest.approx(0.3)
    assert counts.scribbled_share == pytest.approx(0.1)
    assert counts.label_foreground_share == pytest.approx(0.2)


def test_datalist_scribble_values_are_used(tmp_path):
    counts = scribble_class_balance(_datalist(tmp_path, values={"background": 2, "foreground": 3, "unlabelled": 0}))
    assert (counts.scribbled_foreground, counts.scribbled_background) == (6, 14)


def test_suggested_weights_are_the_odds_ratio():
    # s = 0.3 -> odds 3/7; f = 0.2 -> odds 1/4; ratio 12/7
    assert suggested_class_weights(0.3, 0.2) == [round(12 / 7, 2), 1.0]
    assert suggested_class_weights(0.2, 0.2) == [1.0, 1.0]  # balanced scribbles need no correction
    # the weighted scribble sample has the image's foreground share
    w_bg, w_fg = suggested_class_weights(0.36, 0.14)
    assert 0.36 * w_fg / (0.36 * w_fg + 0.64 * w_bg) == pytest.approx(0.14, abs=1e-3)
    with pytest.raises(ValueError, match="both classes"):
        suggested_class_weights(0.0, 0.2)


def test_without_labels_and_volumes(tmp_path):
    counts = scribble_class_balance(_datalist(tmp_path, with_labels=False))
    assert counts.label_foreground is None and counts.label_foreground_share is None
    # a scribbled TIFF stack counts voxel by voxel
    vol = np.full((3, 4, 5), 255, np.uint8)
    vol[1, 0, :2] = 1
    vol[2, 3, :] = 0
    tifffile.imwrite(tmp_path / "v.tif", np.zeros((3, 4, 5), np.uint8))
    tifffile.imwrite(tmp_path / "vs.tif", vol)
    (tmp_path / "vol.json").write_text(json.dumps({"training": [{"image": "v.tif", "scribble": "vs.tif"}]}))
    counts = scribble_class_balance(tmp_path / "vol.json")
    assert (counts.pixels, counts.scribbled_foreground, counts.scribbled_background) == (60, 2, 5)
    # the same scribbles as NIfTI
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.transpose(vol, (2, 1, 0)), np.eye(4)), tmp_path / "vs.nii.gz")
    (tmp_path / "nii.json").write_text(json.dumps({"training": [{"image": "v.tif", "scribble": "vs.nii.gz"}]}))
    counts = scribble_class_balance(tmp_path / "nii.json")
    assert (counts.pixels, counts.scribbled_foreground, counts.scribbled_background) == (60, 2, 5)


def test_cli_prints_the_override(tmp_path, capsys):
    path = _datalist(tmp_path)
    assert main(["balance", "--datalist", path]) == 0
    out = capsys.readouterr().out
    assert "foreground share of the scribbled pixels: 0.300" in out
    assert 'suggested: --class_weights "[1.71, 1.0]"' in out
    assert main(["balance", "--datalist", _datalist(tmp_path, with_labels=False)]) == 0
    assert "pass --foreground-fraction" in capsys.readouterr().out
    assert main(["balance", "--datalist", path, "--foreground-fraction", "0.3"]) == 0
    assert '"[1.0, 1.0]"' in capsys.readouterr().out
    assert main(["balance", "--datalist", str(tmp_path / "nothing.json")]) == 2
    assert "no datalist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# The class prior from the scribbles alone (class_weights "auto")
# ---------------------------------------------------------------------------------------------------------------


def _scribbled_items(n: int, polarity: float = 1.0, seed: int = 0, n_nuclei=(4, 8)):
    from s2l_monai.data.scribbles import auto_scribbles
    from s2l_monai.data.synthetic import synthetic_nuclei

    items, fg, total = [], 0, 0
    for i in range(n):
        image, labels = synthetic_nuclei((128, 128), seed=seed + i, n_nuclei=n_nuclei)
        grey = image.astype(np.float32) / 255.0
        if polarity < 0:  # dark nuclei on a bright background, as in bright-field and H&E
            grey = 1.0 - grey
        scribble = auto_scribbles(labels > 0, 0.3, seed=i)
        items.append({"image": np.stack([grey, grey, grey]), "scribble": scribble[None]})
        fg += int((labels > 0).sum())
        total += labels.size
    return items, fg / total


@pytest.mark.parametrize("polarity", [1.0, -1.0])
def test_prior_estimated_from_scribbles_matches_the_known_share(polarity):
    """Synthetic nuclei with a known foreground share: the estimate from the scribbles alone is close to it, for
    bright and for dark nuclei, and the weights are the importance weights of that share."""
    from s2l_monai.data.balance import estimate_class_prior, suggested_class_weights

    items, true_share = _scribbled_items(12, polarity)
    est = estimate_class_prior(items)
    assert est.items == 12
    assert abs(est.image_foreground_share - true_share) < 0.03, (est, true_share)
    s = est.scribble_foreground_share
    assert s > true_share + 0.1  # the scribbles over-represent the foreground: the bias being corrected
    assert est.class_weights == [pytest.approx(suggested_class_weights(s, est.image_foreground_share)[0], abs=0.011),
                                 1.0]
    truth = suggested_class_weights(s, true_share)[0]
    assert est.class_weights[0] == pytest.approx(truth, rel=0.25)


def test_prior_hand_computed_threshold_case():
    """Two images of known pixels: bright half is foreground; scribbles put 3 fg and 1 bg pixel per image."""
    from s2l_monai.data.balance import estimate_class_prior

    image = np.zeros((1, 4, 8), np.float32)
    image[0, :, :2] = 1.0  # 8 of 32 pixels bright: f = 0.25
    scribble = np.full((1, 4, 8), 255, np.uint8)
    scribble[0, 0, :2] = 1
    scribble[0, 1, 0] = 1
    scribble[0, 3, 7] = 0
    est = estimate_class_prior([{"image": image, "scribble": scribble}] * 2, sigma=0)
    assert est.image_foreground_share == pytest.approx(0.25)
    assert est.scribble_foreground_share == pytest.approx(0.75)
    assert est.class_weights == [pytest.approx((0.75 / 0.25) / (0.25 / 0.75)), 1.0]  # odds ratio 9


def test_resolve_class_weights(tmp_path):
    from s2l_monai.data.balance import resolve_class_weights

    assert resolve_class_weights(None) is None
    assert resolve_class_weights("none") is None and resolve_class_weights("null") is None  # typed on a command line
    assert resolve_class_weights([2, 1]) == [2.0, 1.0]
    with pytest.raises(ValueError, match="'auto'"):
        resolve_class_weights("balanced", [])
    items, _ = _scribbled_items(4)
    weights = resolve_class_weights("auto", items, output_dir=tmp_path)
    assert weights[1] == 1.0 and weights[0] > 1.5
    saved = json.loads((tmp_path / "class_prior.json").read_text())
    assert saved["class_weights"] == weights and 0 < saved["image_foreground_share"] < 0.5
    assert resolve_class_weights("auto", items, output_dir=tmp_path) == weights  # one estimate per run
    no_fg = [{"image": it["image"], "scribble": np.where(it["scribble"] == 1, 255, it["scribble"])} for it in items]
    with pytest.raises(ValueError, match="no foreground scribble"):
        resolve_class_weights("auto", no_fg, output_dir=tmp_path / "other")
