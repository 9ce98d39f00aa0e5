"""``pretrained_weights``: the shipped weights by default where they fit the network, else from scratch."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet

from s2l_monai import pretrained
from s2l_monai.errors import ConfigError
from s2l_monai.pretrained import fit_problem, resolve_pretrained, shipped_weights

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "bundle" / "models" / "model.pt"


DEFAULT_CHANNELS = tuple(json.loads((REPO / "configs" / "train.json").read_text())["network_def"]["channels"])


def _unet(in_channels: int = 1, channels: tuple[int, ...] = DEFAULT_CHANNELS) -> UNet:
    """configs/train.json's ``network_def`` (the shipped weights' network) with the given channels."""
    return UNet(spatial_dims=2, in_channels=in_channels, out_channels=2, channels=channels,
                strides=(2,) * (len(channels) - 1), num_res_units=1)


def test_shipped_weights_are_found_from_a_bundle_root_or_the_checkout(tmp_path):
    assert shipped_weights(REPO) == SHIPPED
    assert shipped_weights(tmp_path) == SHIPPED  # not under that root: the package's own checkout
    package = tmp_path / "models" / "pretrained.pt"  # a model-zoo package's copy comes first under its root
    package.parent.mkdir()
    package.write_bytes(SHIPPED.read_bytes())
    assert shipped_weights(tmp_path) == package


def test_auto_starts_from_the_shipped_weights_where_they_fit(caplog):
    with caplog.at_level(logging.INFO, logger="s2l_monai.pretrained"):
        assert resolve_pretrained("auto", _unet(), REPO) == str(SHIPPED)
    assert f"starts from the shipped weights {SHIPPED}" in caplog.text
    net = _unet()
    net.load_state_dict(torch.load(SHIPPED, map_location="cpu", weights_only=True))  # they do fit: strict load


@pytest.mark.parametrize(
    "network, why",
    [
        (_unet(in_channels=3), "they take 1-channel images, this network 3-channel ones"),  # H&E
        (_unet(channels=(8, 16, 32, 64)), "other shapes (model.0.conv.unit0.conv.weight: (16, 1, 3, 3) saved, (8, 1"),
        (_unet(channels=(16, 32, 64)), "other layers (")  # the 2-level default network until v0.14
    ],
)
def test_auto_trains_from_scratch_where_they_do_not_fit_and_says_why(network, why, caplog):
    with caplog.at_level(logging.INFO, logger="s2l_monai.pretrained"):
        assert resolve_pretrained("auto", network, REPO) == ""
    assert "do not fit this network" in caplog.text and why in caplog.text and "starts from scratch" in caplog.text
    assert fit_problem(SHIPPED, network).startswith(why[:10])
    assert fit_problem(SHIPPED, _unet()) is None


def test_auto_without_shipped_weights_trains_from_scratch(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(pretrained, "SHIPPED_WEIGHTS", ("no/such/model.pt",))
    with caplog.at_level(logging.INFO, logger="s2l_monai.pretrained"):
        assert resolve_pretrained("auto", _unet(), tmp_path) == ""
    assert "no shipped weights found" in caplog.text


@pytest.mark.parametrize("value", ["", None, "none", " None ", "false", "scratch"])
def test_empty_value_trains_from_scratch(value):
    assert resolve_pretrained(value, _unet(), REPO) == ""


def test_a_given_file_must_exist_and_fit(tmp_path):
    assert resolve_pretrained(str(SHIPPED), _unet()) == str(SHIPPED)
    with pytest.raises(ConfigError, match="pretrained_weights: .*missing.pt does not exist"):
        resolve_pretrained(tmp_path / "missing.pt", _unet())
    with pytest.raises(ConfigError, match=r"model.pt does not fit this network: they take 1-channel images, this "
                                         r"network 3-channel ones"):
        resolve_pretrained(SHIPPED, _unet(in_channels=3))
    checkpoint = tmp_path / "checkpoint.pt"  # a checkpoint dict holding the network under "model" is read too
    torch.save({"model": torch.load(SHIPPED, map_location="cpu", weights_only=True)}, checkpoint)
    assert fit_problem(checkpoint, _unet()) is None
    other = tmp_path / "other.pt"
    torch.save([1, 2, 3], other)
    with pytest.raises(ConfigError, match="other.pt is not a state dict of a network"):
        resolve_pretrained(other, _unet())
    text = tmp_path / "notes.pt"
    text.write_text("not weights")
    with pytest.raises(ConfigError, match="notes.pt cannot be read as PyTorch weights"):
        resolve_pretrained(text, _unet())


def _items(membranes: bool) -> list[dict]:
    """Two 64x64 items, ``image`` 1HW and ``scribble`` 1HW (0 background, 1 foreground, 255 unlabelled): bright cell
    interiors between dark 2-px membranes (foreground about 77% of the pixels, like ISBI EM), or bright 12-px
    nuclei on a dark background (foreground about 11%)."""
    items = []
    for _ in range(2):
        fg = np.zeros((64, 64), bool)
        if membranes:
            fg[:] = True
            for c in (0, 16, 32, 48):
                fg[c:c + 2, :] = False
                fg[:, c:c + 2] = False
        else:
            yy, xx = np.mgrid[:64, :64]
            for cy, cx in ((16, 16), (16, 48), (48, 32)):
                fg |= (yy - cy) ** 2 + (xx - cx) ** 2 < 36
        image = np.where(fg, 200.0, 20.0).astype(np.float32)
        scribble = np.full((64, 64), 255, np.uint8)
        scribble[fg & (np.arange(64)[:, None] % 8 == 2)] = 1  # strokes inside the objects
        scribble[~fg & (np.arange(64)[None, :] % 8 == 1)] = 0  # and on the background
        items.append({"image": image[None], "scribble": scribble[None]})
    return items


@pytest.mark.parametrize("membranes, expected", [(False, True), (True, False)])
def test_auto_starts_from_them_only_where_the_data_are_objects_on_a_background(membranes, expected, tmp_path, caplog):
    items = _items(membranes)
    with caplog.at_level(logging.INFO):
        start = resolve_pretrained("auto", _unet(), REPO, items=items, output_dir=tmp_path)
    share = json.loads((tmp_path / "class_prior.json").read_text())["image_foreground_share"]
    assert share == pytest.approx(0.77 if membranes else 0.11, abs=0.05)  # the run's one class-prior estimate
    assert start == (str(SHIPPED) if expected else "")
    if not expected:
        assert f"the scribbles put about {100 * share:.0f}% of the pixels in the foreground" in caplog.text
        assert "starts from scratch" in caplog.text
    assert caplog.text.count("class prior estimated from the scribbles") == 1
    # class_weights "auto" of the same run reuses that estimate instead of computing and logging it again
    from s2l_monai.data.balance import resolve_class_weights

    weights = resolve_class_weights("auto", items, 255, tmp_path)
    assert caplog.text.count("class prior estimated from the scribbles") == 1 and weights[1] == 1.0
