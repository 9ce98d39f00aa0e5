from __future__ import annotations

import math

import pytest
import torch

from s2l_monai.losses import ScribbleLoss

U = 255


def _logits() -> torch.Tensor:
    # one image, two classes, 1x3 pixels; foreground logit minus background logit = 1, 2, -1
    return torch.tensor([[[[0.0, 0.0, 0.0]], [[1.0, 2.0, -1.0]]]], requires_grad=True)


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_scribbled_term_matches_hand_computation():
    scribble = torch.tensor([[[[1, U, 0]]]], dtype=torch.float32)
    loss = ScribbleLoss(tau=0.8, lambda_up=0.5)(_logits(), scribble)
    # pixel 0: foreground, p_fg = sigmoid(1); pixel 2: background, p_bg = 1 - sigmoid(-1)
    expected = (-math.log(_sig(1.0)) - math.log(1.0 - _sig(-1.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_pseudo_label_term_matches_hand_computation():
    logits = _logits()
    scribble = torch.tensor([[[[1, U, 0]]]], dtype=torch.float32)
    # averaged foreground probabilities: 0.95 (scribbled, excluded), 0.9 (passes tau), 0.3 (max 0.7 < tau)
    fg = torch.tensor([0.95, 0.9, 0.3])
    pseudo = torch.stack([1 - fg, fg]).view(1, 2, 1, 3)
    fn = ScribbleLoss(tau=0.8, lambda_up=0.5)
    loss = fn(logits, scribble, pseudo)
    l_sp = (-math.log(_sig(1.0)) - math.log(1.0 - _sig(-1.0))) / 2
    l_up = -math.log(_sig(2.0))  # Omega_g = {pixel 1}, pseudo-label foreground
    assert loss.item() == pytest.approx(l_sp + 0.5 * l_up, rel=1e-6)
    assert fn.terms["loss_up"] == pytest.approx(l_up, rel=1e-6)
    assert fn.terms["omega_g"] == pytest.approx(1.0)  # the one unscribbled pixel is in Omega_g
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_packed_target_equals_separate_pseudo():
    scribble = torch.tensor([[[[1, U, 0]]]], dtype=torch.float32)
    fg = torch.tensor([0.1, 0.05, 0.99])
    pseudo = torch.stack([1 - fg, fg]).view(1, 2, 1, 3)
    fn = ScribbleLoss(tau=0.8, lambda_up=0.5)
    separate = fn(_logits(), scribble, pseudo)
    packed = fn(_logits(), torch.cat([scribble, pseudo], 1))
    assert packed.item() == pytest.approx(separate.item())
    # pixel 1 is background in the pseudo-label with confidence 0.95
    l_up = -math.log(1.0 - _sig(2.0))
    assert fn.terms["loss_up"] == pytest.approx(l_up, rel=1e-6)


def test_warmup_switch_keeps_term_for_logging_only():
    scribble = torch.tensor([[[[1, U, 0]]]], dtype=torch.float32)
    pseudo = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1).expand(1, 2, 1, 3)
    fn = ScribbleLoss(tau=0.8, lambda_up=0.5, pseudo_label_enabled=False)
    loss = fn(_logits(), scribble, pseudo)
    l_sp = (-math.log(_sig(1.0)) - math.log(1.0 - _sig(-1.0))) / 2
    assert loss.item() == pytest.approx(l_sp, rel=1e-6)
    assert fn.terms["loss_up"] == pytest.approx(-math.log(_sig(2.0)), rel=1e-6)


def test_empty_scribbles_and_empty_omega_g_are_zero_not_nan():
    logits = _logits()
    scribble = torch.full((1, 1, 1, 3), float(U))
    fn = ScribbleLoss()
    loss = fn(logits, scribble, torch.zeros(1, 2, 1, 3))  # no pseudo-label anywhere
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    # a pseudo-label below tau everywhere: Omega_g empty
    fg = torch.full((3,), 0.6)
    loss = fn(_logits(), scribble, torch.stack([1 - fg, fg]).view(1, 2, 1, 3))
    assert loss.item() == 0.0 and fn.terms["omega_g"] == 0.0


def test_multiclass_uses_largest_class_probability():
    logits = torch.zeros(1, 3, 1, 2)
    logits[0, 2, 0, 0] = 3.0
    scribble = torch.full((1, 1, 1, 2), float(U))
    pseudo = torch.tensor([[0.05, 0.4], [0.05, 0.3], [0.9, 0.3]]).view(1, 3, 1, 2)  # pixel 0 class 2 at 0.9
    fn = ScribbleLoss(tau=0.8, lambda_up=1.0)
    loss = fn(logits, scribble, pseudo)
    expected = -math.log(math.exp(3) / (math.exp(3) + 2))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert fn.terms["omega_g"] == pytest.approx(0.5)


def test_bad_inputs_raise():
    fn = ScribbleLoss()
    with pytest.raises(ValueError, match="class indices"):
        fn(_logits(), torch.tensor([[[[2.0, U, 0]]]]))
    with pytest.raises(ValueError, match="channels"):
        fn(_logits(), torch.zeros(1, 2, 1, 3))
    with pytest.raises(ValueError, match="tau"):
        ScribbleLoss(tau=1.5)
    with pytest.raises(ValueError, match="mean"):
        ScribbleLoss(reduction="sum")


def test_class_weights_weight_the_scribbled_term_only():
    logits = _logits()
    scribble = torch.tensor([[[[1, U, 0]]]], dtype=torch.float32)
    fg = torch.tensor([0.95, 0.9, 0.3])
    pseudo = torch.stack([1 - fg, fg]).view(1, 2, 1, 3)
    fn = ScribbleLoss(tau=0.8, lambda_up=0.5, class_weights=[3.0, 1.0])
    loss = fn(logits, scribble, pseudo)
    # weighted mean over the scribbled pixels: foreground pixel 0 weight 1, background pixel 2 weight 3
    l_sp = (1 * -math.log(_sig(1.0)) + 3 * -math.log(1.0 - _sig(-1.0))) / 4
    l_up = -math.log(_sig(2.0))  # unweighted: the pseudo-labelled foreground pixel 1
    assert fn.terms["loss_sp"] == pytest.approx(l_sp, rel=1e-6)
    assert fn.terms["loss_up"] == pytest.approx(l_up, rel=1e-6)
    assert loss.item() == pytest.approx(l_sp + 0.5 * l_up, rel=1e-6)
    # equal weights are the unweighted paper loss; torch's weighted cross-entropy agrees on the scribbled pixels
    plain = ScribbleLoss(class_weights=[2.0, 2.0])(_logits(), scribble)
    assert plain.item() == pytest.approx(ScribbleLoss()(_logits(), scribble).item(), rel=1e-6)
    ref = torch.nn.functional.cross_entropy(
        _logits(), torch.tensor([[[1, -100, 0]]]), weight=torch.tensor([3.0, 1.0]), ignore_index=-100
    )
    assert ScribbleLoss(class_weights=[3.0, 1.0])(_logits(), scribble).item() == pytest.approx(ref.item(), rel=1e-6)


def test_class_weights_are_checked():
    with pytest.raises(ValueError, match="class_weights"):
        ScribbleLoss(class_weights=[-1.0, 1.0])
    with pytest.raises(ValueError, match="class_weights"):
        ScribbleLoss(class_weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="3 entries for 2 classes"):
        ScribbleLoss(class_weights=[1.0, 1.0, 1.0])(_logits(), torch.zeros(1, 1, 1, 3))
    # a zero weight drops that class: only the foreground pixel counts
    scribble = torch.tensor([[[[1, U, 0]]]], dtype=torch.float32)
    only_fg = ScribbleLoss(class_weights=[0.0, 1.0])(_logits(), scribble)
    assert only_fg.item() == pytest.approx(-math.log(_sig(1.0)), rel=1e-6)


def test_pseudo_class_weights_weight_the_pseudo_label_term():
    scribble = torch.tensor([[[[1, U, U, U]]]], dtype=torch.float32)
    logits = torch.tensor([[[[0.0, 0.0, 0.0, 0.0]], [[1.0, 2.0, -1.0, 0.5]]]])
    # pseudo-labels: pixel 1 foreground (0.9), pixel 2 background (0.95), pixel 3 below tau (0.6)
    fg = torch.tensor([0.5, 0.9, 0.05, 0.6])
    pseudo = torch.stack([1 - fg, fg]).view(1, 2, 1, 4)
    fn = ScribbleLoss(tau=0.8, lambda_up=0.5, pseudo_class_weights=[4.0, 1.0])
    loss = fn(logits, scribble, pseudo)
    l_sp = -math.log(_sig(1.0))  # unweighted
    l_up = (1 * -math.log(_sig(2.0)) + 4 * -math.log(1.0 - _sig(-1.0))) / 5
    assert fn.terms["loss_up"] == pytest.approx(l_up, rel=1e-6)
    assert loss.item() == pytest.approx(l_sp + 0.5 * l_up, rel=1e-6)
    assert fn.terms["omega_g"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="pseudo_class_weights"):
        ScribbleLoss(pseudo_class_weights=[0.0, 0.0])


def test_terms_report_crf_zero_when_off():
    fn = ScribbleLoss()
    fn(_logits(), torch.tensor([[[[1, U, 0]]]], dtype=torch.float32))
    assert fn.terms["loss_crf"] == 0.0 and fn.crf_weight == 0.0
