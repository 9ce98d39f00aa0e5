"""Training precision: the ``precision`` key resolved per device, and AutocastInferer's bfloat16 forward pass."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import SimpleInferer

from s2l_monai.inferers import AutocastInferer
from s2l_monai.precision import native_bf16, resolve_precision


class _DtypeRecorder(torch.nn.Module):
    """A 3x3 convolution that records the dtype its output had inside the forward pass."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.dtypes: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        self.dtypes.append(y.dtype)
        return y


def test_precision_key_resolves_per_device(caplog):
    """``fp32`` never autocasts, ``bf16`` always does, ``auto`` follows the hardware; each says so in the log."""
    with caplog.at_level("INFO", logger="s2l"):
        assert resolve_precision("fp32", "cpu") is None
        assert resolve_precision("BF16", "cpu") is torch.bfloat16
        native, reason = native_bf16("cpu")
        assert resolve_precision("auto", "cpu") is (torch.bfloat16 if native else None)
    text = caplog.text
    assert "training precision: float32 (asked for" in text
    assert "training precision: bfloat16 autocast (asked for" in text
    assert reason in text
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32; got 'fp16'"):
        resolve_precision("fp16", "cpu")


def test_autocast_inferer_runs_the_convolutions_in_bfloat16_and_returns_float32():
    """Inside, the convolution computes in bfloat16; out comes float32 within bfloat16's rounding (8 bits of
    mantissa: a relative error of 2**-8 per operand) of the float32 result, and the gradients reach the float32
    weights as float32."""
    net = _DtypeRecorder()
    x = torch.rand(2, 1, 16, 16)
    ref = SimpleInferer()(x, net)
    out = AutocastInferer(SimpleInferer(), torch.bfloat16)(x, net)
    assert net.dtypes == [torch.float32, torch.bfloat16]
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert not torch.equal(out, ref)  # it did round
    scale = ref.detach().abs().max()
    assert torch.allclose(out, ref, atol=float(scale) * 2**-6)
    out.sum().backward()
    assert net.conv.weight.grad is not None and net.conv.weight.grad.dtype == torch.float32
    assert net.conv.weight.dtype == torch.float32


def test_autocast_inferer_without_dtype_is_the_inner_inferer():
    net = _DtypeRecorder()
    x = torch.rand(1, 1, 8, 8)
    assert torch.equal(AutocastInferer(SimpleInferer(), None)(x, net), SimpleInferer()(x, net))
    assert net.dtypes == [torch.float32, torch.float32]
