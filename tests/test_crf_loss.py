from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from s2l_monai.engine import PrepareScribbleBatch
from s2l_monai.losses import CRFLoss, ScribbleLoss

U = 255


def _reference(
    logits: np.ndarray,
    image: np.ndarray,
    radius: int,
    sigma_xy: float,
    sigma_intensity: float,
    mask: np.ndarray | None = None,
) -> float:
    """The windowed CRF loss straight from its definition, with explicit loops over pixels and neighbours."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    prob = shifted / shifted.sum(axis=1, keepdims=True)
    spatial = logits.shape[2:]
    num_offsets = (2 * radius + 1) ** len(spatial) - 1
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        for i in itertools.product(*(range(n) for n in spatial)):
            if mask is not None and not mask[(b, 0, *i)]:
                continue
            count += 1
            for d in itertools.product(range(-radius, radius + 1), repeat=len(spatial)):
                j = tuple(a + k for a, k in zip(i, d))
                if j == i or any(not 0 <= a < n for a, n in zip(j, spatial)):
                    continue
                dist_xy = sum(k * k for k in d)
                dist_int = sum((image[(b, c, *i)] - image[(b, c, *j)]) ** 2 for c in range(image.shape[1]))
                w = math.exp(-dist_xy / (2 * sigma_xy**2) - dist_int / (2 * sigma_intensity**2))
                potts = sum(prob[(b, k, *i)] * (1 - prob[(b, k, *j)]) for k in range(prob.shape[1]))
                total += w * potts
    return total / (count * num_offsets) if count else 0.0


def test_two_pixels_by_hand():
    # p_0 = softmax(0, ln 3) = (1/4, 3/4), p_1 = (1/2, 1/2): sum_k p_0k (1 - p_1k) = 1/2, and the same from pixel 1
    logits = torch.tensor([[[[0.0, 0.0]], [[math.log(3.0), 0.0]]]])
    image = torch.tensor([[[[0.2, 0.3]]]])
    # W = exp(-1 / (2 * 1^2) - 0.1^2 / (2 * 0.1^2)) = exp(-1); 2 pixels, 8 offsets in a 3x3 window
    loss = CRFLoss(sigma_xy=1.0, sigma_intensity=0.1, radius=1)(logits, image)
    expected = 2 * math.exp(-1.0) * 0.5 / (2 * 8)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.dtype == torch.float32


def test_tiny_case_matches_loop_reference():
    logits = torch.tensor([[[[0.3, -1.0, 2.0], [0.0, 0.5, -0.2]], [[1.0, 0.4, -0.7], [1.5, -0.3, 0.9]]]])
    image = torch.tensor([[[[0.1, 0.15, 0.6], [0.12, 0.7, 0.65]]]])
    for sigma_xy, sigma_int in [(100.0, 15 / 255), (1.0, 0.2)]:
        loss = CRFLoss(sigma_xy=sigma_xy, sigma_intensity=sigma_int, radius=1)(logits, image)
        ref = _reference(logits.numpy().astype(np.float64), image.numpy().astype(np.float64), 1, sigma_xy, sigma_int)
        assert loss.item() == pytest.approx(ref, rel=1e-5)
    mask = torch.tensor([[[[1, 0, 0], [0, 1, 1]]]])
    loss = CRFLoss(sigma_xy=1.0, sigma_intensity=0.2, radius=1)(logits, image, mask)
    ref = _reference(logits.double().numpy(), image.double().numpy(), 1, 1.0, 0.2, mask.numpy())
    assert loss.item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("shape, radius", [((2, 3, 5, 7), 2), ((1, 2, 4, 3), 5), ((1, 2, 3, 4, 3), 1)])
def test_random_cases_match_loop_reference(shape, radius):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=gen) * 2
    image = torch.rand((shape[0], 2, *shape[2:]), generator=gen)  # two image channels: distances add up
    mask = torch.rand((shape[0], 1, *shape[2:]), generator=gen) > 0.4
    fn = CRFLoss(sigma_xy=2.0, sigma_intensity=0.3, radius=radius)
    for m in (None, mask):
        ref = _reference(
            logits.double().numpy(), image.double().numpy(), radius, 2.0, 0.3, None if m is None else m.numpy()
        )
        assert fn(logits, image, m).item() == pytest.approx(ref, rel=1e-5)


def test_gradient_matches_autograd_of_a_plain_implementation():
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 3, 6, 5, generator=gen) * 2).requires_grad_()
    image = torch.rand(2, 1, 6, 5, generator=gen)
    mask = torch.rand(2, 1, 6, 5, generator=gen) > 0.5
    radius, s_xy, s_int = 2, 3.0, 0.25
    CRFLoss(sigma_xy=s_xy, sigma_intensity=s_int, radius=radius)(logits, image, mask).backward()

    ref_logits = logits.detach().double().requires_grad_()
    prob, img, m = ref_logits.softmax(1), image.double(), mask.double()
    total = ref_logits.new_zeros(())
    h, w = prob.shape[2:]
    for dy, dx in itertools.product(range(-radius, radius + 1), repeat=2):
        if (dy, dx) == (0, 0):
            continue
        a = (slice(None), slice(None), slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx)))
        b = (slice(None), slice(None), slice(max(0, dy), h - max(0, -dy)), slice(max(0, dx), w - max(0, -dx)))
        weight = torch.exp(-(dy * dy + dx * dx) / (2 * s_xy**2) - (img[a] - img[b]) ** 2 / (2 * s_int**2))
        total = total + (m[a] * weight * (prob[a] * (1 - prob[b])).sum(1, keepdim=True)).sum()
    (total / (m.sum() * ((2 * radius + 1) ** 2 - 1))).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-4, atol=1e-7)


def test_constant_hard_prediction_is_zero_and_value_in_unit_interval():
    image = torch.rand(2, 1, 9, 8)
    logits = torch.zeros(2, 2, 9, 8)
    logits[:, 1] = 40.0
    assert CRFLoss()(logits, image).item() == pytest.approx(0.0, abs=1e-7)
    # a constant image and a maximally uncertain-to-disagreeing prediction stays below 1
    worst = CRFLoss(radius=2)(torch.randn(2, 4, 9, 8) * 30, torch.zeros(2, 1, 9, 8)).item()
    assert 0.0 < worst <= 1.0


def test_prediction_along_an_intensity_edge_is_cheaper_than_one_across_a_uniform_region():
    image = torch.zeros(1, 1, 16, 16)
    image[..., 8:] = 1.0  # a vertical edge between columns 7 and 8
    along = torch.zeros(1, 2, 16, 16)
    along[:, 0, :, :8] = along[:, 1, :, 8:] = 20.0  # foreground = the bright half
    across = torch.zeros(1, 2, 16, 16)
    across[:, 0, :8, :] = across[:, 1, 8:, :] = 20.0  # foreground = the bottom half: cuts both uniform regions
    fn = CRFLoss()
    assert fn(along, image).item() < 1e-6 < fn(across, image).item()


def test_gradient_flows_and_empty_mask_is_zero():
    logits = torch.randn(2, 2, 8, 8, requires_grad=True)
    image = torch.rand(2, 1, 8, 8)
    loss = CRFLoss(radius=3)(logits, image)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    logits.grad = None
    loss = CRFLoss()(logits, image, torch.zeros(2, 1, 8, 8))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    # an all-ones mask is no mask
    ones = CRFLoss()(logits, image, torch.ones(2, 1, 8, 8))
    assert ones.item() == pytest.approx(CRFLoss()(logits, image).item(), rel=1e-6)


def test_bad_crf_arguments_raise():
    with pytest.raises(ValueError, match="radius"):
        CRFLoss(radius=0)
    with pytest.raises(ValueError, match="sigma"):
        CRFLoss(sigma_intensity=0.0)
    with pytest.raises(ValueError, match="mean"):
        CRFLoss(reduction="sum")
    with pytest.raises(ValueError, match="image shape"):
        CRFLoss()(torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="mask"):
        CRFLoss()(torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4), torch.ones(1, 2, 4, 4))


def _batch(with_pseudo: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 2, 6, 7, generator=gen)
    scribble = torch.full((2, 1, 6, 7), float(U))
    scribble[:, 0, 1, 1:5] = 1.0
    scribble[:, 0, 4, 2:6] = 0.0
    fg = torch.rand(2, 1, 6, 7, generator=gen)
    pseudo = torch.cat([1 - fg, fg], 1) if with_pseudo else None
    image = torch.rand(2, 1, 6, 7, generator=gen)
    return logits, scribble, pseudo, image


@pytest.mark.parametrize("with_pseudo", [False, True])
def test_scribble_loss_without_crf_is_unchanged(with_pseudo):
    logits, scribble, pseudo, image = _batch(with_pseudo)
    old = ScribbleLoss(tau=0.6, lambda_up=0.5)
    packed = scribble if pseudo is None else torch.cat([scribble, pseudo], 1)
    expected = old(logits, packed)
    assert old.terms["loss_crf"] == 0.0
    # image channels in the target are stripped and ignored while crf_weight == 0
    new = ScribbleLoss(tau=0.6, lambda_up=0.5, crf_weight=0.0, image_channels=1)
    assert torch.equal(new(logits, torch.cat([packed, image], 1)), expected)
    assert new.terms == old.terms


@pytest.mark.parametrize("with_pseudo", [False, True])
def test_scribble_loss_adds_weighted_crf_term(with_pseudo):
    logits, scribble, pseudo, image = _batch(with_pseudo)
    packed = scribble if pseudo is None else torch.cat([scribble, pseudo], 1)
    base = ScribbleLoss(tau=0.6, lambda_up=0.5)(logits, packed).item()
    crf = CRFLoss(sigma_xy=50.0, sigma_intensity=0.2, radius=2)(logits, image).item()
    fn = ScribbleLoss(
        tau=0.6,
        lambda_up=0.5,
        crf_weight=3.0,
        crf_sigma_xy=50.0,
        crf_sigma_intensity=0.2,
        crf_radius=2,
        image_channels=1,
    )
    logits.requires_grad_()
    loss = fn(logits, torch.cat([packed, image], 1))
    assert loss.item() == pytest.approx(base + 3.0 * crf, rel=1e-6)
    assert fn.terms["loss_crf"] == pytest.approx(crf, rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # the image may also come as an argument; the CRF term applies during warm-up too
    by_arg = ScribbleLoss(
        tau=0.6, lambda_up=0.5, crf_weight=3.0, crf_sigma_xy=50.0, crf_sigma_intensity=0.2, crf_radius=2
    )(logits, packed, image=image)
    assert by_arg.item() == pytest.approx(loss.item(), rel=1e-6)
    warm = ScribbleLoss(lambda_up=0.5, crf_weight=3.0, crf_radius=2, pseudo_label_enabled=False, image_channels=1)
    l_sp = ScribbleLoss()(logits, scribble).item()
    assert warm(logits, torch.cat([packed, image], 1)).item() == pytest.approx(
        l_sp + 3.0 * CRFLoss(radius=2)(logits, image).item(), rel=1e-6
    )


def test_scribble_loss_crf_needs_the_image_and_a_valid_layout():
    logits, scribble, _, image = _batch(False)
    with pytest.raises(ValueError, match="needs the image"):
        ScribbleLoss(crf_weight=1.0)(logits, scribble)
    with pytest.raises(ValueError, match="image_channels"):
        ScribbleLoss(crf_weight=1.0, image_channels=1)(logits, scribble)  # 1 channel: no image packed
    with pytest.raises(ValueError, match="image_channels"):
        ScribbleLoss(crf_weight=1.0, image_channels=2)(logits, torch.cat([scribble, image], 1))
    with pytest.raises(ValueError, match="crf_weight"):
        ScribbleLoss(crf_weight=-1.0)
    with pytest.raises(ValueError, match="image_channels"):
        ScribbleLoss(image_channels=-1)


@pytest.mark.parametrize("with_pseudo", [False, True])
def test_prepare_batch_packs_the_image_last(with_pseudo):
    _, scribble, pseudo, _ = _batch(with_pseudo)
    image = torch.rand(2, 3, 6, 7)  # three image channels
    batch = {"image": image, "scribble": scribble.to(torch.uint8)}
    if pseudo is not None:
        batch["pseudo"] = pseudo
    net_in, target = PrepareScribbleBatch(image_in_target=True)(batch)
    assert torch.equal(net_in, image)
    n_pseudo = 0 if pseudo is None else 2
    assert target.shape == (2, 1 + n_pseudo + 3, 6, 7) and target.dtype == torch.float32
    assert torch.equal(target[:, :1], scribble)
    if pseudo is not None:
        assert torch.equal(target[:, 1:3], pseudo)
    assert torch.equal(target[:, 1 + n_pseudo :], image)
    # the default layout is unchanged
    _, plain = PrepareScribbleBatch()(batch)
    assert torch.equal(plain, target[:, : 1 + n_pseudo])
    # and the loss unpacks it: the same value as with the parts given separately
    logits = torch.randn(2, 2, 6, 7)
    packed = ScribbleLoss(crf_weight=0.5, crf_radius=2, image_channels=3)(logits, target)
    separate = ScribbleLoss(crf_weight=0.5, crf_radius=2)(logits, scribble, pseudo, image=image)
    assert packed.item() == pytest.approx(separate.item(), rel=1e-6)
