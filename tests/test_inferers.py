"""WholeImageInferer: pads to the network's divisor, crops back, falls back to sliding windows on large inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import UNet

from s2l_monai.inferers import WholeImageInferer

REPO = Path(__file__).resolve().parents[1]


class _Recorder(torch.nn.Module):
    """A pointwise network (1x1 convolution) that records the spatial sizes it was called with."""

    def __init__(self, divisible: int = 1) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 1)
        self.divisible = divisible
        self.sizes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape[2:]))
        assert all(s % self.divisible == 0 for s in x.shape[2:]), f"not divisible: {tuple(x.shape)}"
        return self.conv(x)


@pytest.mark.parametrize("shape", [(37, 70), (64, 64), (5, 7)])
def test_pads_to_divisor_and_crops_back(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    net = _Recorder(divisible=32)
    x = torch.rand(2, 1, *shape)
    out = WholeImageInferer(divisible=32)(x, net)
    assert out.shape == (2, 2, *shape)
    assert net.sizes == [tuple(-(-s // 32) * 32 for s in shape)]  # one call, each size rounded up to 32
    # a pointwise network must give exactly its output on the unpadded image
    torch.testing.assert_close(out, net.conv(x))


def test_large_inputs_go_to_the_fallback() -> None:
    net = _Recorder()
    inferer = WholeImageInferer(divisible=1, max_pixels=64 * 64, fallback=SlidingWindowInferer((32, 32), 4))
    inferer(torch.rand(1, 1, 64, 64), net)
    assert net.sizes == [(64, 64)]
    net.sizes.clear()
    out = inferer(torch.rand(1, 1, 64, 65), net)  # one pixel row too many: sliding windows of 32x32
    assert out.shape == (1, 2, 64, 65) and net.sizes and all(s == (32, 32) for s in net.sizes)


def test_unet_padding_only_touches_the_far_border() -> None:
    """A UNet's logits for a crop match those of the larger image it was cut from, away from the padded border.

    The crop starts at the origin, so the pixel grid keeps its phase against the network's strides (a shift that is
    not a multiple of them changes a strided network's output everywhere); batch norm in eval mode keeps each pixel
    local (with instance norm, the default UNet, the whole input's statistics enter every pixel: the README gives
    the measured effect on DSB-Fluo).
    """
    torch.manual_seed(0)
    net = UNet(2, 1, 2, channels=(16, 32, 64), strides=(2, 2), num_res_units=1, norm="batch").eval()
    big = torch.rand(1, 1, 200, 260)
    with torch.inference_mode():
        whole = WholeImageInferer(divisible=4)(MetaTensor(big[..., :150, :210]), net)  # padded to 152x212
        reference = net(big)
    assert whole.shape == (1, 2, 150, 210)
    inner = (slice(None), slice(None), slice(0, 110), slice(0, 170))
    torch.testing.assert_close(torch.as_tensor(whole)[inner], reference[inner], atol=1e-5, rtol=1e-5)


def test_bad_divisor_is_refused() -> None:
    with pytest.raises(ValueError, match="divisible"):
        WholeImageInferer(divisible=0)


@pytest.mark.parametrize("whole, expected", [(True, WholeImageInferer), (False, SlidingWindowInferer)])
def test_train_json_ensemble_inferer(whole: bool, expected: type) -> None:
    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "train.json"))
    parser["ensemble_whole_image"] = whole
    inferer = parser.get_parsed_content("ensemble#inferer")
    assert isinstance(inferer, expected)
    if whole:
        assert isinstance(inferer.fallback, SlidingWindowInferer)
        assert inferer.max_pixels == parser["infer_max_pixels"]


def test_flip_averaging_equals_the_mean_over_flipped_inputs():
    """``FlipAveragingInferer``: mean over the four flips of ``F^-1(net(F(x)))``, checked against a net that is not
    flip-equivariant (it multiplies by a fixed ramp), computed by hand."""
    from monai.inferers import SimpleInferer

    from s2l_monai.inferers import FlipAveragingInferer

    h, w = 4, 6
    ramp = torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w)

    def net(x):
        return torch.cat([x * ramp, -x], 1)

    x = torch.randn(2, 1, h, w)
    out = FlipAveragingInferer(SimpleInferer())(x, net)
    # F^-1(F(x) * ramp) = x * F^-1(ramp): the flips average the ramp
    mean_ramp = (ramp + ramp.flip(2) + ramp.flip(3) + ramp.flip(2, 3)) / 4
    torch.testing.assert_close(out[:, :1], x * mean_ramp)
    torch.testing.assert_close(out[:, 1:], -x)  # an equivariant channel is unchanged
    only = FlipAveragingInferer(SimpleInferer(), flips=((),))(x, net)
    torch.testing.assert_close(only, net(x))


def test_inference_config_averages_flips_by_default():
    from monai.bundle import ConfigParser

    from s2l_monai.inferers import FlipAveragingInferer

    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "inference.json"))
    assert parser["test_time_flips"] is True
    assert isinstance(parser.get_parsed_content("inferer"), FlipAveragingInferer)
    parser["test_time_flips"] = False
    assert not isinstance(parser.get_parsed_content("inferer", lazy=False), FlipAveragingInferer)


def test_inference_config_flags_from_the_command_line_and_whole_image_option():
    from monai.bundle import ConfigParser
    from monai.inferers import SlidingWindowInferer

    from s2l_monai.inferers import FlipAveragingInferer, WholeImageInferer

    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "inference.json"))
    assert isinstance(parser.get_parsed_content("inferer").inferer, SlidingWindowInferer)  # the default: windows
    parser["test_time_flips"] = "false"  # what `--test_time_flips false` hands the config
    assert isinstance(parser.get_parsed_content("inferer", lazy=False), SlidingWindowInferer)
    parser["test_time_flips"] = True
    parser["infer_whole_image"] = "true"
    inferer = parser.get_parsed_content("inferer", lazy=False)
    assert isinstance(inferer, FlipAveragingInferer) and isinstance(inferer.inferer, WholeImageInferer)
    assert isinstance(inferer.inferer.fallback, SlidingWindowInferer)


@pytest.mark.parametrize("size", [(64, 64), (62, 70)])
def test_whole_image_inferer_hands_the_network_a_plain_tensor(size):
    """With or without padding, the network sees a plain tensor (no MetaTensor dispatch per operation)."""
    seen = []

    def net(x):
        seen.append(type(x))
        return x * 2

    out = WholeImageInferer(divisible=4)(MetaTensor(torch.ones(1, 1, *size)), net)
    assert seen == [torch.Tensor]
    assert tuple(out.shape[2:]) == size and float(out.mean()) == 2.0
